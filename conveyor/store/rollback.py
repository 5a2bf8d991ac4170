"""Rollback as a branch, never a deletion: `conveyor rollback vN` starts a new run from version N's checkpoint.

The new run's first checkpoint is a copy of the version's (weights, optimizer, scheduler, RNG), at the version's
global step, its manifest naming the run and version it branched from; its next job starts at that step + 1
(law 1 within the new run). The parent run stays byte-identical: nothing of it is moved, rewritten or deleted,
only its open ledger segments get their rows, as when any run is left.

Jobs waiting to train go on in the new run: one stopped mid-way before the version resumes from its position in
the version's manifest; one begun after the version starts over. Jobs the parent trained after the version are
listed; `--requeue` queues them again (new jobs, in their order, each remembering the job it repeats).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path

from .. import testhooks
from ..errors import ConveyorError
from . import checkpoints as ck
from . import controls, jobs, ledger, pending, runs
from . import manifest as mf
from .database import log_event, transaction
from .jobs import Job, JobState
from .lock import daemon_pid, serial
from .reconcile import FRESH, rewind
from .versions import checkpoint, find, name
from .workspace import Workspace


def rollback(ws: Workspace, version: str, requeue: bool) -> dict:
    """Branch a new active run from `version`, one rollback at a time (a second one started meanwhile waits, then
    finds the run branched: nothing to do); see _rollback."""
    with serial(ws, "rollback"):
        return _rollback(ws, version, requeue)


def _rollback(ws: Workspace, version: str, requeue: bool) -> dict:
    """Branch a new active run from `version`; returns what was done (run, step, jobs listed and requeued).

    Crash-atomic: the version's checkpoint is copied into a temporary run folder; one transaction records the
    new run, its requeued jobs and the activation (and seals the copy's manifest, which names those jobs); only
    then does the folder get its run's name. A cut before the commit leaves nothing (the next command removes the
    copy), a cut after it is finished by the next command (pending.recover)."""
    db = ws.db
    pending.recover(ws)
    row = find(db, version)
    parent, found, _ = checkpoint(db, ws.runs, version)
    source, manifest = found.path, found.manifest
    _refuse_while_busy(ws)
    done = _already(ws, row, requeue)
    if done is not None:
        return done
    run_id = runs.next_id(db)
    final, tmp = ws.run_dir(run_id), ws.runs / f".tmp-{run_id}-{os.getpid()}"
    if final.exists():
        raise ConveyorError(f"{final} already exists but {ws.root / 'conveyor.db'} knows no {run_id}; "
                            "`conveyor doctor` says what it holds")
    step = row["step"]
    with pending.intent(ws, pending.ROLLBACK, run=run_id, parent=parent.id, version_id=row["id"], tmp=str(tmp),
                        final=str(final)):
        testhooks.failpoint("rollback-begun", step)
        _copy_checkpoint(source, tmp, step)
        testhooks.failpoint("rollback-copied", step)
        with transaction(db):
            _refuse_while_busy(ws)
            later = [j for j in jobs.all_jobs(db) if j.run_id == parent.id and j.state == JobState.DONE
                     and (j.end_step or 0) > step]
            requeued = _requeue(db, later, run_id, manifest) if requeue else {}
            copy = replace(manifest, run_id=run_id, branched_from={"run": parent.id, "version": version, "step": step},
                           open_jobs=[replace(p, job_id=requeued.get(p.job_id, p.job_id)) for p in manifest.open_jobs])
            _seal(tmp, copy)
            placed = _activate(ws, parent, copy, runs.Run(run_id, manifest.identity, step, True, 0.0,
                                                          f"rolled back to {version} ({parent.id} at step {step})",
                                                          parent.id, row["id"]))
            testhooks.failpoint("rollback-sealed", step)
        testhooks.failpoint("rollback-committed", step)
        pending.move_into_place(tmp, final)
        testhooks.failpoint("rollback-renamed", step)
    text = (f"{run_id} branches from {version} ({parent.id}, step {step}); its next job starts at step "
            f"{step + 1}. {parent.id} is kept as it is.")
    if later:
        listed = ", ".join(f"job {j.id} ({j.file}, steps {j.start_step}–{j.end_step})" for j in later)
        text += (f" Trained in {parent.id} after {version}: {listed}; "
                 + ("queued again as " + ", ".join(f"job {n}" for n in requeued.values()) if requeue
                    else "`conveyor rollback " + version + " --requeue` would queue them again") + ".")
    text += _identity_note(ws, manifest, version)
    log_event(db, "warning", "rollback", text)
    placed = [f"job {new} ({j.file}) resumes in {run_id} at its step {manifest.position_of(j.id).steps_done + 1}, "
              "where it stood at the version" for j in later for old, new in requeued.items()
              if old == j.id and manifest.position_of(j.id)] + placed
    for message in placed:
        log_event(db, "info", "message", message)
    return {"run": run_id, "parent_run": parent.id, "parent_version": version, "step": step,
            "after": [{"job": j.id, "file": j.file, "start_step": j.start_step, "end_step": j.end_step}
                      for j in later],
            "requeued": [{"job": new, "from": old} for old, new in requeued.items()],
            "message": " ".join([text, *placed])}


def _already(ws: Workspace, row, requeue: bool) -> dict | None:
    """A retry of a rollback that went through (perhaps cut off at its very end, and finished since): the active
    run already branches from this version and has trained nothing since, with the later jobs requeued if asked.
    Said, and nothing done twice."""
    db, active = ws.db, runs.active(ws.db)
    if active is None or active.parent_version != row["id"] or active.global_step != row["step"]:
        return None
    later = [j for j in jobs.all_jobs(db) if j.run_id == active.parent_run and j.state == JobState.DONE
             and (j.end_step or 0) > row["step"]]
    copies = {r["requeued_from"]: r["id"] for r in db.execute(
        "SELECT id, requeued_from FROM jobs WHERE requeued_from IS NOT NULL AND state IN ('queued', 'interrupted')")}
    if requeue and any(j.id not in copies for j in later):
        return None
    requeued = [{"job": copies[j.id], "from": j.id} for j in later if j.id in copies]
    text = (f"{active.id} already branches from {name(row['id'])} ({active.parent_run}, step {row['step']}) and has "
            "trained nothing since; nothing to do" + (f" (jobs {', '.join(str(r['job']) for r in requeued)} are "
                                                      "queued again)" if requeued else ""))
    return {"run": active.id, "parent_run": active.parent_run, "parent_version": name(row["id"]),
            "step": row["step"], "after": [{"job": j.id, "file": j.file, "start_step": j.start_step,
                                            "end_step": j.end_step} for j in later],
            "requeued": requeued, "message": text}


def _activate(ws: Workspace, parent: runs.Run, copy: mf.Manifest, new: runs.Run) -> list[str]:
    """Inside the rollback's transaction: the run left agrees with its newest checkpoint, the new run becomes the
    active one, and waiting jobs stand where its first checkpoint says. Returns what was said."""
    db = ws.db
    placed: list[str] = []
    left = runs.active(db)  # the parent, or a later run
    if left is not None:  # its rows agree with its newest checkpoint, as a start would make them
        newest, _ = ck.newest_verified(ws.run_dir(left.id), save=False)  # writes nothing there
        rewind(ws, left, newest, lambda level, text: placed.append(text))
        for pos in newest.manifest.under_way() if newest else []:
            ledger.close_overtaken(db, left.id, pos)  # its open segments get their rows
    runs.create(db, new.identity, new.note, run_id=new.id, step=new.global_step, parent_run=new.parent_run,
                parent_version=new.parent_version)
    return placed + _place_waiting(db, copy, left.id if left else parent.id, new.id)


def _identity_note(ws: Workspace, manifest: mf.Manifest, version: str) -> str:
    """Law 5 still decides on the next start: if conveyor.toml no longer matches the version's identity, say so."""
    try:
        config = ws.config()
    except ConveyorError:
        return ""
    changes = runs.differences(manifest.identity, runs.identity(config, ws.model_path(config.model.name)))
    if not changes:
        return ""
    return (f" Note: conveyor.toml does not match {version}'s identity ({'; '.join(changes)}): the next start would "
            f"leave this run for a new one from the base model; set those keys back to train on from {version}.")


