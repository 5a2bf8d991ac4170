"""`conveyor doctor`: check a workspace (settings, database, stored data, every checkpoint, free disk) and
say what is wrong with the fix. It only reads; it never changes or deletes anything. `conveyor doctor --repair`
rebuilds a damaged state database from the checkpoint manifests (repair.py)."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

from ..config import Config
from ..data.tokenized import problem
from ..errors import ConveyorError
from ..faults import DatabaseDamaged, database_message, is_damaged_database
from ..fingerprint import FileHashes, fingerprint
from ..store import checkpoints as ck
from ..store import jobs, runs
from ..store import manifest as mf
from ..store.consistency import describe, scan
from ..store.database import DB_FILE
from ..store.workspace import Workspace
from ..train.jobdata import copy_problem
from ..train.reference import ADAPTER_FILE, LOGPS


@dataclass
class Finding:
    level: str  # ok | warning | error
    what: str
    fix: str = ""

    def to_json(self) -> dict:
        return {"level": self.level, "what": self.what, "fix": self.fix}


def check(ws: Workspace, deep: bool = False) -> list[Finding]:
    """Every finding; `deep` hashes every checkpoint file again instead of trusting hashes taken before."""
    findings: list[Finding] = []
    try:
        config = ws.config()
        findings.append(Finding("ok", f"{ws.config_path.name} is valid"))
    except ConveyorError as e:
        findings.append(Finding("error", str(e), "fix the keys named above"))
        config = None
    findings += _database(ws)
    try:
        findings += _stored_data(ws, deep)
        findings += _references(ws)
        for run in runs.all_runs(ws.db):
            findings += _run(ws, run, deep)
        findings += _disk(ws, config)
    except (DatabaseDamaged, sqlite3.DatabaseError) as e:  # said by _database; what the disk holds instead
        if not is_damaged_database(e):
            raise
        findings += _on_disk(ws, deep)
    return findings


REPAIR = "`conveyor doctor --repair`"


def _database(ws: Workspace) -> list[Finding]:
    """conveyor.db: it opens (database.connect checks it), matches the runs on disk, and every page passes."""
    try:
        result = [row[0] for row in ws.db.execute("PRAGMA integrity_check")]
    except DatabaseDamaged as e:  # damaged, missing or not matching the runs on disk: the message says which
        return [Finding("error", str(e), REPAIR)]
    except sqlite3.DatabaseError as e:
        if not is_damaged_database(e):
            raise
        return [Finding("error", database_message(ws.root / DB_FILE, e), REPAIR)]
    if result != ["ok"]:
        return [Finding("error", database_message(ws.root / DB_FILE, "it fails its integrity check: "
                                                  + "; ".join(result[:3])), REPAIR)]
    return [Finding("ok", f"{DB_FILE}: integrity check passed, and it matches the runs on disk")]


def _on_disk(ws: Workspace, deep: bool) -> list[Finding]:
    """Without a usable database: each run folder's verified checkpoints (what --repair rebuilds from) and the
    free space."""
    findings = [Finding(level, text) for level, text in describe(scan(ws, deep))]
    return findings + [Finding("ok", f"{ws.free_bytes() / 1e9:.1f} GB free")]


def _stored_data(ws: Workspace, deep: bool = False) -> list[Finding]:
    """Stored copies against their jobs' fingerprints (those still to train, and done ones, which replay, held-out
    sets and rollbacks read again: errors) and tokenized arrays against their hashes. Hashes taken before are
    trusted when the file is as it was when hashed (fingerprint.trusted); `deep` hashes every file again. Nothing
    is recorded."""
    import shlex


    hashes = FileHashes(ws.data)  # read-only: never saved
    sha256 = fingerprint if deep else hashes.sha256
    waiting = (jobs.JobState.QUEUED, jobs.JobState.RUNNING, jobs.JobState.INTERRUPTED)
    findings, found = [], {}
    for job in jobs.all_jobs(ws.db):
        if job.state not in waiting + (jobs.JobState.DONE,):
            continue
        path = Path(job.stored)
        if path not in found:
            found[path] = copy_problem(path, job.fingerprint, sha256)
        if found[path] is None:
            continue
        add = f"add the original again: `conveyor add {shlex.quote(job.source)}` restores the copy"
        if job.state in waiting:
            fix = (f"{add} before job {job.id} starts (it keeps its place), or "
                   + ("`conveyor skip`" if job.state == jobs.JobState.RUNNING else f"`conveyor queue remove {job.id}`")
                   + "; otherwise it stops when it starts, and nothing is trained from it")
        else:
            fix = f"{add}; a later job that replays job {job.id} or scores its held-out set stops until then"
        findings.append(Finding("error",  # a done job's copy is read again by replay, held-out sets, rollbacks
                                f"job {job.id} ({job.file}, {job.state.value}): its stored copy data/{path.name} "
                                f"{found[path]}", fix))
    tokenized = ws.data / "tokenized"
    for folder in sorted(tokenized.iterdir()) if tokenized.is_dir() else []:
        wrong = None if folder.name.startswith(".") else problem(folder, None if deep else hashes)
        if wrong:
            findings.append(Finding("error", f"data/tokenized/{folder.name}/{wrong}",
                                    f"delete data/tokenized/{folder.name}: it is derived data, rebuilt from the "
                                    "verified stored copy when a job next needs it"))
    if not findings:
        findings.append(Finding("ok", f"stored copies match their jobs' fingerprints and tokenized arrays their "
                                f"hashes ({'all hashed again' if deep else 'unchanged since hashed, or hashed'})"))
    return findings


def _references(ws: Workspace) -> list[Finding]:
    """Each preference job's reference (a frozen adapter copy, or cached log-probabilities) against the sha256
    recorded when the job started: an error for a job still to finish (it would stop on resume), a warning for a
    finished one (nothing reads it again; it is the record of what the job compared with). Always hashed: small."""
    findings, checked = [], 0
    for job in jobs.all_jobs(ws.db):
        record = job.reference
        if not record or job.run_id is None:
            continue
        checked += 1
        if record["kind"] == "adapter":
            path = ws.run_dir(job.run_id) / record["path"] / ADAPTER_FILE
        else:
            path = ws.root / record["path"] / LOGPS
        found = fingerprint(path) if path.is_file() else None
        if found == record["sha256"]:
            continue
        what = "is missing" if found is None else f"no longer matches the sha256 recorded ({found[:12]} instead " \
            f"of {record['sha256'][:12]})"
        shown = path.relative_to(ws.root)
        if job.state == jobs.JobState.DONE:
            findings.append(Finding("warning", f"job {job.id} ({job.file}, done): its reference {shown} {what}",
                                    "nothing reads it again; it was the record of what the job compared with"))
        elif record["kind"] == "adapter":
            findings.append(Finding("error", f"job {job.id} ({job.file}, {job.state.value}): its reference {shown} "
                                    f"{what}; it stops when it resumes", "`conveyor rollback` to the version before "
                                    "it trains it again from its start, against a new copy"))
        else:
            findings.append(Finding("warning", f"job {job.id} ({job.file}, {job.state.value}): its cached reference "
                                    f"{shown} {what}", "nothing to do: it is computed again from the reference's "
                                    "weights when the job resumes, never used as it is"))
    if checked and not findings:
        findings.append(Finding("ok", f"{checked} preference job reference(s) match the sha256 recorded"))
    return findings


def _run(ws: Workspace, run: runs.Run, deep: bool) -> list[Finding]:
    run_dir = ws.run_dir(run.id)
    # Read-only: what it hashes is not recorded (doctor never writes); --deep trusts nothing.
    trusted = ck.HashCache(ck.checkpoints_dir(run_dir))
    sha256 = fingerprint if deep else trusted.sha256
    findings = []
    for path in ck.foreign(run_dir):
        findings.append(Finding("warning", f"{run.id}: {path.name} is not a conveyor checkpoint; it is never resumed",
                                "move it out of the checkpoints folder if it does not belong there"))
    root = ck.checkpoints_dir(run_dir)
    for path in sorted(root.glob(".tmp-*")) if root.exists() else []:
        findings.append(Finding("warning", f"{run.id}: {path.name} is an unfinished checkpoint write",
                                "harmless; conveyor removes it on its next start"))
    verified = []
    for path in ck.numbered(run_dir):
        try:
            data = mf.verify(path, sha256)
            verified.append(data.global_step)
        except ValueError as e:
            findings.append(Finding("error", f"{run.id}/{path.name}: {e}",
                                    "conveyor will not resume from it; it falls back to the newest verified one"))
    label = "active" if run.active else "kept"
    if verified:
        findings.append(Finding("ok", f"{run.id} ({label}): {len(verified)} checkpoint(s) verified, newest "
                                f"step {max(verified)}; database says step {run.global_step}"))
        if run.global_step > max(verified):
            findings.append(Finding("warning", f"{run.id}: steps {max(verified) + 1}–{run.global_step} have no "
                                    "checkpoint", "they train again on the next start (nothing is skipped)"))
    elif run.global_step:
        findings.append(Finding("error", f"{run.id}: at step {run.global_step} but no verified checkpoint",
                                "its jobs train again from the base model on the next start"))
    return findings


def _disk(ws: Workspace, config) -> list[Finding]:
    free = ws.free_bytes()
    active = runs.active(ws.db)
    defaults = Config()  # with invalid settings, judge by the defaults
    settings = config or defaults
    t = settings.training
    need = ck.space_needed(ws.run_dir(active.id) if active else None, t.keep_checkpoints, t.keep_job_ends,
                           settings.daemon.min_free_mb * 10**6)
    if free < need:
        return [Finding("error", f"{free / 1e6:.0f} MB free, about {need / 1e6:.0f} MB needed for checkpoints "
                        "and the reserve", "free disk space, or lower training.keep_checkpoints, training.keep_job_ends or "
                        "daemon.min_free_mb")]
    return [Finding("ok", f"{free / 1e9:.1f} GB free (about {need / 1e6:.0f} MB needed)")]
