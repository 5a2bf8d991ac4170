"""Running out of memory is a state, not a crash loop: the job stops at its last checkpoint with the levers and
the peak memory named, is never marked failed nor retried with the same settings, and a later run finishes it
exactly once (laws 2, 3). The OOM comes from a test failpoint (CONVEYOR_FAILPOINT="oom:<step>")."""

from __future__ import annotations

from collections import Counter

import pytest
from conftest import adapter_weights, audit, max_abs_diff, run_cli, status, text_file

EXAMPLES, STEPS = 24, 6  # batch 2 × grad_accum 2
SETTINGS = {"training": {"batch_size": 2, "grad_accum": 2, "save_every": 2, "max_length": 48},
            "adapter": {"dropout": 0.1}}
LEVERS = ("training.batch_size", "training.grad_accum", "training.max_length", "training.gradient_checkpointing",
          "model.quantization")


def _job(ws) -> dict:
    (job,) = status(ws)["jobs"]
    return job


def _final(ws):
    return adapter_weights(ws / "runs" / status(ws)["run"]["id"] / "checkpoints" / f"step-{STEPS:06d}")


def _exactly_once(ws) -> None:
    rows = audit(ws)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert Counter(line for r in rows for line in r["lines"]) == Counter(range(1, EXAMPLES + 1))


def test_accelerator_oom_stops_at_the_last_checkpoint_then_a_second_train_finishes(workspace, tmp_path,
                                                                                   monkeypatch):
    data = text_file(tmp_path / "d.jsonl", EXAMPLES)
    reference = workspace("reference", **SETTINGS)
    assert run_cli(reference, "train", data, "-q").code == 0
    ws = workspace("ws", **SETTINGS)
    monkeypatch.setenv("CONVEYOR_FAILPOINT", "oom:3")  # after step 3 trained, before it is checkpointed
    r = run_cli(ws, "train", data, "-q")
    out = r.out + r.err
    assert r.code != 0, out
    assert "job 1 ran out of accelerator memory (OutOfMemoryError: CUDA out of memory" in out
    assert "peak memory: " in out and "peak resident memory of the training process" in out  # no CUDA here
    for lever in LEVERS:
        assert lever in out, (lever, out)
    assert "stopped: job 1 ran out of memory (see above); it stays interrupted at its step 2 of 6" in out
    job = _job(ws)
    assert (job["state"], job["steps_done"], job["position"], job["attempts"]) == ("interrupted", 2, 8, 0)
    assert job["error"] is None
    assert status(ws)["run"]["global_step"] == 2
    assert [r["step"] for r in audit(ws)] == [1, 2]  # step 3 was never checkpointed: it trains again
    monkeypatch.delenv("CONVEYOR_FAILPOINT")
    r = run_cli(ws, "run", "--drain", "-q")
    assert r.code == 0, r.out + r.err
    assert "job 1 resumes at global step 3 from step-000002" in r.out + r.err
    assert _job(ws)["state"] == "done"
    _exactly_once(ws)
    assert max_abs_diff(_final(ws), _final(reference)) <= 1e-6


def test_host_oom_before_the_first_checkpoint_leaves_the_job_queued(workspace, tmp_path, monkeypatch):
    ws = workspace("ws", **SETTINGS)
    data = text_file(tmp_path / "d.jsonl", EXAMPLES)
    monkeypatch.setenv("CONVEYOR_FAILPOINT", "host-oom:1")
    r = run_cli(ws, "train", data, "-q")
    out = r.out + r.err
    assert r.code != 0
    assert "job 1 ran out of host memory (MemoryError: test failpoint host-oom:1)" in out
    assert "it stays queued, before its first step" in out
    job = _job(ws)
    assert (job["state"], job["steps_done"], job["error"]) == ("queued", 0, None)
    monkeypatch.delenv("CONVEYOR_FAILPOINT")
    r = run_cli(ws, "run", "--drain", "-q")
    assert r.code == 0, r.out + r.err
    assert _job(ws)["state"] == "done"
    _exactly_once(ws)


@pytest.mark.slow
def test_the_daemon_pauses_on_oom_and_resume_retries(workspace, tmp_path):
    """The long-running daemon trains in a worker process: its OOM exit pauses the daemon (no retry loop);
    `conveyor resume` retries, and this time it fits."""
    import os

    from service import Service

    ws = workspace("ws", **SETTINGS, inbox={"settle_seconds": 0.2, "poll_seconds": 0.2},
                   daemon={"min_free_mb": 0, "retry_backoff_seconds": 0.2})
    marker = tmp_path / "oom-fired"
    svc = Service(ws, env={**os.environ, "CONVEYOR_FAILPOINT": f"oom:3:{marker}"}).ready()
    try:
        text_file(ws / "inbox" / "d.jsonl", EXAMPLES)
        svc.wait(lambda: "paused: job 1 ran out of memory" in svc.messages(), 180, "the OOM pause")
        assert "peak memory" in svc.messages() and "died" not in svc.messages()
        job = svc.jobs()["d.jsonl"]
        assert (job["state"], job["steps_done"], job["attempts"]) == ("interrupted", 2, 0)
        assert svc.steps() == 2  # paused: nothing retried
        r = run_cli(ws, "resume")
        assert r.code == 0, r.out + r.err
        svc.wait(lambda: svc.jobs()["d.jsonl"]["state"] == "done", 180, "the job to finish after resume")
    finally:
        svc.stop()
    _exactly_once(ws)
