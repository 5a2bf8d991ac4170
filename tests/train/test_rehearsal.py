"""Self-rehearsal (replay.rehearsal): the probe's prompts answered by the base model mixed into every job beside the
replay of earlier jobs, in the audit as replay of job 0 (line n: the probe's n-th prompt), never counted against
law 2; a killed job rehearses the same examples and ends with the same weights."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from conftest import adapter_weights, audit, chat_file, ledger, max_abs_diff, run_cli, status

SETTINGS = {"replay": {"fraction": 0.25, "rehearsal": 0.25}, "eval": {"probe": "general", "max_new_tokens": 4},
            "training": {"batch_size": 2, "grad_accum": 2, "save_every": 2}, "adapter": {"dropout": 0.1}}


def _files(folder: Path) -> list[Path]:
    return [chat_file(folder / "a.jsonl", 12), chat_file(folder / "b.jsonl", 13)]


def _drain(ws: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "conveyor", "-w", str(ws), "run", "--drain", "-q"],
                          capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})


def _check(ws: Path) -> list[dict]:
    rows = audit(ws)
    # Job 1: nothing earlier is done, so only the probe: 12 own + round(12 × 0.25 / 0.75) = 4 rehearsed = 4 steps.
    # Job 2: 13 own + round(13 × 0.5 / 0.5) = 13 drawn from job 1 and the probe = 26 = 7 steps (the last of 2).
    assert [(r["job"], r["start_step"], r["end_step"], r["examples"], r["replayed"]) for r in ledger(ws)
            if r["outcome"] == "done"] == [(1, 1, 4, 12, 4), (2, 5, 11, 13, 13)]
    for job_id, n in ((1, 12), (2, 13)):
        own = Counter(x for r in rows if r["job"] == job_id for x in r["lines"])
        assert own == Counter(range(1, n + 1))  # law 2: every own line once, the rehearsal beside it
    first = [(x["job"], x["line"]) for r in rows if r["job"] == 1 for x in r.get("replay", [])]
    assert len(first) == 4 and all(job == 0 and 1 <= line <= 36 for job, line in first)
    second = [(x["job"], x["line"]) for r in rows if r["job"] == 2 for x in r.get("replay", [])]
    assert len(second) == 13 and {job for job, _ in second} <= {0, 1} and any(job == 0 for job, _ in second)
    assert len(set(second)) == len(second)  # the pool (12 of job 1 and the 36 of the probe) is not used up
    return rows


@pytest.mark.slow
def test_rehearsal_is_replay_of_the_probe_and_a_killed_job_rehearses_the_same(workspace, tmp_path):
    straight = workspace("straight", **SETTINGS)
    for f in _files(tmp_path / "data"):
        assert run_cli(straight, "add", f).code == 0
    p = _drain(straight)
    assert p.returncode == 0, p.stdout + p.stderr
    reference = _check(straight)
    [kept] = (straight / "data" / "probe").glob("*.json")

    killed = workspace("killed", **SETTINGS)
    for f in _files(tmp_path / "data"):
        assert run_cli(killed, "add", f).code == 0
    for failpoint in ("step:3", "step:7"):  # inside job 1 and inside job 2
        p = _drain(killed, {"CONVEYOR_FAILPOINT": failpoint})
        assert p.returncode == -signal.SIGKILL, p.stdout + p.stderr
    assert _drain(killed).returncode == 0
    assert _check(killed) == reference  # the same own and rehearsed examples at every step
    assert (killed / "data" / "probe" / kept.name).read_bytes() == kept.read_bytes()  # the same base answers
    final = "runs/run-0001/checkpoints/step-000011"
    assert max_abs_diff(adapter_weights(straight / final), adapter_weights(killed / final)) == 0  # law 3


def test_rehearsal_without_a_probe_says_so_and_trains_the_job(workspace, tmp_path):
    ws = workspace(replay={"rehearsal": 0.2})  # eval.probe "auto": tiny has no probe
    r = run_cli(ws, "train", chat_file(tmp_path / "a.jsonl", 8), "-q")
    assert r.code == 0, r.out + r.err
    [warning] = [w for j in status(ws)["jobs"] for w in j.get("warnings") or []]
    assert warning.startswith("replay.rehearsal needs a probe to rehearse")
    assert [(r["examples"], r["replayed"]) for r in ledger(ws)] == [(8, 0)]


def test_fraction_and_rehearsal_together_stay_at_most_half(workspace, tmp_path):
    from conftest import set_setting

    ws = workspace()
    set_setting(ws, "replay", "fraction", "0.3")
    set_setting(ws, "replay", "rehearsal", "0.3")
    r = run_cli(ws, "train", chat_file(tmp_path / "a.jsonl", 8), "-q")
    assert r.code == 1 and "replay.fraction + replay.rehearsal = 0.6 leaves less than half" in " ".join(r.err.split())
