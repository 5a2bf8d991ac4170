"""`conveyor status`: one screen on a terminal, one line a frame in a pipe, the progress bar as text on its own
line (a pipe keeps it, and it never glues onto the next table); a preference job's margin and accuracy beside its
loss, running or last, and the share of its held-out pairs preferred."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ASSETS, make_workspace, run_cli, status, text_file

from conveyor.serve.status import MORE, bar, note, one_line
from conveyor.store import jobs, ledger
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


def test_a_rejection_in_the_jobs_table_is_cut_at_no_word(workspace):
    """At 80 columns the jobs table shows the first line of a reason whole, wrapped between words, marks that it
    goes on, and says where the rest is."""
    ws = workspace()
    for name in ("bad_json_and_fields.jsonl", "many_bad.jsonl"):
        run_cli(ws, "add", ASSETS / name)
    reasons = {j["id"]: j["error"] for j in status(ws)["jobs"]}
    r = run_cli(ws, "status", env={"COLUMNS": "80"})
    assert r.code == 0, r.out + r.err
    table = r.out.split("\njobs\n")[1]
    assert max(len(line) for line in table.splitlines() if line[:1] in "┏┃┡│└") <= 80, table
    notes: dict[int, list[str]] = {}
    for line in table.splitlines():
        if line.startswith("│"):
            cells = [c.strip() for c in line.strip("│").split("│")]
            if cells[0]:
                job = int(cells[0])
            notes.setdefault(job, []).append(cells[-1])
    assert set(notes) == set(reasons) == {1, 2}
    for job, pieces in notes.items():
        shown = " ".join(pieces).split()
        first = reasons[job].splitlines()[0]
        assert shown[-1] == MORE.strip() and " ".join(shown[:-1]) == first.split(": ", 1)[1], (shown, first)
        assert all(word in first.split() for word in shown[:-1])  # each word shown is a whole word of the reason
    assert "… the reason goes on: `conveyor status --json` shows it whole" in " ".join(table.split())


def test_notes_are_the_warnings_whole_or_the_reason_without_the_file_name():
    job = {"file": "a.jsonl", "error": None, "held_out": [3, 5], "warnings": ["x " * 80, "y"]}
    assert note(job) == "2 held out; " + "x " * 80 + "; y"
    assert note({**job, "error": "a.jsonl: failed: out of memory\n"}) == "failed: out of memory"
    assert note({**job, "error": "a.jsonl: rejected (2 problem(s)):\n  line 1: x"}) == "rejected (2 problem(s)):" + MORE


# Preference jobs: margin and accuracy beside the loss, the held-out pairs preferred ----------------------------
@pytest.fixture(scope="module")
def preferred(tmp_path_factory, tiny_dir) -> Path:
    """A DPO job of 12 pairs against the base model (its reference), a quarter held out: 9 pairs at batch 4, steps
    1–3."""
    root = tmp_path_factory.mktemp("preferred")
    ws = make_workspace(root / "ws", tiny_dir, training={"batch_size": 4, "grad_accum": 1, "learning_rate": 1e-3,
                                                         "save_every": 2, "max_length": 64}, eval={"holdout": 0.25})
    r = run_cli(ws, "train", pair_file(root / "pairs.jsonl"), "-q")
    assert r.code == 0, r.out + r.err
    return ws


def pair_file(path: Path, n: int = 12) -> Path:
    path.write_text("".join(json.dumps({"prompt": f"q{i}?", "chosen": f" yes {i}", "rejected": f" no {i}"}) + "\n"
                            for i in range(1, n + 1)), encoding="utf-8")
    return path


def test_the_last_preference_job_shows_its_margin_accuracy_and_held_out_pairs(preferred):
    data = status(preferred)
    assert data["current"] is None
    p = data["preference"]
    assert (p["id"], p["file"], p["method"], p["reference"]["name"], p["reference"]["step"], p["state"], p["step"]) \
        == (1, "pairs.jsonl", "dpo", "base", 0, "done", 3)
    assert isinstance(p["margin"], float) and 0.0 <= p["accuracy"] <= 1.0 and p["loss"] > 0
    held = p["held_out"]
    assert (held["set"], held["step"], held["examples"]) == ("job 1", 3, 3) and 0.0 <= held["preference"] <= 1.0
    out = " ".join(run_cli(preferred, "status").out.split())
    assert (f"last preference job 1 pairs.jsonl (dpo against base), done: at step 3 loss {p['loss']:.4f}, margin "
            f"{p['margin']:+.4f}, accuracy {p['accuracy']:.0%}; held-out pairs: the chosen answer more likely in "
            f"{held['preference']:.0%} of 3 (step 3)") in out, out


def test_a_running_preference_job_shows_margin_and_accuracy_beside_its_loss(preferred, tmp_path):
    """A second pair file claimed and one step in (as a worker writes it, with an evaluation of its held-out pairs):
    its line says how it trains and against what, and its newest margin and accuracy beside the loss."""
    ws = tmp_path / "ws"
    shutil.copytree(preferred, ws)
    assert run_cli(ws, "add", pair_file(tmp_path / "more.jsonl")).code == 0
    db = Workspace.open(ws).db
    job = jobs.claim_next(db, claim="test")
    reference = {"kind": "adapter", "step": 3, "weights": "step-000003:ab", "path": "references/job-00002",
                 "sha256": "cd" * 32}
    jobs.update(db, job.id, run_id="run-0001", planned_steps=3, start_step=4, end_step=6, segment_start=4,
                steps_done=1, reference=reference)
    ledger.write_steps(db, "run-0001", [(4, job.id, [1, 2, 4, 5])],
                       [{"step": 4, "job_id": job.id, "loss": 0.7, "learning_rate": 1e-3, "grad_norm": 1.0,
                         "tokens": 60, "examples": 4, "step_time": 0.5, "margin": 0.25, "accuracy": 0.75}],
                       [{"step": 4, "job_id": job.id, "name": "job 2", "loss": 5.0, "examples": 3, "tokens": 30,
                         "preference": 2 / 3}])
    with Lock(Workspace.open(ws)):  # as the daemon training it
        data = status(ws)
        out = run_cli(ws, "status").out
    cur = data["current"]
    assert (cur["id"], cur["loss"], cur["margin"], cur["accuracy"], cur["method"], cur["reference"]["name"]) == (
        2, 0.7, 0.25, 0.75, "dpo", "v1")
    assert data["preference"]["id"] == 2 and data["preference"]["held_out"]["preference"] == 2 / 3
    said = " ".join(out.split())
    assert "job 2 more.jsonl (dpo against v1): step 1/3 (global 4–6), loss 0.7000, margin +0.2500, accuracy 75%, " \
           "ETA 0m01s" in said, out
    assert "held-out pairs: the chosen answer more likely in 67% of 3 (step 4)" in said
    assert "last preference job" not in said  # job 1 is not the newest preference job any more
    line = one_line(data)
    assert "job 2 more.jsonl 1/3 loss 0.7000 margin +0.2500 accuracy 75% ETA 0m01s" in line, line