def _refuse_while_busy(ws: Workspace) -> None:
    """A rollback changes the active run only while no daemon could start a job meanwhile: none runs, or its
    queue is paused between jobs. Without a daemon, a `running` job is a crash's leftover (placed like the other
    waiting jobs)."""
    if daemon_pid(ws) is None:
        return
    busy = jobs.running(ws.db)
    if busy:
        raise ConveyorError(f"job {busy.id} ({busy.file}) is training; a rollback starts a new run only "
                            "between jobs. `conveyor stop` (the job keeps its place), roll back, then `conveyor run`")
    if not controls.paused(ws.db):
        raise ConveyorError("the daemon may start the next job at any moment; `conveyor pause` first, roll back, "
                            "then `conveyor resume`")


def _requeue(db, later: list[Job], run_id: str, manifest: mf.Manifest) -> dict[int, int]:
    """New jobs for the parent's jobs after the version, in their order: {old job id: new job id}. One that was
    stopped mid-way at the version is interrupted at its position there (it resumes in the new run); the others
    are queued."""
    out = {}
    with transaction(db):
        for j in later:
            pos = manifest.position_of(j.id)
            new = jobs.insert(db, file=j.file, source=j.source, stored=j.stored, fingerprint=j.fingerprint,
                              priority=j.priority, state=JobState.INTERRUPTED if pos else JobState.QUEUED,
                              format=j.format, examples=j.examples, epochs=j.epochs, overrides=j.overrides)
            # The same held-out set as before (its examples were never trained in the lineage either).
            jobs.update(db, new.id, requeued_from=j.id, holdout=j.holdout)
            if pos is not None:
                jobs.update(db, new.id, run_id=run_id, steps_done=pos.steps_done, position=pos.position,
                            planned_steps=pos.planned_steps, start_step=pos.start_step, end_step=pos.end_step,
                            segment_start=pos.segment_start)
            out[j.id] = new.id
    return out


