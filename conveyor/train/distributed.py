"""Data parallel training (torchrun): rank 0 decides (controls, checkpoints, the database) and the other
ranks follow its broadcast decisions, so every process stops, saves and pauses at the same step."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

# A pause may hold the other ranks at a collective for days; the default 30 minute timeout would kill them. A lost
# host is the daemon's to notice instead, within distributed.timeout_seconds: an agent that exits, a rank that stops
# beating, or no new step while not paused ends the attempt (launch.py), pause or no pause.
TIMEOUT = timedelta(days=30)


def init_from_env(backend: str = "auto") -> None:
    """Join the process group torchrun describes in the environment (no-op for a single process)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend, timeout=TIMEOUT)


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def broadcast(obj):
    """Rank 0's value of obj, on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj) -> list | None:
    """Every rank's obj, as a list on rank 0 (None elsewhere)."""
    if not active():
        return [obj]
    out = [None] * world() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


def barrier() -> None:
    """Every rank waits here until all have arrived (no-op for a single process)."""
    if active():
        dist.barrier()
