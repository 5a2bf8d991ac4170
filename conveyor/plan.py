"""Step arithmetic and data order of a job (laws 1 and 2): owned here, never derived by the Trainer."""

from __future__ import annotations

import hashlib
import math

import numpy as np

from .errors import PlanError


def planned_steps(total: int, per_step: int, steps_done: int = 0, position: int = 0) -> int:
    """Law 1: ceil(examples × epochs / (batch × grad_accum × world_size)), the last partial step included.

    Mid-job (steps_done steps have trained `position` examples) the rest is planned from the position, so
    a batch size changed in between neither skips nor repeats an example."""
    return steps_done + math.ceil(max(total - position, 0) / per_step)


def require_steps(steps: int, examples: int, epochs: int, file: str) -> int:
    """A job that would train 0 steps is an error with its reason, never a quiet success."""
    if steps <= 0:
        raise PlanError(
            f"{file}: would train 0 steps ({examples} trainable examples × {epochs} epochs); "
            "check that the file has examples that fit training.max_length"
        )
    return steps


def epoch_order(seed: int, fingerprint: str, epoch: int, n: int) -> np.ndarray:
    """The permutation of example indices for one epoch, fixed by (run seed, job fingerprint, epoch)."""
    key = hashlib.sha256(f"{seed}:{fingerprint}:{epoch}".encode()).digest()
    rng = np.random.Generator(np.random.PCG64(int.from_bytes(key[:16], "little")))
    return rng.permutation(n)


class JobOrder:
    """Example index at every position of a job, epochs laid end to end; lookup is O(1) in the position."""

    def __init__(self, seed: int, fingerprint: str, n_examples: int, epochs: int):
        self.n = n_examples
        self.epochs = epochs
        self._orders = [epoch_order(seed, fingerprint, e, n_examples) for e in range(epochs)]

    def __len__(self) -> int:
        return self.n * self.epochs

    def __getitem__(self, position: int) -> tuple[int, int]:
        """(epoch, example index) at a position of the job."""
        epoch, offset = divmod(position, self.n)
        return epoch, int(self._orders[epoch][offset])


def examples_per_step(batch: int, grad_accum: int, world_size: int = 1) -> int:
    return batch * grad_accum * world_size
