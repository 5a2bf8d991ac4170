"""The Trainer glue's bookkeeping around the loop: what a step's recorded time covers, and the garbage collector
left alone during training and given back afterwards."""

from __future__ import annotations

import gc
import sqlite3
import time

from conftest import run_cli, text_file

from conveyor.train import trainer


class _Clock:
    """trainer.py's `time`, with a perf_counter that jumps when told to: a setup that took "an hour", no waiting."""

    def __init__(self):
        self.offset = 0.0

    def perf_counter(self) -> float:
        return time.perf_counter() + self.offset

    def __getattr__(self, name):
        return getattr(time, name)


def test_a_steps_time_covers_the_loop_not_the_trainers_setup(workspace, tmp_path, monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(trainer, "time", clock)
    restore = trainer.restore_optimizer

    def slow_setup(*a, **kw):  # the last setup before the loop starts
        clock.offset += 3600.0
        return restore(*a, **kw)

    monkeypatch.setattr(trainer, "restore_optimizer", slow_setup)
    ws = workspace()
    assert run_cli(ws, "train", text_file(tmp_path / "a.jsonl", 16), "-q").code == 0
    con = sqlite3.connect(ws / "conveyor.db")
    times = [t for (t,) in con.execute("SELECT step_time FROM metrics ORDER BY step")]
    con.close()
    assert len(times) == 2 and all(0 <= t < 3600 for t in times), times


def test_the_collector_leaves_training_alone_and_is_given_back_after(workspace, tmp_path, monkeypatch):
    frozen = []
    step_end = trainer._JobCallback.on_step_end
    monkeypatch.setattr(trainer._JobCallback, "on_step_end",
                        lambda self, *a, **kw: frozen.append(gc.get_freeze_count()) or step_end(self, *a, **kw))
    ws = workspace()
    assert gc.get_freeze_count() == 0
    assert run_cli(ws, "train", text_file(tmp_path / "a.jsonl", 16), "-q").code == 0
    assert len(frozen) == 2 and all(n > 0 for n in frozen)
    assert gc.get_freeze_count() == 0


def test_a_collector_frozen_by_the_host_process_is_left_as_it_was(workspace, tmp_path):
    ws = workspace()
    gc.freeze()
    try:
        assert run_cli(ws, "train", text_file(tmp_path / "a.jsonl", 16), "-q").code == 0
        assert gc.get_freeze_count() > 0  # not unfrozen by conveyor
    finally:
        gc.unfreeze()
