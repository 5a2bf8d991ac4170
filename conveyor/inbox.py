"""Taking files in: validate, fingerprint, copy into the workspace (content-addressed), and enqueue a job.

The person's file is only read, never modified or removed here (law 6).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from . import jobs
from .errors import DataError
from .fingerprint import fingerprint, short
from .formats import parse_file
from .jobs import Job, JobState
from .store import log_event
from .workspace import Workspace


@dataclass
class Enqueued:
    job: Job
    messages: list[str]  # warnings and notices for the person


def _store_copy(ws: Workspace, source: Path, fp: str) -> Path:
    """Copy the bytes into data/<sha256>.jsonl (once per content), verified before use."""
    target = ws.data / f"{fp}.jsonl"
    if target.exists() and fingerprint(target) == fp:
        return target
    tmp = ws.data / f".{fp}.{os.getpid()}.tmp"
    shutil.copyfile(source, tmp)
    if fingerprint(tmp) != fp:
        tmp.unlink()
        raise DataError(f"{source}: the file changed while it was being copied; add it again once it is complete")
    os.replace(tmp, target)
    return target


def _reject(ws: Workspace, source: Path, fp: str, stored: Path, reason: str, priority: int) -> Job:
    job = jobs.insert(ws.db, file=source.name, source=str(source), stored=str(stored), fingerprint=fp,
                      priority=priority, state=JobState.REJECTED, error=reason)
    kept = ws.rejected / f"{job.id:05d}-{source.name}"
    shutil.copyfile(stored, kept)
    (ws.rejected / f"{kept.name}.reason.txt").write_text(reason + "\n", encoding="utf-8")
    log_event(ws.db, "error", "rejected", reason, job.id)
    return job


def enqueue(ws: Workspace, source: Path, priority: int = jobs.PRIORITIES["normal"], epochs: int = 1) -> Enqueued:
    """Validate and enqueue one file; a bad file becomes a `rejected` job with every problem listed."""
    source = Path(source)
    if not source.is_file():
        raise DataError(f"{source}: no such file; check the path")
    ws.data.mkdir(exist_ok=True)
    ws.rejected.mkdir(exist_ok=True)
    fp = fingerprint(source)
    stored = _store_copy(ws, source, fp)
    try:
        parsed = parse_file(stored, source.name)
    except DataError as e:
        return Enqueued(_reject(ws, source, fp, stored, str(e), priority), [str(e)])
    messages = []
    for other in jobs.all_jobs(ws.db):
        if other.fingerprint != fp:
            continue
        if other.state == JobState.RUNNING:
            # Same bytes as a job interrupted mid-way: that job resumes, no second copy starts (law 4).
            messages.append(f"{source.name} is the same dataset ({short(fp)}) as job {other.id} ({other.file}), "
                            f"interrupted at step {other.steps_done} of {other.planned_steps}; no new job, "
                            f"job {other.id} resumes where it stopped")
            log_event(ws.db, "info", "recognised", messages[-1], other.id)
            return Enqueued(other, messages)
        if other.state == JobState.DONE:
            messages.append(f"{source.name} has the same bytes ({short(fp)}) as job {other.id} "
                            f"({other.file}, trained at steps {other.start_step}–{other.end_step}); "
                            "see data.skip_duplicates")
    job = jobs.insert(ws.db, file=source.name, source=str(source.resolve()), stored=str(stored), fingerprint=fp,
                      priority=priority, state=JobState.QUEUED, format=parsed.format,
                      examples=len(parsed.examples), epochs=epochs)
    log_event(ws.db, "info", "queued", f"job {job.id}: {source.name} ({len(parsed.examples)} examples, "
              f"{parsed.format}, {short(fp)})", job.id)
    return Enqueued(job, messages)
