"""A job's life through the real CLI: stopped mid-way, overtaken, removed; each transition owned by one writer."""

from __future__ import annotations

import os
from collections import Counter

import pytest
from conftest import audit, ledger, run_cli, status, text_file

from conveyor.data.plan import fresh
from conveyor.store import database as store
from conveyor.store import jobs
from conveyor.store import ledger as ledger_mod
from conveyor.store.jobs import Conflict, JobState

ONE_A_STEP = {"training": {"batch_size": 1, "grad_accum": 1, "save_every": 4}}


def _drain(ws, requests: str = "") -> int:
    old = os.environ.get("CONVEYOR_TEST_REQUESTS")
    os.environ["CONVEYOR_TEST_REQUESTS"] = requests
    try:
        r = run_cli(ws, "run", "--drain", "-q")
    finally:
        os.environ.pop("CONVEYOR_TEST_REQUESTS")
        if old is not None:
            os.environ["CONVEYOR_TEST_REQUESTS"] = old
    assert r.code == (75 if "stop@" in requests else 0), r.out + r.err  # 75: stopped with jobs waiting
    return r


def test_a_stopped_job_overtaken_by_a_high_priority_file_resumes_from_its_own_position(workspace, tmp_path):
    """The issue's scenario 1: stop a 40-example job at step 9, add another file with high priority, drain:
    steps 10–14 train the new file, steps 15–45 the rest of the first; every line once, steps contiguous."""
    ws = workspace(**ONE_A_STEP)
    assert run_cli(ws, "add", text_file(tmp_path / "forty.jsonl", 40, "f")).code == 0
    r = _drain(ws, "stop@9")
    assert "job 1 resumes at step 10 (its step 10 of 40)" in r.out + r.err
    assert status(ws)["jobs"][0]["state"] == "interrupted"
    assert run_cli(ws, "add", text_file(tmp_path / "other.jsonl", 5, "o"), "--priority", "high").code == 0
    r = run_cli(ws, "queue", "--json")
    assert [(j["id"], j["state"]) for j in __import__("json").loads(r.out)] == [(2, "queued"), (1, "interrupted")]
    _drain(ws)
    rows = audit(ws)
    assert [r["step"] for r in rows] == list(range(1, 46))
    assert [r["job"] for r in rows] == [1] * 9 + [2] * 5 + [1] * 31
    assert Counter(x for r in rows if r["job"] == 1 for x in r["lines"]) == Counter(range(1, 41))
    assert Counter(x for r in rows if r["job"] == 2 for x in r["lines"]) == Counter(range(1, 6))
    assert [(r["job"], r["start_step"], r["end_step"], r["outcome"]) for r in ledger(ws)] == \
        [(1, 1, 9, "interrupted"), (2, 10, 14, "done"), (1, 15, 45, "done")]
    job1 = [j for j in status(ws)["jobs"] if j["id"] == 1][0]
    assert (job1["state"], job1["start_step"], job1["end_step"], job1["steps_done"]) == ("done", 1, 45, 40)


def test_an_interrupted_job_goes_before_queued_ones_of_its_priority(workspace, tmp_path):
    ws = workspace(**ONE_A_STEP)
    run_cli(ws, "add", text_file(tmp_path / "a.jsonl", 10, "a"))
    _drain(ws, "stop@3")
    run_cli(ws, "add", text_file(tmp_path / "b.jsonl", 3, "b"), text_file(tmp_path / "c.jsonl", 2, "c", ))
    run_cli(ws, "add", text_file(tmp_path / "d.jsonl", 2, "d"), "--priority", "low")
    _drain(ws)
    order = [r["job"] for r in audit(ws)]
    assert order == [1] * 3 + [1] * 7 + [2] * 3 + [3] * 2 + [4] * 2


def test_removing_an_interrupted_job_keeps_its_steps_and_never_trains_the_rest(workspace, tmp_path):
    ws = workspace(**ONE_A_STEP)
    run_cli(ws, "add", text_file(tmp_path / "a.jsonl", 12, "a"), text_file(tmp_path / "b.jsonl", 4, "b"))
    _drain(ws, "stop@5")
    r = run_cli(ws, "queue", "remove", "1", "--reason", "wrong data")
    assert r.code == 0 and "removed job 1 after 5 of 12 steps" in r.out, r.out + r.err
    _drain(ws)
    rows = audit(ws)
    assert [r["job"] for r in rows] == [1] * 5 + [2] * 4
    assert [(r["job"], r["start_step"], r["end_step"], r["outcome"]) for r in ledger(ws)] == \
        [(1, 1, 5, "interrupted"), (2, 6, 9, "done")]
    job1 = status(ws)["jobs"][0]
    assert job1["state"] == "skipped" and "wrong data" in job1["error"]
    assert (ws / "removed").is_dir() and any(p.name.endswith("a.jsonl") for p in (ws / "removed").iterdir())


