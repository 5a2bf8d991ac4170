"""`conveyor doctor`: check a workspace (settings, database, stored data, every checkpoint, free disk) and
say what is wrong with the fix. It only reads; it never changes or deletes anything."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import checkpoints as ck
from . import jobs, runs
from . import manifest as mf
from .config import Config
from .errors import ConveyorError
from .fingerprint import fingerprint
from .workspace import Workspace


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
    findings += _stored_data(ws)
    for run in runs.all_runs(ws.db):
        findings += _run(ws, run, deep)
    findings += _disk(ws, config)
    return findings


def _database(ws: Workspace) -> list[Finding]:
    result = ws.db.execute("PRAGMA integrity_check").fetchone()[0]
    if result != "ok":
        return [Finding("error", f"the database fails its integrity check: {result}",
                        "copy the workspace aside; checkpoints and their manifests hold the weights and positions")]
    return [Finding("ok", "database integrity check passed")]


def _stored_data(ws: Workspace) -> list[Finding]:
    findings = []
    for job in jobs.all_jobs(ws.db):
        if job.state not in (jobs.JobState.QUEUED, jobs.JobState.RUNNING, jobs.JobState.INTERRUPTED):
            continue
        path = Path(job.stored)
        if not path.exists():
            findings.append(Finding("error", f"job {job.id}: its stored copy {path.name} is missing",
                                    f"add {job.file} again, or remove the job"))
        elif fingerprint(path) != job.fingerprint:
            findings.append(Finding("error", f"job {job.id}: its stored copy {path.name} no longer matches "
                                    "its fingerprint", f"add {job.file} again"))
    if not findings:
        findings.append(Finding("ok", "stored copies of queued and running jobs match their fingerprints"))
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
