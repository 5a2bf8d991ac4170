"""The life of a job under the real daemon, one scenario each: a warm stop and a higher-priority job in
between, a claim racing a new file, a daemon killed under its worker, the second SIGTERM, a world-size change
mid-job, and the controls while paused between jobs. Exact steps, lines and ledger rows."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import audit, ledger, run_cli, status, text_file
from service import Service, running, write_jsonl
from service import process_running as _running

pytestmark = pytest.mark.slow
DAEMON = {"inbox": {"settle_seconds": 0.3, "poll_seconds": 0.2},
          "daemon": {"min_free_mb": 0, "retry_backoff_seconds": 0.2}}
ONE_BY_ONE = {"training": {"batch_size": 1, "grad_accum": 1, "save_every": 4, "max_length": 48}, **DAEMON}


def _drain_process(ws: Path, env_extra: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "conveyor", "-w", str(ws), "run", "--drain", "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env_extra or {})})


def _max_step(ws: Path) -> int:
    con = sqlite3.connect(ws / "conveyor.db", timeout=30)
    try:
        return con.execute("SELECT COALESCE(MAX(step), 0) FROM audit").fetchone()[0]
    except sqlite3.OperationalError:
        return 0
    finally:
        con.close()


def _until(predicate, timeout: float, what: str, poll: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(poll)


def _live_processes(match) -> list[int]:
    """PIDs of live (non-zombie) processes whose /proc entry satisfies match(pid)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _running(int(entry.name)):
            try:
                if match(int(entry.name)):
                    found.append(int(entry.name))
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                pass
    return found


def _in_group(pgid: int):
    return lambda pid: int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[3]) == pgid


def _children_of(daemon_pid: int):
    """Processes the daemon started (process.py gives each CONVEYOR_PARENT_PID=<daemon pid>)."""
    marker = f"CONVEYOR_PARENT_PID={daemon_pid}".encode()
    return lambda pid: marker in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")


def _newest_checkpoint(ws: Path, run_id: str = "run-0001") -> int:
    folder = ws / "runs" / run_id / "checkpoints"
    return max((int(p.name.split("-")[1]) for p in folder.iterdir() if p.name.startswith("step-")), default=0)


def _lines_of(rows: list[dict], job: int) -> Counter:
    return Counter(x for r in rows if r["job"] == job for x in r["lines"])


def _assert_one_job_exact(ws: Path, n: int) -> None:
    """Job 1 of n lines (batch 1) is done at steps 1..n, each line trained exactly once."""
    job = status(ws)["jobs"][0]
    assert (job["state"], job["start_step"], job["end_step"]) == ("done", 1, n)
    rows = audit(ws)
    assert [r["step"] for r in rows] == list(range(1, n + 1))
    assert _lines_of(rows, 1) == Counter(range(1, n + 1))


def test_sigterm_then_a_high_priority_job_then_the_interrupted_one_from_its_own_position(workspace, tmp_path):
    ws = workspace(**ONE_BY_ONE)
    assert run_cli(ws, "add", text_file(tmp_path / "forty.jsonl", 40, "f")).code == 0
    p = _drain_process(ws)
    try:
        _until(lambda: _max_step(ws) >= 9 or p.poll() is not None, 120, "step 9")
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=120)
    finally:
        p.kill()
    assert p.returncode == 143, out  # interrupted by SIGTERM
    s = status(ws)["run"]["global_step"]
    assert 9 <= s < 40, out
    assert f"job 1 resumes at step {s + 1}" in out
    assert (ws / "runs" / "run-0001" / "checkpoints" / f"step-{s:06d}").is_dir()  # the warm stop checkpointed
    r = run_cli(ws, "add", text_file(tmp_path / "other.jsonl", 5, "o"), "--priority", "high")
    assert r.code == 0, r.out + r.err
    r = run_cli(ws, "run", "--drain", "-q")
    assert r.code == 0, r.out + r.err
    assert f"job 1 resumes at global step {s + 6} from step-{s + 5:06d} (its step {s + 1};" in r.out + r.err
    jobs = {j["id"]: j for j in status(ws)["jobs"]}
    assert (jobs[2]["state"], jobs[2]["start_step"], jobs[2]["end_step"]) == ("done", s + 1, s + 5)
    assert (jobs[1]["state"], jobs[1]["end_step"]) == ("done", 45)
    rows = audit(ws)
    assert [r["step"] for r in rows] == list(range(1, 46))
    assert [r["step"] for r in rows if r["job"] == 2] == list(range(s + 1, s + 6))
    assert _lines_of(rows, 1) == Counter(range(1, 41)) and _lines_of(rows, 2) == Counter(range(1, 6))
    assert [(r["job"], r["start_step"], r["end_step"], r["outcome"]) for r in ledger(ws)] == [
        (1, 1, s, "interrupted"), (2, s + 1, s + 5, "done"), (1, s + 6, 45, "done")]


