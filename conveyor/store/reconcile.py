"""Reconcile the database with the checkpoints on disk before training: the manifests are the truth.

Picks the active run (a new one when the configuration's identity no longer matches, law 5), its
newest verified checkpoint (law 5/6), and puts back in the queue every step trained after it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .. import testhooks
from ..config import Config
from ..data.formats import PREFERENCE_FORMATS
from ..errors import ConveyorError
from . import checkpoints as ck
from . import jobs, ledger, pending, runs
from . import manifest as mf
from .consistency import refuse_to_train
from .database import transaction
from .jobs import Job, JobState
from .workspace import Workspace

Say = Callable[[str, str], None]


@dataclass
class Placement:
    """Where training continues: the run and the checkpoint to start from (None: the base model)."""
    run: runs.Run
    resume: ck.Checkpoint | None

    @property
    def step(self) -> int:
        return self.resume.step if self.resume else 0


def place(ws: Workspace, config: Config, model_path: str, say: Say, world_size: int = 1) -> Placement:
    """The run to train in and its checkpoint; jobs trained past that checkpoint go back to the queue."""
    ident = runs.identity(config, model_path)
    pending.recover(ws)  # a rollback (or another multi-step command) cut off: finished or undone first
    refuse_to_train(ws)  # a damaged database, or one that does not match the runs on disk, never trains
    run = runs.active(ws.db)
    # Read-only (the hash cache too): a run left for a new identity stays byte-identical.
    resume, problems = ck.newest_verified(ws.run_dir(run.id), save=False) if run else (None, [])
    if run is not None:
        recorded = resume.manifest.identity if resume else run.identity
        if recorded != ident:
            # The old run's folder stays byte-identical (leftovers included); its rows are left as its
            # checkpoints say, every segment closed. One transaction: a cut leaves the old run active, as before.
            with transaction(ws.db):
                rewind(ws, run, resume, say)
                for pos in resume.manifest.under_way() if resume else []:
                    ledger.close_overtaken(ws.db, run.id, pos)  # every open segment gets its row
                testhooks.failpoint("new-run", run.global_step)
                earlier = _earlier_run(ws, run, ident)
                if earlier is None:
                    return Placement(new_run(ws, run, recorded, ident, say), None)
                run, resume, problems = earlier
                _back_to(ws, run, recorded, ident, resume, say)
        tidy(ws, run, resume, problems, say)
    if run is None:
        run = runs.create(ws.db, ident)
        say("info", f"started {run.id} from {config.model.name} ({config.adapter.method})")
        return Placement(run, None)
    rewind(ws, run, resume, say)
    if resume is not None:
        state_setting_changes(resume, config, say, world_size, _own_settings(ws, resume))
    return Placement(run, resume)


def _own_settings(ws: Workspace, resume: ck.Checkpoint) -> set[str]:
    """The training settings the checkpoint's job had of its own, not conveyor.toml's: its `--set` keys, and the
    learning rate of a preference or feedback job (training.preference_learning_rate)."""
    try:
        job = jobs.get(ws.db, resume.manifest.job.job_id)
    except ConveyorError:  # removed since
        return set()
    own = {key.partition(".")[2] for key in (job.overrides or {}) if key.startswith("training.")}
    return own | ({"learning_rate"} if job.format in PREFERENCE_FORMATS else set())


def tidy(ws: Workspace, run: runs.Run, resume: ck.Checkpoint | None, problems: list, say: Say) -> None:
    """Before resuming a run: remove cut-off checkpoint writes and set unusable checkpoints aside, saying so."""
    run_dir = ws.run_dir(run.id)
    for leftover in ck.clean_temporary(run_dir):
        say("warning", f"removed {leftover.name}: a checkpoint write that never finished (never resumable)")
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


def _earlier_run(ws: Workspace, left: runs.Run, ident: dict):
    """The newest other run whose newest verified checkpoint (or, with none, whose record) has this identity, with
    that checkpoint and what failed verification; None when the identity was never trained."""
    for run in reversed(runs.all_runs(ws.db)):
        if run.id == left.id:
            continue
        resume, problems = ck.newest_verified(ws.run_dir(run.id), save=False)
        if (resume.manifest.identity if resume else run.identity) == ident:
            return run, resume, problems
    return None


def _back_to(ws: Workspace, run: runs.Run, recorded: dict, ident: dict, resume, say: Say) -> None:
    """Continue `run` (the settings are its identity again): it becomes active; jobs under way in the run left
    start over in it, as for a new run."""
    changes = runs.differences(recorded, ident)
    left = runs.active(ws.db)
    runs.activate(ws.db, run.id)
    where = f"its newest checkpoint, {resume.path.name}" if resume else "the base model (it has no checkpoint)"
    say("warning", f"the configuration does not match {left.id}'s checkpoints in {len(changes)} field(s):\n  "
        + "\n  ".join(changes) + f"\nit matches {run.id}, which continues from {where}; {left.id} is kept "
        "untouched.")
    for job in jobs.all_jobs(ws.db):
        if job.state in (JobState.RUNNING, JobState.INTERRUPTED) and job.run_id != run.id:
            jobs.transition(ws.db, job.id, JobState.QUEUED, expect=job.state, **FRESH)
            say("warning", f"job {job.id} ({job.file}) had trained {job.steps_done} step(s) in {job.run_id}; "
                f"it starts from its first example in {run.id}")


def new_run(ws: Workspace, old: runs.Run, recorded: dict, ident: dict, say: Say) -> runs.Run:
    """Start a new run at step 0; the old run's folder and rows stay as they are."""
    changes = runs.differences(recorded, ident)
    say("warning", f"the configuration does not match {old.id}'s checkpoints in {len(changes)} field(s):\n  "
        + "\n  ".join(changes) + f"\n{old.id} is kept untouched; a new run starts at step 0 from the base model.")
    run = runs.create(ws.db, ident, note=f"new identity after {old.id}: " + "; ".join(changes))
    for job in jobs.all_jobs(ws.db):
        if job.state in (JobState.RUNNING, JobState.INTERRUPTED):
            # Its steps so far stay in the old run (and its ledger); it starts over in the new one.
            jobs.transition(ws.db, job.id, JobState.QUEUED, expect=job.state, **FRESH)
            say("warning", f"job {job.id} ({job.file}) had trained {job.steps_done} step(s) in {old.id}; "
                f"it starts from its first example in {run.id}")
    return run


