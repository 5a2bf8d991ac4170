"""Reconcile the database with the checkpoints on disk before training: the manifests are the truth.

Picks the active run (a new one when the configuration's identity no longer matches, law 5), its
newest verified checkpoint (law 5/6), and puts back in the queue every step trained after it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from . import checkpoints as ck
from . import jobs, ledger, runs
from . import manifest as mf
from .config import Config
from .jobs import Job, JobState
from .workspace import Workspace

Say = Callable[[str, str], None]


@dataclass
class Placement:
    """Where training continues: the run and the checkpoint to start from (None: the base model)."""
    run: runs.Run
    resume: ck.Checkpoint | None

    def position_of(self, job: Job) -> tuple[int, int]:
        """(steps done, examples done) of `job` inside the resume checkpoint; (0, 0) if it starts fresh."""
        if self.resume is None or self.resume.manifest[mf.K_JOB_END]:
            return 0, 0
        info = self.resume.manifest[mf.K_JOB]
        if info[mf.J_ID] != job.id:
            return 0, 0
        return info[mf.J_STEPS_DONE], info[mf.J_POSITION]


def place(ws: Workspace, config: Config, model_path: str, say: Say, world_size: int = 1) -> Placement:
    """The run to train in and its checkpoint; jobs trained past that checkpoint go back to the queue."""
    ident = runs.identity(config, model_path)
    run = runs.active(ws.db)
    resume = newest_checkpoint(ws, run, say) if run else None
    if run is not None:
        recorded = resume.manifest[mf.K_IDENTITY] if resume else run.identity
        if recorded != ident:
            return Placement(new_run(ws, run, recorded, ident, say), None)
    if run is None:
        run = runs.create(ws.db, ident)
        say("info", f"started {run.id} from {config.model.name} ({config.adapter.method})")
        return Placement(run, None)
    rewind(ws, run, resume, say)
    if resume is not None:
        state_setting_changes(resume, config, say, world_size)
    return Placement(run, resume)


def newest_checkpoint(ws: Workspace, run: runs.Run, say: Say) -> ck.Checkpoint | None:
    run_dir = ws.run_dir(run.id)
    for leftover in ck.clean_temporary(run_dir):
        say("warning", f"removed {leftover.name}: a checkpoint write that never finished (never resumable)")
    resume, problems = ck.newest_verified(run_dir)
    for problem in problems:
        if ck.step_of(problem.path) is None:
            say("warning", f"not resuming from {problem.path.name}: {problem.reason}; it is left in place")
            continue
        # Its step trains again and needs the folder name; the unusable copy is kept, never deleted.
        kept = ck.set_aside(run_dir, problem)
        say("warning", f"not resuming from {problem.path.name}: {problem.reason}; "
            f"kept for inspection in {kept.relative_to(ws.root)}")
    if problems and resume:
        say("warning", f"using the newest verified checkpoint, {resume.path.name}")
    return resume


def new_run(ws: Workspace, old: runs.Run, recorded: dict, ident: dict, say: Say) -> runs.Run:
    """Start a new run at step 0; the old run's folder and rows stay as they are."""
    changes = runs.differences(recorded, ident)
    say("warning", f"the configuration does not match {old.id}'s checkpoints in {len(changes)} field(s):\n  "
        + "\n  ".join(changes) + f"\n{old.id} is kept untouched; a new run starts at step 0 from the base model.")
    run = runs.create(ws.db, ident, note=f"new identity after {old.id}: " + "; ".join(changes))
    for job in jobs.all_jobs(ws.db):
        if job.state == JobState.RUNNING:  # its steps so far stay in the old run; it starts over in the new one
            jobs.transition(ws.db, job, JobState.QUEUED, run_id=None, steps_done=0, start_step=None, end_step=None)
    return run


def rewind(ws: Workspace, run: runs.Run, resume: ck.Checkpoint | None, say: Say) -> None:
    """Make the database agree with the checkpoint: what was trained after it is lost and trains again."""
    step = resume.step if resume else 0
    lost = ledger.forget_after(ws.db, run.id, step)
    if lost:
        say("info", f"{lost} step(s) after {'step ' + str(step) if step else 'the start'} were lost "
            "(crash or unusable checkpoint) and train again")
    ledger.supersede_after(ws.db, run.id, step)
    runs.set_step(ws.db, run.id, step)
    run.global_step = step
    inside = resume.manifest[mf.K_JOB][mf.J_ID] if resume and not resume.manifest[mf.K_JOB_END] else None
    ended = resume.manifest[mf.K_JOB][mf.J_ID] if resume and resume.manifest[mf.K_JOB_END] else None
    for job in jobs.all_jobs(ws.db):
        if job.run_id != run.id or job.state not in (JobState.DONE, JobState.RUNNING):
            continue
        if job.id == ended and job.state == JobState.RUNNING:
            # Stopped between its last checkpoint and being marked done: it is done, nothing trains again.
            ledger.record(ws.db, run_id=run.id, job_id=job.id, start_step=job.start_step, end_step=step,
                          examples=job.examples, epochs=job.epochs, tokens=job.tokens * job.epochs, outcome="done")
            jobs.transition(ws.db, job, JobState.DONE, steps_done=job.planned_steps)
            say("info", f"job {job.id} ({job.file}) had finished at step {step} before the stop; recorded as done")
        elif job.id == inside:
            if job.state == JobState.DONE:
                say("warning", f"job {job.id} ({job.file}) reopens at step {step + 1}: its later checkpoints "
                    "are unusable")
            jobs.transition(ws.db, job, JobState.RUNNING, reopen=True)
        elif job.start_step is not None and job.start_step > step:
            if job.state == JobState.DONE:
                say("warning", f"job {job.id} ({job.file}) trains again: its checkpoints are unusable")
            jobs.transition(ws.db, job, JobState.QUEUED, reopen=True, steps_done=0, start_step=None, end_step=None)


def state_setting_changes(resume: ck.Checkpoint, config: Config, say: Say, world_size: int) -> None:
    """Settings outside the identity (learning rate, batch, ...) are applied to the same run, and said."""
    from .worker import hyperparameters

    before = resume.manifest.get(mf.K_HPARAMS, {})
    now = hyperparameters(config, world_size)
    changes = [f"training.{k}: {before.get(k)} → {now[k]}" for k in now if before.get(k) != now[k]]
    if changes:
        say("info", f"settings changed since {resume.path.name}, applied from step {resume.step + 1} in the same "
            "run: " + "; ".join(changes))