def test_a_file_added_while_a_job_starts_is_a_race_not_a_crash(workspace, tmp_path):
    ws = workspace(**{**ONE_BY_ONE, "daemon": {**DAEMON["daemon"], "max_attempts": 1}})
    with running(ws) as svc:
        write_jsonl(ws / "inbox" / "a.jsonl", [f"a example {i}" for i in range(1, 31)])
        svc.wait(lambda: svc.jobs().get("a.jsonl", {}).get("state") == "running", 60, "job A to be claimed")
        before_first_step = svc.steps() == 0
        r = run_cli(ws, "add", write_jsonl(tmp_path / "b.jsonl", [f"b example {i}" for i in range(1, 6)]),
                    "--priority", "high")
        assert r.code == 0, r.out + r.err
        svc.wait(lambda: [j["state"] for j in svc.jobs().values()] == ["done", "done"], 120, "both jobs")
        a, b = svc.jobs()["a.jsonl"], svc.jobs()["b.jsonl"]
        assert svc.query("SELECT message FROM events WHERE kind = 'death'") == []
        assert (a["attempts"], a["deaths"], a["start_step"], a["end_step"]) == (0, 0, 1, 30)
        assert (b["attempts"], b["deaths"], b["start_step"], b["end_step"]) == (0, 0, 31, 35)
        rows = svc.query("SELECT job_id, start_step, end_step, outcome FROM ledger ORDER BY id")
        assert rows == [{"job_id": a["id"], "start_step": 1, "end_step": 30, "outcome": "done"},
                        {"job_id": b["id"], "start_step": 31, "end_step": 35, "outcome": "done"}]
    print(f"B was added before A's first step: {before_first_step}")


def test_a_worker_never_outlives_its_daemon(workspace):
    ws = workspace(**{**ONE_BY_ONE, "training": {**ONE_BY_ONE["training"], "save_every": 10}})
    n = 120
    first = Service(ws).ready()
    try:
        write_jsonl(ws / "inbox" / "long.jsonl", [f"long example {i}" for i in range(1, n + 1)])
        first.wait(lambda: first.steps() >= 12, 120, "training under way")
        worker = first.worker_pid(1)
        assert worker is not None and _running(worker)
        os.kill(first.proc.pid, signal.SIGKILL)  # the daemon alone, not its process group
        first.proc.wait(timeout=30)
        _until(lambda: not _running(worker), 5, f"worker {worker} to die with its daemon")
        _until(lambda: not _live_processes(_children_of(first.proc.pid)), 5, "every child of the daemon to die")
        assert first.jobs()["long.jsonl"]["state"] == "running"  # nobody recorded anything: it died
        stopped_at = _newest_checkpoint(ws)
    finally:
        first.stop()
    with running(ws) as second:
        second.wait(lambda: second.jobs()["long.jsonl"]["state"] == "done", 180, "the job to finish")
        assert f"job 1 resumes at global step {stopped_at + 1} from step-{stopped_at:06d}" in second.messages()
        job = second.jobs()["long.jsonl"]
        assert (job["attempts"], job["deaths"]) == (0, 0)  # a dead daemon is not the job's fault
    _assert_one_job_exact(ws, n)


def test_a_second_sigterm_stops_at_once_and_the_job_resumes_exactly(workspace):
    ws = workspace(**{**ONE_BY_ONE, "training": {**ONE_BY_ONE["training"], "save_every": 10}})
    n = 120
    svc = Service(ws).ready()
    try:
        write_jsonl(ws / "inbox" / "long.jsonl", [f"long example {i}" for i in range(1, n + 1)])
        svc.wait(lambda: svc.steps() >= 12, 120, "training under way")
        worker = svc.worker_pid(1)
        assert worker is not None and _running(worker)
        svc.proc.send_signal(signal.SIGTERM)
        # The second signal only once the first was handled (two pending SIGTERMs would merge into one).
        _until(lambda: "send again to stop at once" in svc.output(), 30, "the warm stop to begin", poll=0.005)
        svc.proc.send_signal(signal.SIGTERM)
        assert svc.proc.wait(timeout=60) == 130, svc.output()
        _until(lambda: not _live_processes(_in_group(worker)), 10, f"worker group {worker} to be gone")
        _until(lambda: not _live_processes(_children_of(svc.proc.pid)), 10, "every child of the daemon to go")
        resume_from = _newest_checkpoint(ws)
        assert resume_from < n
    finally:
        svc.stop()
    with running(ws) as again:
        again.wait(lambda: again.jobs()["long.jsonl"]["state"] == "done", 180, "the job to finish")
        assert f"job 1 resumes at global step {resume_from + 1} from step-{resume_from:06d}" in again.messages()
    _assert_one_job_exact(ws, n)
    assert not list((ws / "runs").rglob(".tmp-*"))