# Columns of a job that has not trained a step (in the current run).
FRESH = {"run_id": None, "steps_done": 0, "position": 0, "start_step": None, "end_step": None,
         "segment_start": None, "planned_steps": None, "claim": None}


def rewind(ws: Workspace, run: runs.Run, resume: ck.Checkpoint | None, say: Say) -> None:
    """Make the database agree with the checkpoint: what was trained after it is lost and trains again; every
    job under way at it (the one that trained that step, and those stopped mid-way before) stands where the
    manifest says."""
    step = resume.step if resume else 0
    manifest = resume.manifest if resume else None
    lost = ledger.forget_after(ws.db, run.id, step)
    if lost:
        say("info", f"{lost} step(s) after {'step ' + str(step) if step else 'the start'} were lost "
            "(crash or unusable checkpoint) and train again")
    ledger.supersede_after(ws.db, run.id, step)
    runs.set_step(ws.db, run.id, step)
    run.global_step = step
    for job in jobs.all_jobs(ws.db):
        if job.run_id == run.id and job.state in (JobState.DONE, JobState.RUNNING, JobState.INTERRUPTED):
            _place_job(ws, run, job, manifest, step, say)
        elif job.state == JobState.RUNNING:  # claimed, but its worker died before it planned a step
            jobs.transition(ws.db, job.id, JobState.QUEUED, expect=job.state, **FRESH)


def _place_job(ws: Workspace, run: runs.Run, job: Job, manifest: mf.Manifest | None, step: int, say: Say) -> None:
    if manifest is not None and manifest.job.job_id == job.id and manifest.job_end:
        if job.state != JobState.DONE:  # its last checkpoint was written, the record of it was not
            ledger.close_segment(ws.db, run.id, job.id, JobState.DONE, manifest.job, expect=job.state,
                                 tokens=ledger.segment_tokens(ws.db, run.id, job.id, manifest.job.segment_start, step))
            say("info", f"job {job.id} ({job.file}) had finished at step {step} before the stop; recorded as done")
        return
    pos = manifest.position_of(job.id) if manifest else None
    if pos is not None:
        if job.state == JobState.DONE:
            say("warning", f"job {job.id} ({job.file}) reopens at its step {pos.steps_done + 1}: its later "
                "checkpoints are unusable")
        jobs.transition(ws.db, job.id, JobState.INTERRUPTED, expect=job.state, reopen=True, claim=None,
                        steps_done=pos.steps_done, position=pos.position, planned_steps=pos.planned_steps,
                        start_step=pos.start_step, end_step=pos.end_step, segment_start=pos.segment_start)
        return
    if job.state == JobState.DONE and job.end_step is not None and job.end_step <= step:
        return  # finished before the checkpoint
    # Not under way at the checkpoint and not finished by it: everything it trained came after, and is lost.
    if job.state == JobState.DONE or job.steps_done:
        say("warning", f"job {job.id} ({job.file}) trains again from its first example: none of its steps is in "
            f"a usable checkpoint (the newest verified one is {'step ' + str(step) if step else 'none'})")
    jobs.transition(ws.db, job.id, JobState.QUEUED, expect=job.state, reopen=True, **FRESH)


