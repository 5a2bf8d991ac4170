"""`conveyor status`: one screen on a terminal, one line a frame in a pipe, the progress bar as text on its own
line (a pipe keeps it, and it never glues onto the next table)."""

from __future__ import annotations

import subprocess
import sys

from conftest import run_cli, text_file

from conveyor.serve.status import bar, one_line
from conveyor.store import jobs
from conveyor.store.lock import Lock
from conveyor.store.workspace import Workspace


def test_watch_in_a_pipe_prints_one_line_a_frame(workspace, tmp_path):
    ws = workspace()
    assert run_cli(ws, "add", text_file(tmp_path / "a.jsonl", 8, "a")).code == 0
    proc = subprocess.Popen([sys.executable, "-m", "conveyor", "-w", str(ws), "status", "--watch"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        frames = [proc.stdout.readline() for _ in range(2)]
    finally:
        proc.kill()
        proc.wait()
    for frame in frames:
        assert frame.endswith("\n") and frame.count("\n") == 1
        assert "| no daemon | waiting 1" in frame, frames


def test_the_progress_bar_is_text_on_its_own_line():
    assert bar(12, 40, width=10) == "[███░░░░░░░] 12/40 30%"
    assert bar(0, 0) == ""
    data = {"time": 0.0, "daemon": {"running": True, "pid": 7, "paused": True, "disk": None},
            "run": {"id": "run-0002", "global_step": 30}, "queue_total": 3,
            "current": {"id": 5, "file": "a.jsonl", "steps_done": 4, "planned_steps": 8, "loss": 1.5,
                        "eta_seconds": 61}}
    assert one_line(data).split(" | ")[1:] == ["daemon 7 paused", "run-0002 step 30",
                                                "job 5 a.jsonl 4/8 loss 1.5000 ETA 1m01s", "waiting 2"]


def test_help_shows_no_value_for_flags():
    from conftest import run_cli as cli

    for command in ("status", "eval", "history", "train"):
        r = cli(None, command, "--help")
        assert r.code == 0 and "<bool>" not in r.out and "--json" in r.out or command == "train", r.out
    assert "[default: True]" not in cli(None, "eval", "--help").out
    assert '"small"' in cli(None, "init", "--help").out


def test_a_job_claimed_but_not_yet_planned_shows_as_starting(workspace, tmp_path):
    """Right after a claim (no plan yet): `starting`, not `step 0/None (global None–None)`."""
    ws = workspace()
    assert run_cli(ws, "add", text_file(tmp_path / "a.jsonl", 8)).code == 0
    assert jobs.claim_next(Workspace.open(ws).db, claim="test").planned_steps is None
    with Lock(Workspace.open(ws)):  # as a daemon that has just claimed it
        out = run_cli(ws, "status").out
    assert "job 1 a.jsonl: starting (tokenizing its data and loading the model)" in out and "None" not in out, out


def test_a_job_left_running_by_a_killed_process_says_so(workspace, tmp_path):
    """No daemon holds the lock, yet a job is `running` (its process was SIGKILLed): status says what happened and
    what resumes it, not a live progress bar."""
    ws = workspace()
    assert run_cli(ws, "add", text_file(tmp_path / "a.jsonl", 8)).code == 0
    jobs.claim_next(Workspace.open(ws).db, claim="killed")
    out = run_cli(ws, "status").out
    assert "job 1 a.jsonl: its training process ended without a word (a crash or SIGKILL) after step 0 of ?" in out
    assert "resumes from its newest checkpoint when training starts" in out