def test_world_size_grown_mid_job_reseeds_the_new_rank_and_keeps_every_line_once(workspace, tmp_path):
    ws = workspace(training={"batch_size": 2, "grad_accum": 2, "save_every": 2, "max_length": 48,
                             "warmup_steps": 2}, adapter={"dropout": 0.1}, distributed={"nproc_per_node": 1},
                   daemon={"retry_backoff_seconds": 0.2, "min_free_mb": 0})
    assert run_cli(ws, "add", text_file(tmp_path / "sixty.jsonl", 60, "s")).code == 0
    p = _drain_process(ws, {"CONVEYOR_TEST_REQUESTS": "stop@5"})
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 75 and "job 1 resumes at step 6" in out, out
    config = ws / "conveyor.toml"
    assert "nproc_per_node = 1" in config.read_text()
    config.write_text(config.read_text().replace("nproc_per_node = 1", "nproc_per_node = 2"))
    p = _drain_process(ws)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out
    assert "re-seeded" in out and "distributed.world_size: 1 → 2" in out, out
    s = status(ws)
    # 20 examples at world size 1 (5 steps of 4), then 40 at world size 2 (5 steps of 8): one run, steps 1..10.
    assert [r["id"] for r in s["runs"]] == ["run-0001"] and s["run"]["global_step"] == 10
    assert [(j["state"], j["start_step"], j["end_step"]) for j in s["jobs"]] == [("done", 1, 10)]
    assert s["failures"] == []
    rows = audit(ws)
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert [len(r["lines"]) for r in rows] == [4] * 5 + [8] * 5
    assert _lines_of(rows, 1) == Counter(range(1, 61))


def test_controls_through_the_cli_while_paused_between_jobs(workspace):
    ws = workspace(**ONE_BY_ONE)
    with running(ws) as svc:
        r = run_cli(ws, "pause")
        assert r.code == 0 and "paused between jobs" in r.out, r.out + r.err
        write_jsonl(ws / "inbox" / "held.jsonl", [f"held example {i}" for i in range(1, 7)])
        svc.wait(lambda: "held.jsonl" in svc.jobs(), 60, "the file to be claimed")
        assert svc.jobs()["held.jsonl"]["state"] == "queued" and status(ws)["daemon"]["paused"] is True
        r = run_cli(ws, "skip")
        assert r.code == 0 and "no job is training" in r.out, r.out + r.err
        # The daemon answered a later request, so it went round its loop with the job waiting: still held.
        r = run_cli(ws, "pause")
        assert r.code == 0 and "already paused" in r.out, r.out + r.err
        assert svc.jobs()["held.jsonl"]["state"] == "queued" and svc.steps() == 0
        r = run_cli(ws, "resume")
        assert r.code == 0 and "resumed" in r.out, r.out + r.err
        svc.wait(lambda: svc.jobs()["held.jsonl"]["state"] == "done", 120, "the job after resume")
        assert status(ws)["daemon"]["paused"] is False
        assert json.loads(run_cli(ws, "history", "--json").out)[0]["end_step"] == 6


def test_a_warm_stop_while_the_worker_starts_up_is_a_stop_not_a_death(workspace):
    """With max_attempts = 1, a SIGTERM sent the moment a worker is handed its job (before it could act on it)
    must neither fail the job nor count a death; the next start trains it exactly."""
    ws = workspace(**{**ONE_BY_ONE, "daemon": {**DAEMON["daemon"], "max_attempts": 1}})
    svc = Service(ws)
    try:
        svc.wait(lambda: "watching" in svc.output(), 60, "the daemon to start")  # the warm worker still imports
        write_jsonl(ws / "inbox" / "ten.jsonl", [f"ten {i}" for i in range(1, 11)])
        svc.wait(lambda: svc.query("SELECT 1 FROM events WHERE kind = 'worker'"), 60, "the job's handover")
        svc.proc.send_signal(signal.SIGTERM)
        assert svc.proc.wait(timeout=120) == 0
    finally:
        svc.stop()
    job = svc.jobs()["ten.jsonl"]
    assert job["state"] in ("queued", "interrupted") and (job["attempts"], job["deaths"]) == (0, 0), job
    assert not svc.query("SELECT * FROM events WHERE kind = 'death'")
    r = run_cli(ws, "run", "--drain", "-q")
    assert r.code == 0, r.out + r.err
    _assert_one_job_exact(ws, 10)
