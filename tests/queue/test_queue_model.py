"""Model-based test of the queue (see queue_model.py): random sequences of adds, stops, skips, pauses,
removals, SIGKILLs at failpoints, restarts, settings and identity changes; the laws checked after each step.

The default run replays a fixed set of sequences (derandomized); the slow run walks many more. A failure
prints the sequence as a program to replay it.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings
from queue_model import STATS, QueueMachine


def _run(tiny_dir, examples: int, steps: int) -> None:
    QueueMachine.tiny_dir = tiny_dir
    # A fresh subclass per call: @settings may be applied to a class only once per process.
    machine = settings(max_examples=examples, stateful_step_count=steps, deadline=None, derandomize=True,
                       database=None, suppress_health_check=list(HealthCheck), print_blob=True)(
        type("QueueMachineRun", (QueueMachine,), {}))
    STATS.clear()
    machine.TestCase().runTest()
    print(f"queue model: {dict(STATS)}")  # shown with -s; quoted in the closing note
    assert STATS["sequences"] >= examples and STATS["drains"] > 0 and STATS["steps trained"] > 0


def test_random_sequences_keep_the_laws(tiny_dir):
    _run(tiny_dir, examples=int(os.environ.get("CONVEYOR_MODEL_EXAMPLES", 10)), steps=8)


@pytest.mark.slow
def test_many_more_random_sequences_keep_the_laws(tiny_dir):
    _run(tiny_dir, examples=int(os.environ.get("CONVEYOR_MODEL_EXAMPLES_SLOW", 60)), steps=12)
