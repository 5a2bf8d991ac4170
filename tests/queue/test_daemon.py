"""The long-running daemon through the real CLI: controls with exact step outcomes, one daemon per
workspace, worker crashes retried with an exact audit, bad settings edited in while it runs."""

from __future__ import annotations

import json
import os
import signal
from collections import Counter

import pytest
from conftest import run_cli
from service import Service, running, write_jsonl

pytestmark = pytest.mark.slow
SETTINGS = {"training": {"batch_size": 1, "grad_accum": 1, "save_every": 25, "max_length": 48},
            "inbox": {"settle_seconds": 0.5, "poll_seconds": 0.2},
            "daemon": {"min_free_mb": 0, "retry_backoff_seconds": 0.5}}


@pytest.fixture
def service(workspace):
    with running(workspace(**SETTINGS)) as svc:
        yield svc


def _drop(svc, name, n, folder="."):
    return write_jsonl(svc.ws / "inbox" / folder / name, [f"{name} example {i}" for i in range(1, n + 1)])


def _steps_done(svc, job_id):
    rows = svc.query("SELECT steps_done FROM jobs WHERE id = ?", (job_id,))
    return rows[0]["steps_done"] if rows else 0


def test_pause_resume_skip_stop_act_between_steps(service):
    _drop(service, "long.jsonl", 3000)
    _drop(service, "next.jsonl", 10)
    service.wait(lambda: service.steps() >= 3, 120, "training to start")
    r = run_cli(service.ws, "pause")
    assert r.code == 0 and "paused job 1 at global step" in r.out, r.out + r.err
    paused_at = int(r.out.split("global step ")[1].split()[0])
    assert (service.ws / "runs" / "run-0001" / "checkpoints" / f"step-{paused_at:06d}").is_dir()
    for _ in range(3):  # each answer comes from the worker's hold loop: it is holding, not training
        r = run_cli(service.ws, "pause")
        assert r.code == 0 and r.out.strip() == "already paused", r.out + r.err
        assert service.steps() == paused_at
    r = run_cli(service.ws, "resume")
    assert r.code == 0 and f"resumed job 1 at step {paused_at + 1}" in r.out
    service.wait(lambda: service.steps() >= paused_at + 5, 60, "training to continue")
    r = run_cli(service.ws, "skip", "--reason", "bad batch")
    assert r.code == 0 and "job 1 skipped by cli" in r.out and "bad batch" in r.out, r.out + r.err
    skipped_at = int(r.out.split("global 1–")[1].split(")")[0])
    service.wait(lambda: service.jobs()["next.jsonl"]["state"] == "done", 120, "the next job")
    jobs = service.jobs()
    assert jobs["long.jsonl"]["state"] == "skipped" and "bad batch" in jobs["long.jsonl"]["error"]
    assert (jobs["next.jsonl"]["start_step"], jobs["next.jsonl"]["end_step"]) == (skipped_at + 1, skipped_at + 10)
    ledger = service.query("SELECT job_id, start_step, end_step, outcome FROM ledger ORDER BY id")
    assert ledger == [{"job_id": 1, "start_step": 1, "end_step": skipped_at, "outcome": "skipped"},
                      {"job_id": 2, "start_step": skipped_at + 1, "end_step": skipped_at + 10, "outcome": "done"}]
    _drop(service, "third.jsonl", 3000)
    service.wait(lambda: _steps_done(service, 3) >= 3, 120, "the third job to train")
    r = run_cli(service.ws, "stop")
    assert r.code == 0 and "job 3 resumes at step" in r.out, r.out + r.err
    service.proc.wait(timeout=60)
    assert service.proc.returncode == 0
    job = service.jobs()["third.jsonl"]
    assert job["state"] == "interrupted"  # stop keeps the job and its position; it resumes on the next start
    resume_at = int(r.out.split("resumes at step ")[1].split()[0])
    assert (service.ws / "runs" / "run-0001" / "checkpoints" / f"step-{resume_at - 1:06d}").is_dir()


def test_one_daemon_per_workspace(service):
    r = run_cli(service.ws, "run", subprocess_=True)
    assert r.code == 1 and f"another conveyor daemon (pid {service.proc.pid}) is running" in r.err


def test_a_lock_left_by_a_dead_daemon_never_blocks(workspace):
    ws = workspace(**SETTINGS)
    first = Service(ws).ready()
    os.killpg(first.proc.pid, signal.SIGKILL)
    first.proc.wait(timeout=30)
    second = Service(ws).ready()
    try:
        assert "watching" in second.output()
    finally:
        second.stop()
        first.log.close()


def test_a_killed_worker_is_retried_from_its_checkpoint_with_an_exact_audit(service):
    _drop(service, "victim.jsonl", 150)
    service.wait(lambda: service.steps() >= 30, 120, "the job to pass a checkpoint")
    pid = service.worker_pid(1)
    os.kill(pid, signal.SIGKILL)
    service.wait(lambda: service.jobs()["victim.jsonl"]["state"] == "done", 180, "the retried job")
    job = service.jobs()["victim.jsonl"]
    # It had passed a checkpoint when it died: a death with progress does not count against max_attempts.
    assert (job["attempts"], job["deaths"]) == (0, 1) and (job["start_step"], job["end_step"]) == (1, 150)
    audit = service.query("SELECT step, lines FROM audit ORDER BY step")
    assert [r["step"] for r in audit] == list(range(1, 151))
    assert Counter(x for r in audit for x in json.loads(r["lines"])) == Counter(range(1, 151))
    assert "worker died ((signal 9), it had reached its step" in service.messages()


