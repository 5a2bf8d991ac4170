"""Jobs: one dataset file to train, its states and the only allowed transitions between them."""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from enum import Enum

from .errors import ConveyorError


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
    JobState.RUNNING: {JobState.DONE, JobState.FAILED, JobState.SKIPPED, JobState.QUEUED},
    JobState.DONE: set(),
    JobState.FAILED: {JobState.QUEUED},
    JobState.SKIPPED: set(),
    JobState.REJECTED: set(),
}

# Reconciliation alone may reopen a finished job: when its later checkpoints turn out unusable, its steps
# after the newest verified checkpoint must train again (never silently lost).
REOPEN: dict[JobState, set[JobState]] = {
    JobState.DONE: {JobState.RUNNING, JobState.QUEUED},
    JobState.RUNNING: {JobState.RUNNING, JobState.QUEUED},
}

PRIORITIES = {"high": 0, "normal": 1, "low": 2}
PRIORITY_NAMES = {v: k for k, v in PRIORITIES.items()}


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
    attempts: int
    kept: str | None
    truncated: int
    excluded: list[int]
    warnings: list[str]
    error: str | None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> "Job":
        return cls(
            id=row["id"], run_id=row["run_id"], file=row["file"], source=row["source"], stored=row["stored"],
            fingerprint=row["fingerprint"], format=row["format"], priority=row["priority"],
            state=JobState(row["state"]), examples=row["examples"], tokens=row["tokens"], epochs=row["epochs"],
            planned_steps=row["planned_steps"], start_step=row["start_step"], end_step=row["end_step"],
            steps_done=row["steps_done"], attempts=row["attempts"], kept=row["kept"], truncated=row["truncated"],
            excluded=json.loads(row["excluded"] or "[]"), warnings=json.loads(row["warnings"]), error=row["error"],
        )

    def to_json(self) -> dict:
        return {
            "id": self.id, "run_id": self.run_id, "file": self.file, "source": self.source,
            "fingerprint": self.fingerprint, "format": self.format, "priority": PRIORITY_NAMES[self.priority],
            "state": self.state.value, "examples": self.examples, "tokens": self.tokens, "epochs": self.epochs,
            "planned_steps": self.planned_steps, "start_step": self.start_step, "end_step": self.end_step,
            "steps_done": self.steps_done, "attempts": self.attempts, "kept": self.kept,
            "truncated": self.truncated, "excluded_lines": self.excluded,
            "warnings": self.warnings, "error": self.error,
        }


def insert(con: sqlite3.Connection, *, file: str, source: str, stored: str, fingerprint: str,
           priority: int, state: JobState, format: str | None = None, examples: int | None = None,
           epochs: int | None = None, error: str | None = None) -> Job:
    cur = con.execute(
        "INSERT INTO jobs (file, source, stored, fingerprint, format, priority, state, examples, epochs, error,"
        " created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (file, source, stored, fingerprint, format, priority, state.value, examples, epochs, error, time.time()),
    )
    return get(con, cur.lastrowid)


def get(con: sqlite3.Connection, job_id: int) -> Job:
    row = con.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
    if row is None:
        raise ConveyorError(f"no job {job_id}; `conveyor status` lists the jobs")
    return Job.from_row(row)


def all_jobs(con: sqlite3.Connection) -> list[Job]:
    return [Job.from_row(r) for r in con.execute("SELECT * FROM jobs ORDER BY id")]


def next_queued(con: sqlite3.Connection) -> Job | None:
    """The job to train next: a running one left by a crash first, then by priority, then arrival."""
    row = con.execute(
        "SELECT * FROM jobs WHERE state IN ('running', 'queued')"
        " ORDER BY state = 'running' DESC, priority, id LIMIT 1"
    ).fetchone()
    return Job.from_row(row) if row else None


def transition(con: sqlite3.Connection, job: Job, new: JobState, reopen: bool = False, **fields) -> Job:
    """Move a job to a new state (only along TRANSITIONS, or REOPEN for reconciliation) and update columns."""
    allowed = REOPEN.get(job.state, set()) if reopen else TRANSITIONS[job.state]
    if new != job.state and new not in allowed:
        raise ConveyorError(f"job {job.id} cannot go from {job.state.value} to {new.value}")
    fields["state"] = new.value
    if new == JobState.RUNNING and job.state != JobState.RUNNING:
        fields.setdefault("started_at", time.time())
    if new in (JobState.DONE, JobState.FAILED, JobState.SKIPPED):
        fields.setdefault("finished_at", time.time())
    if reopen:
        fields.setdefault("finished_at", None)
    update(con, job.id, **fields)
    return get(con, job.id)


def update(con: sqlite3.Connection, job_id: int, **fields) -> None:
    for key in ("warnings", "excluded"):
        if key in fields and not isinstance(fields[key], str):
            fields[key] = json.dumps(fields[key])
    columns = ", ".join(f"{key} = ?" for key in fields)
    con.execute(f"UPDATE jobs SET {columns} WHERE id = ?", (*fields.values(), job_id))


def add_warning(con: sqlite3.Connection, job: Job, message: str) -> None:
    job.warnings.append(message)
    update(con, job.id, warnings=job.warnings)
