"""Step arithmetic and data order of a job (laws 1 and 2): owned here, never derived by the Trainer."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace

import numpy as np

from ..errors import PlanError


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



@dataclass(frozen=True)
class Position:
    """Where a job stands: steps and examples done (epochs end to end), and where its current segment began.

    A job trains in one or more segments of consecutive global steps (a higher-priority job may run in
    between); which examples it trains never depends on which global steps it got (law 2)."""
    job_id: int
    fingerprint: str
    examples: int  # trainable examples of the job's file
    epochs: int
    planned_steps: int
    steps_done: int = 0
    position: int = 0
    start_step: int = 0  # global step of the job's first step ever (0: not started)
    segment_start: int = 0  # global step of the current segment's first step
    segment_base: int = 0  # steps_done when the current segment began
    # Replay (replay.fraction), fixed when the job is first planned: the earlier jobs whose trained examples
    # are mixed in, and how many replayed examples the job's positions interleave with its own.
    replay_sources: tuple[int, ...] = ()
    replay_count: int = 0

    @property
    def own_total(self) -> int:
        return self.examples * self.epochs

    @property
    def total(self) -> int:
        """Positions of the job: its own examples × epochs, and the replayed ones between them."""
        return self.own_total + self.replay_count

    @property
    def own_position(self) -> int:
        """Own examples trained so far (the position without the replayed ones)."""
        return self.position - replayed_before(self.position, self.replay_count, self.total)

    @property
    def epoch(self) -> int:
        return self.own_position // self.examples

    @property
    def position_in_epoch(self) -> int:
        return self.own_position % self.examples

    @property
    def finished(self) -> bool:
        return self.steps_done >= self.planned_steps

    @property
    def last_step(self) -> int:
        """Global step of the job's latest trained step (segment_start - 1 before its first in this segment)."""
        return self.segment_start + self.steps_done - self.segment_base - 1

    @property
    def end_step(self) -> int:
        """Global step where the job ends if nothing runs in between."""
        return self.segment_start + self.planned_steps - self.segment_base - 1

    def next_step_examples(self, per_step: int) -> int:
        """Examples the next optimizer step trains: a full step, or what is left of the job."""
        return min(per_step, self.total - self.position)

    def after_step(self, per_step: int) -> "Position":
        return replace(self, steps_done=self.steps_done + 1, position=self.position + self.next_step_examples(per_step))

    def replan(self, per_step: int) -> "Position":
        """The same segment going on, its remaining steps planned from the position for this step size."""
        return replace(self, planned_steps=planned_steps(self.total, per_step, self.steps_done, self.position))

    def begin_segment(self, base_step: int, per_step: int) -> "Position":
        """Continue at global step base_step + 1. The rest is re-planned from the position, so a batch size
        changed in between neither skips nor repeats an example."""
        return replace(self.replan(per_step), start_step=self.start_step or base_step + 1,
                       segment_start=base_step + 1, segment_base=self.steps_done)

    def to_json(self) -> dict:
        return {"id": self.job_id, "fingerprint": self.fingerprint, "examples": self.examples,
                "epochs": self.epochs, "planned_steps": self.planned_steps, "steps_done": self.steps_done,
                "position": self.position, "epoch": self.epoch, "position_in_epoch": self.position_in_epoch,
                "start_step": self.start_step, "segment_start": self.segment_start,
                "segment_base": self.segment_base,
                **({"replay": {"sources": list(self.replay_sources), "count": self.replay_count}}
                   if self.replay_count else {})}

    @classmethod
    def from_json(cls, data: dict) -> "Position":
        return cls(job_id=data["id"], fingerprint=data["fingerprint"], examples=data["examples"],
                   epochs=data["epochs"], planned_steps=data["planned_steps"], steps_done=data["steps_done"],
                   position=data["position"], start_step=data["start_step"], segment_start=data["segment_start"],
                   segment_base=data["segment_base"], replay_sources=tuple(data.get("replay", {}).get("sources", ())),
                   replay_count=data.get("replay", {}).get("count", 0))


def fresh(job_id: int, fingerprint: str, examples: int, epochs: int, replay_sources: tuple[int, ...] = (),
          replay_count: int = 0) -> Position:
    """A job that has not trained a step yet (its plan is fixed by begin_segment)."""
    return Position(job_id, fingerprint, examples, epochs, planned_steps=0, replay_sources=tuple(replay_sources),
                    replay_count=replay_count)


def replayed_before(position: int, replay: int, total: int) -> int:
    """Replayed positions among the first `position` of a job that interleaves `replay` of `total` evenly: slot k
    is replayed when floor((k + 1) × replay / total) steps up. O(1), so a resume finds its place at once."""
    return position * replay // total if total else 0


def is_replayed(position: int, replay: int, total: int) -> bool:
    return replayed_before(position + 1, replay, total) > replayed_before(position, replay, total)
