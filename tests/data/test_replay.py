"""Replay (replay.fraction): earlier jobs' trained examples mixed into each job, recorded as replay in the audit;
law 1 counts them, law 2 still holds for the job's own examples, and a killed job replays the same ones."""

from __future__ import annotations

import pytest

import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

from conftest import adapter_weights, audit, ledger, max_abs_diff, run_cli, status, text_file

from conveyor.data.plan import is_replayed, replayed_before

SETTINGS = {"replay": {"fraction": 0.25}, "eval": {"holdout": 2},
            "training": {"batch_size": 2, "grad_accum": 2, "save_every": 2}, "adapter": {"dropout": 0.1}}
SIZES = {"a.jsonl": 14, "b.jsonl": 14, "c.jsonl": 26}  # 12, 12 and 24 trained after 2 held out each


def _files(folder: Path) -> list[Path]:
    return [text_file(folder / name, n, name[0]) for name, n in SIZES.items()]


def _drain(ws: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "conveyor", "-w", str(ws), "run", "--drain", "-q"],
                          capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})


def _check_laws(ws: Path) -> list[dict]:
    jobs = {j["id"]: j for j in status(ws)["jobs"]}
    rows = audit(ws)
    # Law 1: 12 own + 0 replayed = 3 steps; 12 + 4 = 4 steps; 24 + 8 = 8 steps; contiguous.
    assert [(r["job"], r["start_step"], r["end_step"], r["examples"], r["replayed"]) for r in ledger(ws)
            if r["outcome"] == "done"] == [(1, 1, 3, 12, 0), (2, 4, 7, 12, 4), (3, 8, 15, 24, 8)]
    assert [r["step"] for r in rows] == list(range(1, 16))
    for job_id, job in jobs.items():
        own = Counter(x for r in rows if r["job"] == job_id for x in r["lines"])
        n = SIZES[job["file"]]
        assert own == Counter(set(range(1, n + 1)) - set(job["held_out"]))  # law 2 for its own examples
        replayed = [(x["job"], x["line"]) for r in rows if r["job"] == job_id for x in r.get("replay", [])]
        assert len(replayed) == {1: 0, 2: 4, 3: 8}[job_id]
        assert len(set(replayed)) == len(replayed)  # no repetition while the pool lasts
        assert all(src < job_id for src, _ in replayed)  # only from earlier jobs
        assert all(line not in jobs[src]["held_out"] for src, line in replayed)  # never a held-out example
    for r in rows:  # about a quarter of every step after the first job: 1 of its 4 examples
        assert len(r.get("replay", [])) == (0 if r["job"] == 1 else 1)
    return rows


@pytest.mark.slow  # the default run stays near 5 minutes; CI runs it with -m slow
def test_replay_mixes_earlier_jobs_and_a_killed_job_replays_the_same_examples_with_the_same_weights(workspace,
                                                                                                   tmp_path):
    straight = workspace("straight", **SETTINGS)
    for f in _files(tmp_path / "data"):
        assert run_cli(straight, "add", f).code == 0
    assert _drain(straight).returncode == 0
    reference = _check_laws(straight)

    killed = workspace("killed", **SETTINGS)
    for f in _files(tmp_path / "data"):
        assert run_cli(killed, "add", f).code == 0
    for failpoint in ("step:5", "step:11"):  # inside job 2 and inside job 3, after a checkpoint and before one
        p = _drain(killed, {"CONVEYOR_FAILPOINT": failpoint})
        assert p.returncode == -signal.SIGKILL, p.stdout + p.stderr
    assert _drain(killed).returncode == 0
    assert _check_laws(killed) == reference  # the same own and replayed examples at every step
    final = "runs/run-0001/checkpoints/step-000015"
    assert max_abs_diff(adapter_weights(straight / final), adapter_weights(killed / final)) <= 1e-6


def test_replay_positions_interleave_evenly():
    total, replay = 48, 16  # a quarter of 64 positions... of 48 with 16 replayed: every third
    slots = [p for p in range(total) if is_replayed(p, replay, total)]
    assert len(slots) == replay and slots == list(range(2, 48, 3))
    assert replayed_before(total, replay, total) == replay and replayed_before(0, replay, total) == 0


def test_replay_has_nothing_to_draw_for_the_first_job_and_says_so(workspace, tmp_path):
    ws = workspace(replay={"fraction": 0.5})
    r = run_cli(ws, "train", text_file(tmp_path / "a.jsonl", 8, "a"), "-q")
    assert r.code == 0
    events = run_cli(ws, "logs").out
    assert "job 1: nothing to replay yet" in events
    assert all("replay" not in row for row in audit(ws))
    r = run_cli(ws, "train", text_file(tmp_path / "b.jsonl", 8, "b"), "-q")
    rows = [row for row in audit(ws) if row["job"] == 2]
    assert sum(len(row["replay"]) for row in rows) == 8 and len(rows) == 2  # 8 own + 8 replayed, 8 a step
    assert "job 2 replays 8 example(s) from job(s) 1" in run_cli(ws, "logs").out