def test_a_worker_that_keeps_dying_without_progress_fails_the_job_and_the_daemon_goes_on(workspace):
    """Every worker dies at global step 30. The first death comes after checkpoint 25 (progress: not counted);
    the next three make no new checkpoint, so the job fails on the third (max_attempts = 3)."""
    ws = workspace(**SETTINGS)
    env = {**os.environ, "CONVEYOR_FAILPOINT": "step:30"}
    svc = Service(ws, env=env).ready()
    try:
        _drop(svc, "doomed.jsonl", 4000)
        svc.wait(lambda: svc.jobs().get("doomed.jsonl", {}).get("state") == "failed", 240, "the job to fail")
        job = svc.jobs()["doomed.jsonl"]
        assert (job["attempts"], job["deaths"], job["steps_done"]) == (3, 4, 25)
        assert "its worker died 3 time(s) in a row without a new checkpoint (4 death(s) in all)" in job["error"]
        _drop(svc, "after.jsonl", 4)  # global steps 26–29: the failpoint at 30 is never reached
        svc.wait(lambda: svc.jobs().get("after.jsonl", {}).get("state") == "done", 120, "the next file")
        assert (svc.jobs()["after.jsonl"]["start_step"], svc.jobs()["after.jsonl"]["end_step"]) == (26, 29)
        assert svc.proc.poll() is None
    finally:
        svc.stop()


def test_invalid_settings_edited_in_keep_the_last_valid_ones(service):
    path = service.ws / "conveyor.toml"
    good = path.read_text()
    path.write_text(good.replace("batch_size = 1", "batch_size = 0") + "\n[surprise]\nkey = 1\n")
    _drop(service, "during.jsonl", 6)
    service.wait(lambda: service.jobs().get("during.jsonl", {}).get("state") == "done", 120, "the job")
    messages = service.messages()
    assert "training.batch_size" in messages and "surprise: unknown key" in messages
    assert "keeping the last valid settings" in messages
    assert service.jobs()["during.jsonl"]["planned_steps"] == 6  # trained with batch 1, the last valid value
    path.write_text(good.replace("batch_size = 1", "batch_size = 2"))
    _drop(service, "fixed.jsonl", 6)
    service.wait(lambda: service.jobs().get("fixed.jsonl", {}).get("state") == "done", 120, "the next job")
    assert service.jobs()["fixed.jsonl"]["planned_steps"] == 3  # the edit was picked up between jobs
    assert service.proc.poll() is None


def test_priority_then_arrival_order(service):
    run_cli(service.ws, "pause")
    for name, folder in (("n1.jsonl", "."), ("l1.jsonl", "low"), ("n2.jsonl", "."), ("h1.jsonl", "high")):
        _drop(service, name, 2, folder)
        service.wait(lambda: name in service.jobs(), 30, f"{name} to be claimed")
    r = run_cli(service.ws, "queue", "--json")
    assert [j["file"] for j in json.loads(r.out)] == ["h1.jsonl", "n1.jsonl", "n2.jsonl", "l1.jsonl"]
    n2 = service.jobs()["n2.jsonl"]["id"]
    assert run_cli(service.ws, "queue", "move", str(n2), "--priority", "high").code == 0
    l1 = service.jobs()["l1.jsonl"]["id"]
    assert run_cli(service.ws, "queue", "remove", str(l1), "--reason", "not needed").code == 0
    assert (service.ws / "removed" / f"{l1:05d}-l1.jsonl.reason.txt").read_text().strip() == "not needed"
    run_cli(service.ws, "resume")
    service.wait(lambda: len(service.query("SELECT id FROM jobs WHERE state = 'done'")) == 3, 120, "three jobs")
    order = [r["file"] for r in service.query("SELECT file FROM jobs WHERE state = 'done' ORDER BY start_step")]
    assert order == ["n2.jsonl", "h1.jsonl", "n1.jsonl"]  # n2 moved to high and arrived before h1


def test_low_disk_pauses_with_numbers_instead_of_failing(workspace):
    ws = workspace(**{**SETTINGS, "daemon": {"min_free_mb": 10**9, "retry_backoff_seconds": 0.5}})
    svc = Service(ws).ready()
    try:
        _drop(svc, "waits.jsonl", 4)
        svc.wait(lambda: "MB free, job 1 needs about" in svc.messages(), 60, "the disk message")
        assert svc.jobs()["waits.jsonl"]["state"] == "queued"  # said before any claim: waiting, not failed
        path = ws / "conveyor.toml"
        path.write_text(path.read_text().replace("min_free_mb = 1000000000", "min_free_mb = 0"))
        svc.wait(lambda: svc.jobs()["waits.jsonl"]["state"] == "done", 120, "the job once space is there")
        r = run_cli(ws, "logs", "-n", "500")
        lines = [json.loads(line) for line in r.out.splitlines()]
        assert any("MB free, job 1 needs about" in x["message"] for x in lines)
        assert {"ts", "pid", "level", "kind", "job", "message"} <= set(lines[0])
    finally:
        svc.stop()