def state_setting_changes(resume: ck.Checkpoint, config: Config, say: Say, world_size: int,
                          own: set[str] = frozenset()) -> None:
    """Settings outside the identity (learning rate, batch, ...) are applied to the same run, and said; those the
    checkpoint's job had of its own (`own`: its `--set`, a preference job's learning rate) are no change."""
    before = resume.manifest.hyperparameters
    now = mf.hyperparameters(config, world_size)
    section = {"attn_implementation": "model", "world_size": "distributed", "strategy": "distributed"}
    changes = [f"{section.get(k, 'training')}.{k}: {before.get(k)} → {now[k]}" for k in now  # else [training]
               if before.get(k) != now[k] and before.get(k) is not None and k not in own]
    new_keys = [k for k in now if k not in before]  # a manifest written before the setting existed
    if new_keys:
        changes.append(f"recorded from now on: {', '.join(new_keys)}")
    if changes:
        say("info", f"settings changed since {resume.path.name}, applied from step {resume.step + 1} in the same "
            "run: " + "; ".join(changes))
    layout = layout_change(resume, before, now)
    if layout:
        say("warning" if "not the same steps" in layout else "info", layout)


def layout_change(resume: ck.Checkpoint, before: dict, now: dict) -> str | None:
    """What a changed world size or distributed.strategy does to the run, in words (issue 17's exactness): the data
    order stays exact (law 2: each rank's slice is re-derived from the global order), the weights are loaded exactly
    (resharded, or converted between whole and sharded files), and the steps after are the uninterrupted run's
    within float tolerance when the examples per step stay the same, another trajectory when they do not."""
    old_world, old_strategy = before.get("world_size"), before.get("strategy") or "ddp"
    if old_world in (None, now["world_size"]) and old_strategy == now["strategy"]:
        return None
    name = resume.path.name
    held = resume.manifest.sharded
    if resume.manifest.identity.get("adapter.method") == "lora":  # the adapter is whole under either strategy
        load = (f"the adapter and its optimizer state are whole in {name}; the base model is loaded "
                + ("sharded across the ranks" if now["strategy"] == "fsdp" and now["world_size"] > 1
                   else "whole on every rank" if now["world_size"] > 1 else "whole"))
    elif held and now["strategy"] == "fsdp":
        load = f"weights and optimizer state resharded from {name}'s {held['world_size']} shard(s) (DCP)"
    elif held:
        load = f"{name} is sharded (written under fsdp): every rank loads it whole (DCP)"
    elif now["strategy"] == "fsdp":
        load = f"{name} holds whole-model files (written under ddp): they are loaded sharded"
    else:
        load = "every rank loads the whole model"
    pos = resume.manifest.job if not resume.manifest.job_end else None
    where = f"job {pos.job_id} re-planned from example {pos.position} of its order; " if pos else ""
    per = lambda h: h.get("batch_size", 0) * h.get("grad_accum", 0) * (h.get("world_size") or 1)
    head = (f"world size {old_world} → {now['world_size']}" if old_world not in (None, now["world_size"])
            else f"distributed.strategy {old_strategy} → {now['strategy']}")
    if per(before) == per(now) and now["world_size"] == (old_world or 1) == 1:
        return (f"{head}: {where}{load}: exactly; one process either way, so the steps that follow are bitwise "
                "those of an unchanged run")
    if per(before) == per(now):
        return (f"{head}: {where}{load}: exactly, so the steps that follow are those of an unchanged run within "
                f"float tolerance, not bitwise (gradients are summed over {now['world_size']} process(es) in "
                f"another order; {per(now)} examples a step as before)")
    return (f"{head}: {where}now {per(now)} examples a step (was {per(before)}: training.batch_size × "
            f"training.grad_accum × processes); every example still trains once, in the same order, but these are "
            f"not the same steps: the weights follow another trajectory than at {per(before)} a step. {load}")
