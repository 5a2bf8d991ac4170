"""How a foreground training command ends: Ctrl-C of `conveyor train` exits 130 (never 0, so `train && export`
cannot export a half-trained model), and `conveyor train` beside a running daemon hands its files to it and
follows them to the end with the exit status of training them, never queuing a file and then failing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ledger, run_cli, status, text_file
from service import Service


def _steps(ws) -> int:
    import sqlite3

    try:
        con = sqlite3.connect(ws / "conveyor.db", timeout=30)
        try:
            return con.execute("SELECT COALESCE(MAX(step), 0) FROM audit").fetchone()[0]
        finally:
            con.close()
    except sqlite3.OperationalError:
        return 0


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), pytest.param(signal.SIGTERM, 143, marks=pytest.mark.slow)])
def test_an_interrupted_train_exits_non_zero_and_the_job_resumes(workspace, tmp_path, sig, code):
    ws = workspace(training={"batch_size": 1, "grad_accum": 1, "save_every": 2, "max_length": 48})
    data = text_file(tmp_path / "a.jsonl", 12, "a")
    proc = subprocess.Popen([sys.executable, "-m", "conveyor", "-w", str(ws), "train", str(data), "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "CONVEYOR_TEST_STEP_SECONDS": "0.3"})
    deadline = time.time() + 120
    while _steps(ws) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert _steps(ws) >= 2, proc.communicate()[0]
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == code, out
    assert "interrupted" in out and "Traceback" not in out, out
    job = status(ws)["jobs"][0]
    assert job["state"] == "interrupted" and 0 < job["steps_done"] < 12
    assert run_cli(ws, "run", "--drain", "-q").code == 0  # it resumes where it stopped
    assert [(r["job"], r["end_step"]) for r in ledger(ws) if r["outcome"] == "done"] == [(1, 12)]


@pytest.mark.slow
def test_train_beside_a_running_daemon_hands_it_the_files_and_follows_them(workspace, tmp_path):
    ws = workspace(inbox={"settle_seconds": 0.3, "poll_seconds": 0.2}, daemon={"min_free_mb": 0})
    svc = Service(ws).ready()
    try:
        files = [text_file(tmp_path / f"{t}.jsonl", 16, t) for t in "ab"]
        r = subprocess.run([sys.executable, "-m", "conveyor", "-w", str(ws), "train", *map(str, files), "-q"],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "another conveyor daemon" not in r.stderr and "following them" in r.stdout
        assert "job 2 (b.jsonl): done, global steps 3–4" in r.stdout
        assert [(j["id"], j["state"]) for j in status(ws)["jobs"]] == [(1, "done"), (2, "done")]  # no duplicate
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"text": "fine"}\nnot json\n')
        r = subprocess.run([sys.executable, "-m", "conveyor", "-w", str(ws), "train", str(bad), "-q"],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 1 and "rejected" in r.stdout + r.stderr, r.stdout + r.stderr
    finally:
        svc.stop()
    assert json.loads(run_cli(ws, "history", "--json").out)[-1]["end_step"] == 4
