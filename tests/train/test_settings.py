"""Settings outside the run identity change within a run and take effect from the next job (law: a setting either
applies or conveyor says it cannot); inf and nan are refused where a setting is read; a run that trains to nan stops
at its last good checkpoint with a message, never `done`."""

from __future__ import annotations

import json
import math

import pytest
from conftest import adapter_weights, make_workspace, max_abs_diff, run_cli, set_setting, status, text_file

from conveyor.store import checkpoints as ck

SMALL = {"training": {"batch_size": 4, "grad_accum": 2, "learning_rate": 1e-2, "save_every": 2, "max_length": 64}}
# Each setting a job may change, with a value whose effect on two steps of the tiny model is plain.
CHANGES = [("training.weight_decay", "100.0"), ("training.learning_rate", "0.05"), ("training.max_grad_norm", "0.001"),
           ("training.warmup_steps", "50"), ("training.schedule", '"cosine"')]


def _two_jobs(root, tiny_dir, *second_args: str):
    """Job a (16 examples: 2 steps), then job b (16 examples) with `second_args`; the newest checkpoint's weights."""
    ws = make_workspace(root, tiny_dir, **SMALL)
    a, b = text_file(root / "a.jsonl", 16, "a"), text_file(root / "b.jsonl", 16, "b")
    assert run_cli(ws, "train", a, "-q").code == 0
    r = run_cli(ws, "train", b, "-q", *second_args)
    assert r.code == 0, r.out + r.err
    newest = ck.numbered(ws / "runs" / "run-0001")[-1]
    assert newest.name == "step-000004"
    return ws, adapter_weights(newest)


@pytest.fixture(scope="module")
def unchanged(tmp_path_factory, tiny_dir):
    return _two_jobs(tmp_path_factory.mktemp("unchanged") / "ws", tiny_dir)[1]


@pytest.mark.parametrize("key, value", CHANGES)
def test_a_setting_set_for_the_second_job_moves_its_weights(tmp_path, tiny_dir, unchanged, key, value):
    """`train b --set KEY=VALUE` after `train a`: the weights differ from the run without the setting (the
    resumed optimizer's saved param_groups no longer override weight_decay)."""
    _, changed = _two_jobs(tmp_path / "ws", tiny_dir, "--set", f"{key}={value}")
    assert max_abs_diff(unchanged, changed) > 1e-4, key


def test_a_setting_changed_in_conveyor_toml_between_jobs_moves_the_weights(tmp_path, tiny_dir, unchanged):
    """The same through conveyor.toml: weight_decay changed after job a applies to job b."""
    ws = make_workspace(tmp_path / "ws", tiny_dir, **SMALL)
    assert run_cli(ws, "train", text_file(tmp_path / "a.jsonl", 16, "a"), "-q").code == 0
    set_setting(ws, "training", "weight_decay", "100.0")
    r = run_cli(ws, "train", text_file(tmp_path / "b.jsonl", 16, "b"))
    assert r.code == 0, r.out + r.err
    assert "applied from step 3 in the same run: training.weight_decay: 0.0 → 100.0" in r.out
    assert max_abs_diff(unchanged, adapter_weights(ck.numbered(ws / "runs" / "run-0001")[-1])) > 1e-4


@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_non_finite_settings_are_refused_where_they_are_read(workspace, tmp_path, value):
    """inf and nan in conveyor.toml or --set name the key and the default; nothing is queued."""
    ws = workspace()
    data = text_file(tmp_path / "a.jsonl", 16)
    r = run_cli(ws, "add", data, "--set", f"training.weight_decay={value}", "--set", f"eval.holdout={value}",
                subprocess_=True)  # the real command line: its usage message unboxed
    assert r.code == 2
    assert f"training.weight_decay: must be a finite number (found {float(value)!r}); the default is 0.0" in r.err
    assert f"eval.holdout: must be a finite number (found {float(value)!r}); the default is 0" in r.err
    set_setting(ws, "training", "weight_decay", value)
    r = run_cli(ws, "train", data)
    assert r.code == 1 and "training.weight_decay: must be a finite number" in r.err, r.out + r.err
    assert status(ws)["queue"] == []


def test_a_run_that_trains_to_nan_stops_at_its_last_good_checkpoint(workspace, tmp_path):
    """weight_decay = 1e30 blows the adapter up at step 2: the job stops there with a message (exit 1), stays
    interrupted at step 1 (its last finite checkpoint, the newest there is), the ledger has no `done` row, and
    nothing non-finite is on disk."""
    ws = workspace(training={"save_every": 1})
    r = run_cli(ws, "train", text_file(tmp_path / "f.jsonl", 40), "--set", "training.weight_decay=1e30")
    assert r.code == 1, r.out + r.err
    assert "job 1 stopped at global step 2: the weight" in r.err and "holds inf or nan after the step" in r.err
    assert "nothing after checkpoint step-000001 is kept" in r.err and "training.weight_decay (1e+30)" in r.err
    assert "it stays interrupted at its step 1 of 5" in r.err
    [job] = status(ws)["queue"]
    assert (job["state"], job["steps_done"], job["position"], job["error"]) == ("interrupted", 1, 8, None)
    assert json.loads(run_cli(ws, "history", "--json").out) == []  # no segment ended: nothing in the ledger
    folders = ck.numbered(ws / "runs" / "run-0001")
    assert [f.name for f in folders] == ["step-000001"]
    assert all(math.isfinite(float(w.abs().max())) for w in adapter_weights(folders[0]).values())


def test_a_nan_loss_between_checkpoints_stops_the_job_before_the_next_one(workspace, tmp_path):
    """With no checkpoint due for steps, the logged loss (or gradient norm) going nan is what stops the job: no
    checkpoint is ever written, and the job waits before its first step."""
    ws = workspace(training={"save_every": 100})
    r = run_cli(ws, "train", text_file(tmp_path / "f.jsonl", 40), "--set", "training.weight_decay=1e30")
    assert r.code == 1, r.out + r.err
    assert "job 1 stopped at global step" in r.err and ("its loss was nan" in r.err or "gradient norm was" in r.err)
    assert "nothing after the start is kept" in r.err and "it stays queued, before its first step" in r.err
    assert ck.numbered(ws / "runs" / "run-0001") == []
    [job] = status(ws)["queue"]
    assert (job["state"], job["steps_done"]) == ("queued", 0)
