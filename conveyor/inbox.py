"""Taking files in: validate, fingerprint, copy into the workspace (content-addressed), and enqueue a job.

The person's file is only read, never modified or removed here (law 6).
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from . import jobs
from .errors import DataError
from .fingerprint import copy_hashing, fingerprint, short
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
    if copy_hashing(source, tmp) != fp:  # the bytes copied are not the bytes fingerprinted
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
    if source.is_dir():
        raise DataError(f"{source} is a folder; pass the JSONL files in it (e.g. {source}/*.jsonl)")
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


PRIORITY_FOLDERS = {"high": jobs.PRIORITIES["high"], "low": jobs.PRIORITIES["low"]}
IGNORED_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload")


class Inbox:
    """Watches inbox/ (inotify through watchdog, with a polling scan as fallback) and claims settled files."""

    def __init__(self, ws: Workspace, settle_seconds: float, say):
        self.ws = ws
        self.settle = settle_seconds
        self.say = say
        self.changed = threading.Event()  # set by file-system events: rescan now
        self._seen: dict[Path, tuple[tuple, float]] = {}  # path → (signature, since when unchanged)
        self._reported: dict[Path, tuple] = {}  # entries reported once as not claimable
        self._observer = None

    def start(self) -> None:
        self.ws.inbox.mkdir(exist_ok=True)
        for name in PRIORITY_FOLDERS:
            (self.ws.inbox / name).mkdir(exist_ok=True)
        try:
            from watchdog.events import FileSystemEventHandler
            from watchdog.observers import Observer

            changed = self.changed

            class Handler(FileSystemEventHandler):
                def on_any_event(self, event):
                    changed.set()

            self._observer = Observer()
            self._observer.schedule(Handler(), str(self.ws.inbox), recursive=True)
            self._observer.start()
        except Exception as e:  # no inotify (some network file systems): the polling scan still works
            self.say("warning", f"file-system events unavailable ({e}); scanning inbox/ by polling")
            self._observer = None

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)

    def settling(self) -> bool:
        """Whether some file is waiting to settle (the daemon then rescans sooner)."""
        return bool(self._seen)

    def scan(self) -> list[Enqueued]:
        """Claim every settled file; report (once) entries that cannot be claimed."""
        self.changed.clear()
        now = time.monotonic()
        claimed = []
        present = set()
        for path, priority in self._entries():
            present.add(path)
            signature = self._signature(path)
            if signature is None:
                continue
            previous = self._seen.get(path)
            if previous is None or previous[0] != signature:
                self._seen[path] = (signature, now)
                continue
            if now - previous[1] >= self.settle:
                result = self._claim(path, priority, signature)
                if result:
                    claimed.append(result)
        for gone in set(self._seen) - present:
            del self._seen[gone]  # deleted or renamed before it settled: nothing to do
        return claimed

    def _entries(self):
        for folder, priority in [(self.ws.inbox, jobs.PRIORITIES["normal"]),
                                 *[(self.ws.inbox / n, p) for n, p in PRIORITY_FOLDERS.items()]]:
            try:
                names = sorted(os.listdir(folder))
            except FileNotFoundError:
                continue
            for name in names:
                path = folder / name
                if name.startswith(".") or name.endswith(IGNORED_SUFFIXES):
                    continue  # hidden or still being written (a `.part` is renamed when complete)
                if folder == self.ws.inbox and name in PRIORITY_FOLDERS and path.is_dir():
                    continue
                problem = self._unclaimable(path)
                if problem:
                    self._report_once(path, problem)
                    continue
                yield path, priority

    def _unclaimable(self, path: Path) -> str | None:
        if path.is_symlink():
            target = path.resolve()
            if not target.is_relative_to(self.ws.inbox.resolve()):
                return f"a symlink to {target}, outside the inbox; copy the file in instead"
        if path.is_dir():
            return "a folder; put .jsonl files directly in inbox/ (or inbox/high/, inbox/low/)"
        if path.suffix != ".jsonl":
            return "not a .jsonl file; conveyor only takes JSONL (one JSON object a line)"
        return None

    def _report_once(self, path: Path, problem: str, signature: tuple = ()) -> None:
        if self._reported.get(path) == (problem, signature):
            return
        self._reported[path] = (problem, signature)
        self.say("warning", f"inbox: left {path.relative_to(self.ws.inbox)} in place: {problem}")

    def _signature(self, path: Path) -> tuple | None:
        try:
            st = path.stat()
        except OSError:
            return None
        return (st.st_size, st.st_mtime_ns, st.st_ino)

    def _claim(self, path: Path, priority: int, signature: tuple) -> Enqueued | None:
        """Enqueue (verified copy), then move the person's file out of the inbox; it is never deleted."""
        del self._seen[path]
        try:
            result = enqueue(self.ws, path, priority)
        except (OSError, DataError) as e:
            self._report_once(path, f"cannot be read ({e})", signature)
            return None
        if self._signature(path) != signature:
            self.say("warning", f"inbox: {path.name} changed while it was being claimed; the version queued is "
                     f"{short(result.job.fingerprint)}, the newer one will be claimed when it settles")
            return result
        if result.job.state == JobState.REJECTED:
            path.unlink()  # rejected/ holds the verified identical copy and the reason
        else:
            kept = self.ws.root / "claimed" / f"{result.job.id:05d}-{path.name}"
            kept.parent.mkdir(exist_ok=True)
            os.replace(path, kept)
            jobs.update(self.ws.db, result.job.id, kept=str(kept))
        return result


def file_finished(ws: Workspace, job: Job) -> None:
    """After a job is done (or skipped), move the person's original from claimed/ to finished/."""
    if not job.kept or not Path(job.kept).exists():
        return
    target = ws.root / "finished" / Path(job.kept).name
    target.parent.mkdir(exist_ok=True)
    os.replace(job.kept, target)
    jobs.update(ws.db, job.id, kept=str(target))