def test_a_running_job_cannot_be_removed_or_moved(workspace, tmp_path):
    ws = workspace()
    run_cli(ws, "add", text_file(tmp_path / "a.jsonl", 4, "a"))
    con = store.connect(ws / "conveyor.db")
    jobs.claim_next(con, "claim-1")
    r = run_cli(ws, "queue", "remove", "1")
    assert r.code == 1 and "job 1 is running" in r.err and "conveyor skip" in r.err
    r = run_cli(ws, "queue", "move", "1", "--priority", "high")
    assert r.code == 1 and "job 1 is running" in r.err


def _db_with_jobs(tmp_path, n=3):
    con = store.connect(tmp_path / "j.db")
    for i in range(n):
        jobs.insert(con, file=f"f{i}", source="s", stored="s", fingerprint=f"fp{i}", priority=1,
                    state=JobState.QUEUED, examples=4, epochs=1)
    return con


def test_claim_order_priority_then_interrupted_then_arrival(tmp_path):
    con = _db_with_jobs(tmp_path)
    jobs.insert(con, file="low", source="s", stored="s", fingerprint="x", priority=2, state=JobState.QUEUED)
    jobs.transition(con, 2, JobState.RUNNING, expect=JobState.QUEUED, claim="c")
    jobs.transition(con, 2, JobState.INTERRUPTED, expect=JobState.RUNNING, owner="c", steps_done=1)
    jobs.insert(con, file="high", source="s", stored="s", fingerprint="y", priority=0, state=JobState.QUEUED)
    claimed = []
    while (job := jobs.claim_next(con, f"c{len(claimed)}")) is not None:
        claimed.append(job.file)
    assert claimed == ["high", "f1", "f0", "f2", "low"]


def test_a_transition_from_the_wrong_state_or_claim_is_refused(tmp_path):
    con = _db_with_jobs(tmp_path, 1)
    job = jobs.claim_next(con, "worker-a")
    assert job.state == JobState.RUNNING and job.claim == "worker-a"
    with pytest.raises(Conflict, match="under this worker's claim"):
        jobs.transition(con, 1, JobState.DONE, expect=JobState.RUNNING, owner="worker-b")
    with pytest.raises(Conflict, match="is running, not queued"):
        jobs.transition(con, 1, JobState.SKIPPED, expect=JobState.QUEUED)  # `queue remove` loses the race
    jobs.transition(con, 1, JobState.DONE, expect=JobState.RUNNING, owner="worker-a")
    with pytest.raises(Conflict):
        jobs.update(con, 1, expect=JobState.RUNNING, owner="worker-a", steps_done=3)  # a late flush


def test_finishing_a_job_is_one_transaction(tmp_path, monkeypatch):
    """Ledger row, run step and job state commit together: a failure in the middle leaves none of them."""
    from conveyor.store import runs

    con = _db_with_jobs(tmp_path, 1)
    run = runs.create(con, {"model.name": "tiny"})
    jobs.claim_next(con, "w")
    ledger_mod.write_steps(con, run.id, [(1, 1, [1, 2, 3, 4])], [])
    pos = fresh(1, "fp0", 4, 1).begin_segment(0, 4).after_step(4)

    def broken(*a, **kw):
        raise RuntimeError("power cut")

    monkeypatch.setattr(jobs, "transition", broken)
    with pytest.raises(RuntimeError):
        ledger_mod.close_segment(con, run.id, 1, JobState.DONE, pos, expect=JobState.RUNNING, owner="w", tokens=9)
    assert con.execute("SELECT COUNT(*) FROM ledger").fetchone()[0] == 0
    assert runs.active(con).global_step == 0 and jobs.get(con, 1).state == JobState.RUNNING
    monkeypatch.undo()
    ledger_mod.close_segment(con, run.id, 1, JobState.DONE, pos, expect=JobState.RUNNING, owner="w", tokens=9)
    assert [(r["start_step"], r["end_step"], r["outcome"]) for r in ledger_mod.rows(con)] == [(1, 1, "done")]
    assert runs.active(con).global_step == 1 and jobs.get(con, 1).state == JobState.DONE


def test_a_stale_pid_in_the_lock_file_is_not_a_daemon(workspace):
    ws = workspace()
    (ws / "daemon.lock").write_text(f"{os.getpid()}\n")  # a live process, but nobody holds the lock
    r = run_cli(ws, "pause", "--wait", "1")
    assert r.code == 0 and "paused: no daemon runs now" in r.out, r.out + r.err  # not waiting on a stale pid
    assert status(ws)["daemon"]["running"] is False and status(ws)["daemon"]["paused"] is True
