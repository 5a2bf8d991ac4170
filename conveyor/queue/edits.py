"""Changing the queue by hand (`conveyor queue move|remove`): compare-and-set, so a job the daemon claims at
the same moment is never both trained and removed."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .. import testhooks
from ..data.kept import REASON, kept_path
from ..errors import ConveyorError
from ..store import jobs, pending
from ..store.jobs import Conflict, JobState
from ..store.workspace import Workspace


def move(ws: Workspace, job_id: int, priority: int) -> str:
    """Change a waiting job's priority."""
    found = jobs.get(ws.db, job_id)
    if found.state not in jobs.WAITING:
        raise ConveyorError(f"job {job_id} is {found.state.value}; only queued or interrupted jobs can be moved")
    try:
        jobs.update(ws.db, job_id, expect=jobs.WAITING, priority=priority)
    except Conflict:
        raise ConveyorError(f"job {job_id} started training just now; it can no longer be moved") from None
    return f"job {job_id} ({found.file}) now has priority {jobs.PRIORITY_NAMES[priority]}"


def remove(ws: Workspace, job_id: int, reason: str) -> str:
    """Take a waiting job out of the queue (skipped, with the reason); its file is kept in removed/.

    An interrupted job keeps the steps it trained in the ledger; its remaining examples are never trained."""
    pending.recover(ws)
    found = jobs.get(ws.db, job_id)
    if found.state not in jobs.WAITING:
        raise ConveyorError(f"job {job_id} is {found.state.value}; only queued or interrupted jobs can be removed"
                            + (" (use `conveyor skip` for the running one)" if found.state == JobState.RUNNING
                               else ""))
    folder = ws.root / "removed"
    kept = kept_path(folder, job_id, found.file)
    paths = {"tmp": str(folder / f".tmp-{kept.name}-{os.getpid()}"), "kept": str(kept),
             "tmp_reason": str(folder / f".tmp-{kept.name}{REASON}-{os.getpid()}"), "reason": str(kept) + REASON}
    trained = f" after {found.steps_done} of {found.planned_steps} steps" if found.steps_done else ""
    with pending.intent(ws, pending.REMOVE, job=job_id, **paths):
        shutil.copyfile(found.stored, paths["tmp"])
        Path(paths["tmp_reason"]).write_text(reason + "\n", encoding="utf-8")
        testhooks.failpoint("remove-copied", job_id)
        try:
            jobs.transition(ws.db, job_id, JobState.SKIPPED, expect=found.state,
                            error=f"{pending.REMOVED}{trained}: {reason}")
        except Conflict:
            raise ConveyorError(f"job {job_id} started training just now; use `conveyor skip` to stop it") from None
        testhooks.failpoint("remove-committed", job_id)
        pending.finish(ws, pending.REMOVE, {**paths, "job": job_id})
    return f"removed job {job_id}{trained}; its file is kept at {kept}"
