"""Training state that carries from step to step and job to job: optimizer, LR schedule, every rank's RNG,
and writing them with the weights and the manifest as one checkpoint."""

from __future__ import annotations

import random
import shutil
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..config import Config
from ..data.plan import Position
from ..errors import CheckpointError
from ..store import checkpoints as ck
from ..store import manifest as mf
from ..testhooks import fill_disk
from . import distributed, sharding
from .sharding import holds_shards


def rng_file(rank: int) -> str:
    return mf.RNG if rank == 0 else mf.RNG.replace(".pt", f"-rank{rank}.pt")


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def make_scheduler(config: Config, optimizer, planned_steps: int):
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    t = config.training
    if t.schedule == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, t.warmup_steps, planned_steps)
    return get_constant_schedule_with_warmup(optimizer, t.warmup_steps)


def apply_learning_rate(scheduler, lr: float) -> None:
    """Set the configured peak LR at the scheduler's position (an LR change is applied, not a new run)."""
    scheduler.base_lrs = [lr for _ in scheduler.base_lrs]
    for group, fn in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"] = lr
        group["lr"] = lr * fn(scheduler.last_epoch)
    scheduler._last_lr = [g["lr"] for g in scheduler.optimizer.param_groups]


def _whole_weights(model) -> dict:
    """save_pretrained's keyword for an adapter on a base sharded across the ranks (LoRA under distributed.strategy =
    "fsdp"): only the weights every rank holds whole, the adapter's among them. Left to itself, peft gathers every
    sharded base weight into the state dict it filters (a collective that rank 0 alone, which saves, would enter).
    Nothing for a model held whole."""
    from torch.distributed.tensor import DTensor


    if not holds_shards(model):
        return {}
    return {"state_dict": {k: v for k, v in model.state_dict().items() if not isinstance(v, DTensor)}}


def trained_adapter(model) -> dict:
    """save_pretrained's keyword that keeps a preference job's frozen reference adapter (preference.REFERENCE) out of
    the checkpoint: only the adapter that trains is saved. Nothing for a model with one adapter or none."""
    adapters = getattr(model, "peft_config", None)
    if not adapters or len(adapters) == 1:
        return {}
    return {"selected_adapters": [name for name in adapters if name != "reference"]}


def save_checkpoint(run_dir: Path, manifest: mf.Manifest, model, optimizer, scheduler, rng_states: list,
                    retention) -> Path:
    """Weights (adapter or full), optimizer, scheduler and every rank's RNG, written atomically with the manifest;
    `retention` is training's settings (keep_checkpoints, keep_job_ends, prune_version_weights)."""
    def save(folder: Path) -> None:
        model.save_pretrained(folder, **_whole_weights(model), **trained_adapter(model))
        torch.save(optimizer.state_dict(), folder / mf.OPTIMIZER)
        torch.save(scheduler.state_dict(), folder / mf.SCHEDULER)
        for r, state in enumerate(rng_states):
            torch.save(state, folder / rng_file(r))

    return ck.write(run_dir, manifest.global_step, save, manifest, retention.keep_checkpoints,
                    retention.keep_job_ends, retention.prune_version_weights).path


def save_sharded_checkpoint(run_dir: Path, step: int, manifest: mf.Manifest | None, model, optimizer, scheduler,
                            rng_states: list | None, retention) -> Path | None:
    """Every rank (distributed.strategy = "fsdp"): its shards of the weights and the optimizer state (DCP), then rank 0
    adds config, scheduler and every rank's RNG and seals the folder with the manifest (write_sharded).
    manifest and rng_states are rank 0's (None elsewhere); returns the checkpoint's path on rank 0."""
    def save(folder: Path) -> None:
        sharding.save_config(folder, model)
        torch.save(scheduler.state_dict(), folder / mf.SCHEDULER)
        for r, state in enumerate(rng_states):
            torch.save(state, folder / rng_file(r))

    found = write_sharded(run_dir, step, lambda folder: sharding.save_state(folder, model, optimizer), save,
                             manifest, retention.keep_checkpoints, retention.keep_job_ends,
                             retention.prune_version_weights)
    return found.path if found else None


