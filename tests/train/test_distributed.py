"""Two CPU processes over gloo (torchrun): the laws hold with world_size 2, across a SIGKILL and a retry."""

from __future__ import annotations

from collections import Counter

import pytest
from conftest import adapter_weights, audit, max_abs_diff, run_cli, status, text_file

pytestmark = pytest.mark.slow
SETTINGS = {"training": {"batch_size": 2, "grad_accum": 2, "save_every": 2, "max_length": 48, "warmup_steps": 2},
            "adapter": {"dropout": 0.1}, "distributed": {"nproc_per_node": 2},
            "daemon": {"retry_backoff_seconds": 0.2, "min_free_mb": 0}}


def _train(ws, files, env=None):
    return run_cli(ws, "train", *files, "-q", subprocess_=True, env=env)


def test_two_processes_plan_exactly_and_resume_exactly_after_a_kill(workspace, tmp_path):
    files = [text_file(tmp_path / "a.jsonl", 30, "a"), text_file(tmp_path / "b.jsonl", 13, "b")]
    # 30 / (2 × 2 × 2) → 4 steps, the last one partial (6 examples: fillers keep the ranks even)
    reference = workspace("reference", **SETTINGS)
    r = _train(reference, files)
    assert r.code == 0, r.out + r.err
    jobs = sorted(status(reference)["jobs"], key=lambda j: j["id"])
    assert [(j["start_step"], j["end_step"]) for j in jobs] == [(1, 4), (5, 6)]
    rows = audit(reference)
    assert [len(r["lines"]) for r in rows] == [8, 8, 8, 6, 8, 5]
    for job, n in ((jobs[0], 30), (jobs[1], 13)):
        assert Counter(x for r in rows if r["job"] == job["id"] for x in r["lines"]) == Counter(range(1, n + 1))

    killed = workspace("killed", **SETTINGS)
    marker = tmp_path / "fired"
    r = _train(killed, files, {"CONVEYOR_FAILPOINT": f"step:3:{marker}"})  # rank 0 dies after step 3, once
    assert r.code == 0, r.out + r.err
    # Checkpoint 2 was written before the kill: progress, so the death does not count against max_attempts.
    assert marker.exists() and "worker died" in r.out + r.err and "it had reached its step 2" in r.out + r.err
    assert "job 1 resumes at global step 3" in r.out + r.err  # from the checkpoint at step 2
    assert audit(killed) == rows
    final = lambda ws: adapter_weights(ws / "runs" / "run-0001" / "checkpoints" / "step-000006")
    assert max_abs_diff(final(killed), final(reference)) <= 1e-6
