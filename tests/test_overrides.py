"""Per-job settings (`conveyor add FILE --set KEY=VALUE`): the job trains with them and conveyor.toml's for the
others, they are kept with the job and shown in the ledger, and keys of the run's identity are refused."""

from __future__ import annotations

import json

from conftest import adapter_weights, ledger, max_abs_diff, run_cli, status, text_file


def test_a_jobs_own_settings_train_it_as_conveyor_toml_would_and_show_in_the_ledger(workspace, tmp_path):
    ws = workspace()  # batch 4 × grad_accum 2: 8 examples a step
    a, b = text_file(tmp_path / "a.jsonl", 16, "a"), text_file(tmp_path / "b.jsonl", 16, "b")
    r = run_cli(ws, "add", a, "--set", "training.learning_rate=5e-3", "--set", "training.batch_size=8")
    assert r.code == 0, r.out + r.err
    assert run_cli(ws, "train", b, "-q").code == 0
    rows = ledger(ws)
    assert [(x["job"], x["start_step"], x["end_step"], x["overrides"]) for x in rows] == [
        (1, 1, 1, {"training.learning_rate": 0.005, "training.batch_size": 8}), (2, 2, 3, {})]
    assert status(ws)["jobs"][0]["overrides"] == {"training.learning_rate": 0.005, "training.batch_size": 8}
    assert "0.005" in run_cli(ws, "history").out  # the table shows it with the job's outcome
    # The same job with those values in conveyor.toml gives the same weights.
    same = workspace("same", training={"learning_rate": 5e-3, "batch_size": 8})
    assert run_cli(same, "train", a, "-q").code == 0
    assert max_abs_diff(adapter_weights(ws / "runs/run-0001/checkpoints/step-000001"),
                        adapter_weights(same / "runs/run-0001/checkpoints/step-000001")) <= 1e-6


def test_keys_of_the_run_identity_and_bad_values_are_refused_before_anything_is_queued(workspace, tmp_path):
    ws = workspace()
    a = text_file(tmp_path / "a.jsonl", 8, "a")
    r = run_cli(ws, "add", a, "--set", "adapter.r=4", "--set", "training.seed=7", "--set", "daemon.max_attempts=1",
                "--set", "nonsense", subprocess_=True)  # the real command line: the usage message unboxed
    assert r.code == 2  # a usage error, as a bad --epochs is
    assert "--set adapter.r: part of the run's identity (law 5)" in r.err
    assert "--set training.seed: not a per-job setting" in r.err and "--set daemon.max_attempts" in r.err
    assert "--set 'nonsense': write it as KEY=VALUE" in r.err
    r = run_cli(ws, "add", a, "--set", "training.batch_size=0", subprocess_=True)
    assert r.code == 2 and "training.batch_size: Input should be greater than or equal to 1" in r.err
    assert status(ws)["jobs"] == []


def test_training_epochs_set_for_a_job_is_its_epochs(workspace, tmp_path):
    ws = workspace()
    r = run_cli(ws, "add", text_file(tmp_path / "a.jsonl", 8, "a"), "--set", "training.epochs=3")
    assert r.code == 0, r.out + r.err
    job = json.loads(run_cli(ws, "queue", "--json").out)[0]
    assert job["epochs"] == 3 and job["overrides"] == {"training.epochs": 3}
