"""Exact crash-safe resume (laws 2, 3): SIGKILL anywhere, SIGTERM warm stop, restart until done; the audit
shows every line once per epoch and the final weights equal an uninterrupted run's."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import adapter_weights, audit, ledger, max_abs_diff, status, text_file

SIZES = {"a.jsonl": 60, "b.jsonl": 40, "c.jsonl": 80}  # batch 2 × grad_accum 2: 15 + 10 + 20 = 45 steps
TOTAL_STEPS = 45
SETTINGS = {"training": {"batch_size": 2, "grad_accum": 2, "save_every": 4, "warmup_steps": 3, "max_length": 48},
            "adapter": {"dropout": 0.1}}  # dropout > 0: RNG state must be restored exactly too


def _files(folder: Path) -> list[Path]:
    return [text_file(folder / name, n, name[0]) for name, n in SIZES.items()]


def _start(ws: Path, env_extra: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "conveyor", "-w", str(ws), "run", "--drain", "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _final_weights(ws: Path) -> dict:
    run_id = status(ws)["run"]["id"]
    return adapter_weights(ws / "runs" / run_id / "checkpoints" / f"step-{TOTAL_STEPS:06d}")


def _steps_in_db(ws: Path) -> int:
    con = sqlite3.connect(ws / "conveyor.db", timeout=30)
    try:
        return con.execute("SELECT COALESCE(MAX(step), 0) FROM audit").fetchone()[0]
    finally:
        con.close()


def _assert_exact(ws: Path, reference: dict) -> None:
    s = status(ws)
    assert s["run"]["global_step"] == TOTAL_STEPS
    assert [j["state"] for j in s["jobs"]] == ["done"] * 3
    rows = audit(ws)
    assert [r["step"] for r in rows] == list(range(1, TOTAL_STEPS + 1))
    for job in s["jobs"]:
        seen = Counter(line for r in rows if r["job"] == job["id"] for line in r["lines"])
        assert seen == Counter(range(1, SIZES[job["file"]] + 1)), job["file"]
    # Ledger rows (a warm stop closes a segment as `interrupted`) cover each job's steps exactly, in order.
    rows = [r for r in ledger(ws) if r["outcome"] != "lost"]
    assert [s for r in rows for s in range(r["start_step"], r["end_step"] + 1)] == list(range(1, TOTAL_STEPS + 1))
    spans = {job: (min(r["start_step"] for r in rows if r["job"] == job), max(r["end_step"] for r in rows
                                                                             if r["job"] == job)) for job in (1, 2, 3)}
    assert spans == {1: (1, 15), 2: (16, 25), 3: (26, 45)}
    assert [r["outcome"] for r in rows if r["end_step"] in (15, 25, 45)] == ["done"] * 3
    assert max_abs_diff(_final_weights(ws), reference) <= 1e-6


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_dir):
    from conftest import make_workspace, run_cli

    root = tmp_path_factory.mktemp("reference")
    ws = make_workspace(root / "ws", tiny_dir, **SETTINGS)
    r = run_cli(ws, "add", *_files(root / "data"))
    assert r.code == 0, r.out + r.err
    r = run_cli(ws, "run", "--drain", "-q")
    assert r.code == 0, r.out + r.err
    return _final_weights(ws)


@pytest.fixture
def queued(tmp_path, tiny_dir):
    from conftest import make_workspace, run_cli

    ws = make_workspace(tmp_path / "ws", tiny_dir, **SETTINGS)
    assert run_cli(ws, "add", *_files(tmp_path / "data")).code == 0
    return ws


@pytest.mark.slow
def test_chaos_sigkill_anywhere_then_restart_until_done(queued, uninterrupted):
    ws = queued
    kills = ["step:6",                # mid-job 1, two steps after checkpoint 4
             "checkpoint-write:12",   # while checkpoint 12 is half written
             "checkpoint-renamed:25", # end of job 2: renamed, before it was recorded as done
             "step:27"]               # just inside job 3
    for failpoint in kills:
        p = _start(ws, {"CONVEYOR_FAILPOINT": failpoint})
        out, _ = p.communicate(timeout=300)
        assert p.returncode == -signal.SIGKILL, (failpoint, out)
    rng = random.Random(7)
    for _ in range(2):  # kills at random moments of training
        p = _start(ws)
        before = _steps_in_db(ws)
        deadline = time.time() + 120
        while _steps_in_db(ws) <= before and p.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.4))
        p.kill()
        p.communicate(timeout=60)
    p = _start(ws)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out
    assert not list((ws / "runs").rglob(".tmp-*"))
    _assert_exact(ws, uninterrupted)


@pytest.mark.slow
def test_sigterm_is_a_warm_stop_and_resume_is_exact(queued, uninterrupted):
    ws = queued
    p = _start(ws)
    deadline = time.time() + 120
    while _steps_in_db(ws) < 5 and time.time() < deadline:
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 143, out  # interrupted: never 0, so `train && export` stops there
    stopped = status(ws)["run"]["global_step"]
    assert 5 <= stopped < TOTAL_STEPS, out
    assert f"resumes at step {stopped + 1}" in out
    assert (ws / "runs" / status(ws)["run"]["id"] / "checkpoints" / f"step-{stopped:06d}").is_dir()
    p = _start(ws)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out
    _assert_exact(ws, uninterrupted)