def write_sharded(run_dir: Path, step: int, shards: Callable[[Path], None], save: Callable[[Path], None],
                  content: mf.Manifest | None, keep: int, job_ends: int,
                  prune_weights: bool = False) -> ck.Checkpoint | None:
    """A sharded checkpoint; every rank calls this. Rank 0 names the temporary folder (the workspace is shared, so it
    is the same path on every rank), every rank writes its shards into it (`shards`, DCP's collective save), and
    once all have (a barrier) rank 0 adds its own files and seals the folder as checkpoints.write does: every shard
    and DCP's .metadata hashed into the manifest, verified, renamed, then retention. Returns the checkpoint on rank 0, None
    on the others; what fails on rank 0 is raised on every rank (content: rank 0's manifest, None elsewhere)."""
    main = distributed.is_main()
    tmp, failed = ck.temporary(run_dir, step), None
    if main:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            fill_disk("checkpoint", step)
        except OSError as e:
            failed = e
    # Rank 0's folder (or why it has none), on every rank: it also holds them until the folder exists.
    tmp, told = distributed.broadcast((tmp, failed and str(failed)))
    if failed:
        raise ck.disk_full(run_dir, ck.folder_name(step)) if ck.no_space(failed) else failed
    if told:
        raise CheckpointError(f"rank 0 could not make the temporary folder of {ck.folder_name(step)}: {told}")
    try:
        shards(tmp)
        distributed.barrier()  # every rank's shards are written (and flushed: DCP syncs its files) before the seal
    except Exception as e:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        if ck.no_space(e):
            raise ck.disk_full(run_dir, ck.folder_name(step)) from e
        raise
    if not main:
        failed = distributed.broadcast(None)
        if failed:
            raise CheckpointError(f"rank 0 could not seal checkpoint {ck.folder_name(step)}: {failed}")
        return None
    try:
        found = ck.write(run_dir, step, save, content, keep, job_ends, prune_weights, shards=tmp)
    except Exception as e:
        distributed.broadcast(str(e) or type(e).__name__)
        raise
    distributed.broadcast(None)
    return found


def restore_rng(folder: Path, rank: int, world_size: int, say=None) -> None:
    """This rank's RNG from the checkpoint. A rank the checkpoint has none for (the world size grew since it was
    written) is re-seeded from (rank, step), and rank 0 says so: the run goes on, not bit-exact across the change."""
    missing = [r for r in range(world_size) if not (folder / rng_file(r)).exists()]
    if rank == 0 and missing and say:
        say("warning", f"{folder.name} has no RNG state for rank(s) {', '.join(map(str, missing))} (written "
                  f"with fewer processes than the {world_size} now): they are re-seeded; the job continues from "
                  "its exact position, but dropout noise is not bit-exact with an unchanged world size")
    if rank not in missing:
        set_rng_state(torch.load(folder / rng_file(rank), weights_only=False))
        return
    from transformers.trainer_utils import set_seed

    set_seed(1_000_003 * rank + int(folder.name.split("-")[1]))


def pruned_moments(checkpoint: ck.Checkpoint) -> str | None:
    """Why a checkpoint has no optimizer state to resume (retention pruned it from an older version, which a
    rollback may branch from), in words; None when it has one."""
    by = checkpoint.manifest.optimizer_pruned
    if by is None and checkpoint.manifest.has_optimizer:
        return None
    origin = checkpoint.manifest.branched_from
    what = f"{checkpoint.path.name} of {checkpoint.manifest.run_id}" + (
        f" (a copy of {origin['version']} of {origin['run']})" if origin else "")
    why = f"optimizer state pruned by retention ({by})" if by else f"it lists no {mf.OPTIMIZER}"
    return (f"{what} has no optimizer state: {why}. The optimizer moments start from zero at step "
            f"{checkpoint.step + 1}; weights, position and learning-rate schedule carry on (so this is not "
            "bit-exact with a run that kept its moments)")


def restore_optimizer(config: Config, optimizer, resume: Path | None, start: Position, moments: bool = True,
                      model=None):
    """Optimizer and LR schedule as the resume checkpoint left them; returns the scheduler.

    The constant schedule runs once per run, so it continues from the checkpoint. The cosine schedule belongs
    to the job: it is rebuilt for this job and advanced to the job's own step (another job may have run since).
    moments=False keeps the optimizer's fresh state (training.optimizer changed: the saved one does not fit).
    A full fine-tune under distributed.strategy = "fsdp", or from a sharded checkpoint, restores its moments
    through DCP (sharding.py), which needs the model the optimizer steps."""
    t = config.training
    scheduler = make_scheduler(config, optimizer, start.planned_steps)
    if resume is not None:
        configured = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
        if moments and (sharding.sharded_checkpoints(config) or sharding.is_sharded(resume)):
            sharding.restore_optimizer(model, optimizer, resume)
        elif moments:
            optimizer.load_state_dict(torch.load(resume / mf.OPTIMIZER, weights_only=False))
        # The saved param_groups carry the settings of the job that saved them (weight_decay, betas, eps): put the
        # configured ones back, so that a setting changed between jobs applies. The LR is the scheduler's, below.
        for group, now in zip(optimizer.param_groups, configured):
            group.update({k: v for k, v in now.items() if k not in ("lr", "initial_lr")})
        if t.schedule == "cosine":
            scheduler = make_scheduler(config, optimizer, start.planned_steps)
            with warnings.catch_warnings():  # stepping a schedule without optimizer steps is what we mean here
                warnings.simplefilter("ignore")
                for _ in range(start.steps_done):
                    scheduler.step()
        else:
            scheduler.load_state_dict(torch.load(resume / mf.SCHEDULER, weights_only=False))
    apply_learning_rate(scheduler, t.learning_rate)
    return scheduler
