"""One truth for pause: the database's. A pause taken in a job outlives a skip and a stop, `status` and `resume`
agree with the daemon, and every command that would wait on a paused queue says so and how to go on."""

from __future__ import annotations

import json
import os

import pytest
from conftest import ledger, run_cli, status, text_file
from service import Service, write_jsonl

DAEMON = {"inbox": {"settle_seconds": 0.3, "poll_seconds": 0.2},
          "daemon": {"min_free_mb": 0, "retry_backoff_seconds": 0.2},
          "training": {"batch_size": 1, "grad_accum": 1, "save_every": 2, "max_length": 48}}


@pytest.mark.slow
def test_pause_in_a_job_then_skip_keeps_the_queue_paused_until_resume_and_outlives_a_stop(workspace, tmp_path):
    ws = workspace(**DAEMON)
    svc = Service(ws, env={**os.environ, "CONVEYOR_TEST_STEP_SECONDS": "0.3"}).ready()
    try:
        write_jsonl(ws / "inbox" / "a.jsonl", [f"a example {i}" for i in range(1, 41)])
        svc.wait(lambda: svc.steps() >= 1, 120, "job 1 to train a step")
        write_jsonl(ws / "inbox" / "b.jsonl", [f"b example {i}" for i in range(1, 5)])
        svc.wait(lambda: "b.jsonl" in svc.jobs(), 60, "b.jsonl to be queued")
        r = run_cli(ws, "pause")
        assert r.code == 0 and "paused job 1" in r.out, r.out + r.err
        r = run_cli(ws, "skip", "--reason", "wrong file")
        assert r.code == 0 and "skipped" in r.out, r.out + r.err
        # The daemon says the queue is paused instead of starting b.jsonl (said only where it does not claim).
        svc.wait(lambda: "the queue is paused" in svc.messages(), 60, "the daemon to say it is paused")
        assert svc.jobs()["b.jsonl"]["state"] == "queued" and status(ws)["daemon"]["paused"] is True
        r = run_cli(ws, "resume")
        assert r.code == 0 and r.out.strip() == "resumed", r.out + r.err  # not "not paused"
        svc.wait(lambda: svc.jobs()["b.jsonl"]["state"] == "done", 120, "b.jsonl after resume")
        assert status(ws)["daemon"]["paused"] is False
        r = run_cli(ws, "pause")
        assert r.code == 0 and "paused between jobs" in r.out, r.out + r.err
        r = run_cli(ws, "stop")
        assert r.code == 0, r.out + r.err
        svc.proc.wait(timeout=60)
    finally:
        svc.stop()
    assert status(ws)["daemon"]["paused"] is True  # the pause outlives the daemon that took it
    c = text_file(tmp_path / "c.jsonl", 4, "c")
    r = run_cli(ws, "train", c, "-q")
    assert r.code == 1 and "the queue is paused (by cli" in r.err and "conveyor resume" in r.err, r.out + r.err
    assert [j["file"] for j in status(ws)["jobs"]] == ["a.jsonl", "b.jsonl"]  # nothing was queued
    r = run_cli(ws, "run", "--drain", "-q")
    assert r.code == 1 and "the queue is paused" in r.err + r.out, r.out + r.err
    r = run_cli(ws, "resume")
    assert r.code == 0 and "no longer paused" in r.out, r.out + r.err
    assert run_cli(ws, "train", c, "-q").code == 0
    rows = ledger(ws)
    assert [(x["job"], x["outcome"]) for x in rows][-2:] == [(2, "done"), (3, "done")]
    assert rows[-1]["end_step"] == rows[-1]["start_step"] + 3  # c.jsonl: 4 examples, one per step
    assert json.loads(run_cli(ws, "status", "--json").out)["daemon"]["paused"] is False


def test_pause_without_a_daemon_holds_the_next_start_until_resume(workspace, tmp_path):
    """A pause is a state of the queue: given with no daemon running, it is recorded (not refused); `train` then
    refuses before queuing anything, naming the pause; `resume` lifts it and training goes on."""
    ws = workspace()
    r = run_cli(ws, "pause")
    assert r.code == 0 and "paused: no daemon runs now" in r.out, r.out + r.err
    assert run_cli(ws, "pause").out.startswith("already paused:")
    data = text_file(tmp_path / "a.jsonl", 16)
    r = run_cli(ws, "train", data, "-q")
    assert r.code == 1 and "paused by `conveyor pause` while no daemon ran" in r.out + r.err, r.out + r.err
    assert status(ws)["queue"] == []
    assert run_cli(ws, "resume").code == 0
    assert run_cli(ws, "train", data, "-q").code == 0
