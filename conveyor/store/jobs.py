"""Jobs: one dataset file to train, its states and the only allowed transitions between them.

Every change of state is a compare-and-set (`UPDATE ... WHERE id = ? AND state IN (...)`) that checks its row
count, so two writers (the daemon, a worker, `conveyor queue remove`) can never both think they own a job.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from enum import Enum

from ..errors import ConveyorError
from ..fingerprint import short
from .database import transaction


class JobState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    INTERRUPTED = "interrupted"  # stopped mid-way; resumes from its own position (law 2)
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"
    REJECTED = "rejected"


TRANSITIONS: dict[JobState, set[JobState]] = {
    JobState.QUEUED: {JobState.RUNNING, JobState.SKIPPED, JobState.FAILED},
    # An interrupted job goes back to queued only when reconciliation finds its position lost with a checkpoint.
    JobState.INTERRUPTED: {JobState.RUNNING, JobState.SKIPPED, JobState.QUEUED, JobState.INTERRUPTED,
                           JobState.FAILED},
    JobState.RUNNING: {JobState.DONE, JobState.FAILED, JobState.SKIPPED, JobState.INTERRUPTED, JobState.QUEUED},
    JobState.DONE: set(),
    # A job that failed because its stored copy did not verify waits again once the original is added again
    # (inbox): interrupted if it had stopped mid-way, so that it resumes from its own position (law 2).
    JobState.FAILED: {JobState.QUEUED, JobState.INTERRUPTED},
    JobState.SKIPPED: set(),
    JobState.REJECTED: set(),
}

# Reconciliation alone may reopen a finished job: when its later checkpoints turn out unusable, its steps
# after the newest verified checkpoint must train again (never silently lost).
REOPEN: dict[JobState, set[JobState]] = {
    JobState.DONE: {JobState.INTERRUPTED, JobState.QUEUED},
}

# Waiting to train, in the order they train: priority first; within a priority an interrupted job goes before
# queued ones (it was already under way), then arrival.
WAITING = (JobState.QUEUED, JobState.INTERRUPTED)
QUEUE_ORDER = "priority, state = 'interrupted' DESC, id"

PRIORITIES = {"high": 0, "normal": 1, "low": 2}
PRIORITY_NAMES = {v: k for k, v in PRIORITIES.items()}


class Conflict(ConveyorError):
    """A job was not in the state a transition expected: someone else changed it first."""


@dataclass
class Job:
    id: int
    run_id: str | None
    file: str
    source: str
    stored: str
    fingerprint: str
    format: str | None
    priority: int
    state: JobState
    examples: int | None
    tokens: int | None
    epochs: int | None
    planned_steps: int | None
    start_step: int | None
    end_step: int | None
    steps_done: int
    position: int
    segment_start: int | None
    attempts: int
    deaths: int
    claim: str | None
    kept: str | None
    truncated: int
    excluded: list[int]
    warnings: list[str]
    error: str | None
    holdout: list[int] | None = None  # file lines held out (never trained); None: not chosen yet
    overrides: dict | None = None  # settings this job trains with instead of conveyor.toml's (`add --set`)
    reference: dict | None = None  # a preference job's reference, recorded when its first step started

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> "Job":
        return cls(
            id=row["id"], run_id=row["run_id"], file=row["file"], source=row["source"], stored=row["stored"],
            fingerprint=row["fingerprint"], format=row["format"], priority=row["priority"],
            state=JobState(row["state"]), examples=row["examples"], tokens=row["tokens"], epochs=row["epochs"],
            planned_steps=row["planned_steps"], start_step=row["start_step"], end_step=row["end_step"],
            steps_done=row["steps_done"], position=row["position"], segment_start=row["segment_start"],
            attempts=row["attempts"], deaths=row["deaths"], claim=row["claim"], kept=row["kept"],
            truncated=row["truncated"], excluded=json.loads(row["excluded"] or "[]"),
            warnings=json.loads(row["warnings"]), error=row["error"],
            holdout=json.loads(row["holdout"]) if row["holdout"] is not None else None,
            overrides=json.loads(row["overrides"]) if row["overrides"] else None,
            reference=json.loads(row["reference"]) if "reference" in row.keys() and row["reference"] else None,
        )

    def to_json(self) -> dict:
        return {
            "id": self.id, "run_id": self.run_id, "file": self.file, "source": self.source,
            "fingerprint": self.fingerprint, "format": self.format, "priority": PRIORITY_NAMES[self.priority],
            "state": self.state.value, "examples": self.examples, "tokens": self.tokens, "epochs": self.epochs,
            "planned_steps": self.planned_steps, "start_step": self.start_step, "end_step": self.end_step,
            "steps_done": self.steps_done, "position": self.position, "attempts": self.attempts,
            "deaths": self.deaths, "kept": self.kept, "truncated": self.truncated, "excluded_lines": self.excluded,
            "warnings": self.warnings, "error": self.error, "held_out": self.holdout or [],
            "overrides": self.overrides or {}, **({"reference": self.reference} if self.reference else {}),
        }


def insert(con: sqlite3.Connection, *, file: str, source: str, stored: str, fingerprint: str,
           priority: int, state: JobState, format: str | None = None, examples: int | None = None,
           epochs: int | None = None, error: str | None = None, overrides: dict | None = None) -> Job:
    cur = con.execute(
        "INSERT INTO jobs (file, source, stored, fingerprint, format, priority, state, examples, epochs, error,"
        " overrides, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (file, source, stored, fingerprint, format, priority, state.value, examples, epochs, error,
         json.dumps(overrides) if overrides else None, time.time()),
    )
    return get(con, cur.lastrowid)


def get(con: sqlite3.Connection, job_id: int) -> Job:
    row = con.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
    if row is None:
        raise ConveyorError(f"no job {job_id}; `conveyor status` lists the jobs")
    return Job.from_row(row)


def all_jobs(con: sqlite3.Connection) -> list[Job]:
    return [Job.from_row(r) for r in con.execute("SELECT * FROM jobs ORDER BY id")]


def waiting(con: sqlite3.Connection) -> list[Job]:
    """Jobs waiting to train, in the order they will train."""
    rows = con.execute(f"SELECT * FROM jobs WHERE state IN ('queued', 'interrupted') ORDER BY {QUEUE_ORDER}")
    return [Job.from_row(r) for r in rows]


def of_data(con: sqlite3.Connection, fingerprint: str) -> list[Job]:
    """The jobs of these bytes, oldest first (an index seek: the cost of taking in a file never grows with the
    number of jobs)."""
    rows = con.execute("SELECT * FROM jobs WHERE fingerprint = ? ORDER BY id", (fingerprint,))
    return [Job.from_row(r) for r in rows]


def failed_mentioning(con: sqlite3.Connection, text: str) -> list[Job]:
    """Failed jobs whose reason mentions `text` (e.g. a stored copy they stopped for), oldest first."""
    rows = con.execute("SELECT * FROM jobs WHERE state = 'failed' AND instr(error, ?) > 0 ORDER BY id", (text,))
    return [Job.from_row(r) for r in rows]


def restore(con: sqlite3.Connection, row: dict) -> None:
    """Put a job row back as it was, its id kept (doctor --repair rebuilding the table from the checkpoint
    manifests and the old database): the columns given, the others at their defaults."""
    con.execute(f"INSERT INTO jobs ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", list(row.values()))


def running(con: sqlite3.Connection) -> Job | None:
    """The job being trained, if any (one worker trains at a time; the lowest id should there be more)."""
    row = con.execute("SELECT * FROM jobs WHERE state = 'running' ORDER BY id LIMIT 1").fetchone()
    return Job.from_row(row) if row else None


def running_and_waiting(con: sqlite3.Connection) -> list[Job]:
    """The running job (if any), then the waiting ones in the order they will train."""
    rows = con.execute("SELECT * FROM jobs WHERE state IN ('running', 'queued', 'interrupted')"
                       f" ORDER BY state = 'running' DESC, {QUEUE_ORDER}")
    return [Job.from_row(r) for r in rows]


def claim_next(con: sqlite3.Connection, claim: str) -> Job | None:
    """Take the next waiting job for one worker (atomic): it becomes `running` under this claim, or None."""
    with transaction(con):
        row = con.execute(f"SELECT * FROM jobs WHERE state IN ('queued', 'interrupted') ORDER BY {QUEUE_ORDER}"
                          " LIMIT 1").fetchone()
        if row is None:
            return None
        job = Job.from_row(row)
        return transition(con, job.id, JobState.RUNNING, expect=job.state, claim=claim)


def transition(con: sqlite3.Connection, job_id: int, new: JobState, *, expect: JobState | tuple[JobState, ...],
               claim: str | None = None, owner: str | None = None, reopen: bool = False, **fields) -> Job:
    """Compare-and-set: move the job from one of `expect` to `new` (only along TRANSITIONS, or REOPEN for
    reconciliation) and update columns; with `owner`, only while the job is still under that claim.

    Raises Conflict if the job was not in an expected state (someone else moved it first)."""
    expected = (expect,) if isinstance(expect, JobState) else tuple(expect)
    for old in expected:
        allowed = REOPEN.get(old, set()) | TRANSITIONS[old] if reopen else TRANSITIONS[old]
        if new != old and new not in allowed:
            raise ConveyorError(f"job {job_id} cannot go from {old.value} to {new.value}")
    fields["state"] = new.value
    if claim is not None:
        fields["claim"] = claim
    if new == JobState.RUNNING:
        fields.setdefault("started_at", time.time())
    if new in (JobState.DONE, JobState.FAILED, JobState.SKIPPED):
        fields.setdefault("finished_at", time.time())
    elif reopen:
        fields.setdefault("finished_at", None)
    where = f"id = ? AND state IN ({', '.join('?' * len(expected))})" + (" AND claim = ?" if owner else "")
    args = (*_encode(fields).values(), job_id, *(s.value for s in expected), *((owner,) if owner else ()))
    columns = ", ".join(f"{key} = ?" for key in fields)
    if con.execute(f"UPDATE jobs SET {columns} WHERE {where}", args).rowcount != 1:
        now = get(con, job_id)
        raise Conflict(f"job {job_id} is {now.state.value}, not {' or '.join(s.value for s in expected)}"
                       + (" under this worker's claim" if owner and now.claim != owner else "")
                       + f"; it was changed by someone else, so {new.value} was not recorded")
    return get(con, job_id)


def update(con: sqlite3.Connection, job_id: int, *, expect: JobState | tuple[JobState, ...] | None = None,
           owner: str | None = None, **fields) -> None:
    """Update columns other than the state; with `expect`/`owner`, only if the job is still in that state/claim."""
    where, args = "id = ?", [job_id]
    if expect is not None:
        expected = (expect,) if isinstance(expect, JobState) else tuple(expect)
        where += f" AND state IN ({', '.join('?' * len(expected))})"
        args += [s.value for s in expected]
    if owner is not None:
        where += " AND claim = ?"
        args.append(owner)
    fields = _encode(fields)
    columns = ", ".join(f"{key} = ?" for key in fields)
    if con.execute(f"UPDATE jobs SET {columns} WHERE {where}", (*fields.values(), *args)).rowcount != 1 and (
            expect is not None or owner is not None):
        raise Conflict(f"job {job_id} changed underneath (now {get(con, job_id).state.value}); nothing was recorded")


def _encode(fields: dict) -> dict:
    for key in ("warnings", "excluded", "holdout", "overrides", "reference"):
        if key in fields and not isinstance(fields[key], str):
            fields[key] = json.dumps(fields[key])
    return fields


def add_warning(con: sqlite3.Connection, job: Job, message: str) -> None:
    job.warnings.append(message)
    update(con, job.id, warnings=job.warnings)


def started_text(job: Job) -> str:
    """What a reporter says when a job (or the rest of one) starts training."""
    where = (f"global {job.start_step}–{job.end_step}" if not job.steps_done else
             f"its steps {job.steps_done + 1}–{job.planned_steps} at global {job.segment_start}–{job.end_step}")
    return (f"job {job.id} {job.file} ({short(job.fingerprint)}): {job.examples} examples × {job.epochs} epoch(s) "
            f"→ {job.planned_steps} step{'s' if job.planned_steps != 1 else ''}, {where}")


def finished_text(job: Job) -> str:
    return f"job {job.id} done: global steps {job.start_step}–{job.end_step}"