def _place_waiting(db, manifest: mf.Manifest, left: str, run_id: str) -> list[str]:
    """Waiting jobs of the run left stand where the new run's first checkpoint says: stopped mid-way at the
    version (its manifest has them), or not begun."""
    said = []
    for job in jobs.all_jobs(db):
        if job.state not in (JobState.QUEUED, JobState.INTERRUPTED) or job.run_id != left:
            continue
        pos = manifest.position_of(job.id)
        if pos is not None:
            jobs.transition(db, job.id, JobState.INTERRUPTED, expect=job.state, claim=None, run_id=run_id,
                            steps_done=pos.steps_done, position=pos.position, planned_steps=pos.planned_steps,
                            start_step=pos.start_step, end_step=pos.end_step, segment_start=pos.segment_start)
            said.append(f"job {job.id} ({job.file}) resumes in {run_id} at its step {pos.steps_done + 1}, where "
                        "it stood at the version")
        elif job.state == JobState.INTERRUPTED:
            jobs.transition(db, job.id, JobState.QUEUED, expect=job.state, **FRESH)
            said.append(f"job {job.id} ({job.file}) had begun in {left} but not by the version; it starts from "
                        f"its first example in {run_id}")
    return said


def _copy_checkpoint(source: Path, run_dir: Path, step: int) -> None:
    """The version's checkpoint files copied into a (temporary) run folder, without its manifest (`_seal`)."""
    shutil.copytree(source, ck.checkpoints_dir(run_dir) / ck.folder_name(step),
                    ignore=shutil.ignore_patterns(mf.MANIFEST))


def _seal(run_dir: Path, manifest: mf.Manifest) -> None:
    """The copy's manifest written and flushed, the copy verified, LATEST pointing at it."""
    folder = ck.checkpoints_dir(run_dir) / ck.folder_name(manifest.global_step)
    ck.seal_copy(folder, manifest)
    mf.verify(folder)
    ck.point_latest(run_dir, folder.name)


def lineage(db, run: runs.Run) -> str | None:
    """`run-0003 ← v1 of run-0001 (step 2)`, for status; None for a run that is not a rollback's."""
    if not run.parent_run:
        return None
    row = db.execute("SELECT step FROM versions WHERE id = ?", (run.parent_version,)).fetchone()
    return f"{run.id} ← {name(run.parent_version)} of {run.parent_run}" + (f" (step {row['step']})" if row else "")
