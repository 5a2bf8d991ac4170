"""Rollback as a branch: a new run from a version's checkpoint (weights, optimizer, scheduler, RNG, step), its
lineage recorded; the parent run stays byte-identical; --requeue queues the later jobs again."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
from conftest import adapter_weights, drain_with_requests, ledger, max_abs_diff, run_cli, set_setting, status, text_file

from conveyor.store.lock import Lock
from conveyor.store.workspace import Workspace


def _tree(folder: Path) -> dict:
    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*")) if f.is_file()}


def _run_audit(ws, run_id: str) -> list[dict]:
    r = run_cli(ws, "history", "--examples", "--json", "--run", run_id, "--own")
    assert r.code == 0, r.out + r.err
    return json.loads(r.out)


def test_rollback_to_v1_after_v3_branches_a_new_run_and_requeue_retrains_v2_and_v3_jobs(workspace, tmp_path):
    ws = workspace()
    files = [text_file(tmp_path / f"{t}.jsonl", 16, t) for t in "abc"]  # 2 steps each
    assert run_cli(ws, "train", *files, "-q").code == 0
    old = ws / "runs" / "run-0001"
    before = _tree(old)
    r = run_cli(ws, "rollback", "v1", "--requeue", "--json")
    assert r.code == 0, r.out + r.err
    got = json.loads(r.out)
    assert (got["run"], got["parent_run"], got["parent_version"], got["step"]) == ("run-0002", "run-0001", "v1", 2)
    assert [(a["job"], a["start_step"], a["end_step"]) for a in got["after"]] == [(2, 3, 4), (3, 5, 6)]
    assert got["requeued"] == [{"job": 4, "from": 2}, {"job": 5, "from": 3}]
    run = status(ws)["run"]
    assert (run["id"], run["global_step"], run["parent_run"], run["parent_version"]) == \
        ("run-0002", 2, "run-0001", "v1")
    assert "branched from v1 of run-0001" in run_cli(ws, "status").out
    first = json.loads((ws / "runs/run-0002/checkpoints/step-000002/manifest.json").read_text())
    assert (first["run_id"], first["global_step"], first["branched_from"]) == \
        ("run-0002", 2, {"run": "run-0001", "version": "v1", "step": 2})
    assert run_cli(ws, "run", "--drain", "-q").code == 0
    rows = [r for r in ledger(ws) if r["run"] == "run-0002"]
    assert [(r["job"], r["start_step"], r["end_step"], r["outcome"]) for r in rows] == \
        [(4, 3, 4, "done"), (5, 5, 6, "done")]  # the first new job starts at v1's step + 1
    new_audit = _run_audit(ws, "run-0002")
    assert [(r["step"], r["job"]) for r in new_audit] == [(3, 4), (4, 4), (5, 5), (6, 5)]
    assert [r["lines"] for r in new_audit] == [r["lines"] for r in _run_audit(ws, "run-0001")[2:]]
    # From v1's weights, optimizer, scheduler and RNG the same jobs give the same weights (law 3).
    assert max_abs_diff(adapter_weights(old / "checkpoints/step-000006"),
                        adapter_weights(ws / "runs/run-0002/checkpoints/step-000006")) <= 1e-6
    assert _tree(old) == before  # the parent run is byte-identical
    versions = json.loads(run_cli(ws, "versions", "--json").out)
    assert [(v["version"], v["run"], v["step"]) for v in versions] == [
        ("v1", "run-0001", 2), ("v2", "run-0001", 4), ("v3", "run-0001", 6), ("v4", "run-0002", 4),
        ("v5", "run-0002", 6)]
    lineage = lambda *run: [r["version"] for r in json.loads(run_cli(ws, "eval", "--json", *run).out)["rows"]]  # noqa
    assert lineage() == ["v1", "v4", "v5"] and lineage("--run", "run-0001") == ["v1", "v2", "v3"]


def test_rollback_without_requeue_lists_the_later_jobs_and_new_files_train_from_the_version(workspace, tmp_path):
    ws = workspace()
    assert run_cli(ws, "train", text_file(tmp_path / "a.jsonl", 16, "a"), text_file(tmp_path / "b.jsonl", 8, "b"),
                   "-q").code == 0
    r = run_cli(ws, "rollback", "v1")
    assert r.code == 0 and "job 2 (b.jsonl, steps 3–3)" in r.out and "--requeue" in r.out, r.out + r.err
    assert run_cli(ws, "train", text_file(tmp_path / "c.jsonl", 8, "c"), "-q").code == 0
    rows = ledger(ws)
    assert [(r["run"], r["job"], r["start_step"], r["end_step"]) for r in rows if r["run"] == "run-0002"] == \
        [("run-0002", 3, 3, 3)]


def test_a_job_stopped_mid_way_at_the_version_resumes_from_its_position_in_the_branch(workspace, tmp_path):
    """Job 1 stops after its step 3; job 2 (high priority) ends at step 5 (v1); job 1 ends at step 10 (v2).
    Rolled back to v1 with --requeue, job 1's repeat resumes at its step 4: it trains exactly the lines job 1
    had not trained by v1, at steps 6–10, with the same weights as the parent."""
    ws = workspace(training={"batch_size": 2, "grad_accum": 1, "save_every": 1})
    assert run_cli(ws, "add", text_file(tmp_path / "a.jsonl", 16, "a")).code == 0
    assert drain_with_requests(ws, "stop@3").code == 75
    assert run_cli(ws, "add", text_file(tmp_path / "b.jsonl", 4, "b"), "--priority", "high").code == 0
    assert run_cli(ws, "run", "--drain", "-q").code == 0
    assert [(v["version"], v["job"], v["step"]) for v in json.loads(run_cli(ws, "versions", "--json").out)] == \
        [("v1", 2, 5), ("v2", 1, 10)]
    r = run_cli(ws, "rollback", "v1", "--requeue", "--json")
    assert r.code == 0, r.out + r.err
    assert json.loads(r.out)["requeued"] == [{"job": 3, "from": 1}]
    assert "job 3 (a.jsonl) resumes in run-0002 at its step 4" in json.loads(r.out)["message"]
    assert run_cli(ws, "run", "--drain", "-q").code == 0
    parent, branch = _run_audit(ws, "run-0001"), _run_audit(ws, "run-0002")
    assert [(r["step"], r["job"]) for r in branch] == [(s, 3) for s in range(6, 11)]
    assert [r["lines"] for r in branch] == [r["lines"] for r in parent[5:]]
    trained = Counter(x for r in parent[:3] + branch for x in r["lines"])
    assert trained == Counter(range(1, 17))  # law 2 along the branch's lineage
    assert max_abs_diff(adapter_weights(ws / "runs/run-0001/checkpoints/step-000010"),
                        adapter_weights(ws / "runs/run-0002/checkpoints/step-000010")) <= 1e-6


def test_rollback_refuses_what_it_cannot_do_and_says_why(workspace, tmp_path):
    ws = workspace(training={"save_every": 1, "keep_checkpoints": 1, "keep_job_ends": 0})
    r = run_cli(ws, "rollback", "v1")
    assert r.code != 0 and "no version 'v1'" in r.err
    for tag in "ab":
        assert run_cli(ws, "train", text_file(tmp_path / f"{tag}.jsonl", 16, tag), "-q").code == 0
    shutil.rmtree(ws / "runs/run-0001/checkpoints/step-000002")  # v1's checkpoint, deleted by hand
    r = run_cli(ws, "rollback", "v1")
    assert r.code != 0 and "v1's checkpoint step-000002 is missing from runs/run-0001/checkpoints" in r.err
    assert run_cli(ws, "add", text_file(tmp_path / "c.jsonl", 16, "c")).code == 0
    con = Workspace(ws).db
    con.execute("UPDATE jobs SET state = 'running', claim = 'x' WHERE id = 3")  # as while a worker trains it
    with Lock(Workspace(ws)):  # a daemon holds the workspace
        r = run_cli(ws, "rollback", "v2")
        assert r.code != 0 and "job 3 (c.jsonl) is training" in r.err and "conveyor stop" in r.err
        con.execute("UPDATE jobs SET state = 'queued', claim = NULL WHERE id = 3")  # idle, the queue not paused
        r = run_cli(ws, "rollback", "v2")
        assert r.code != 0 and "`conveyor pause` first" in r.err
        con.execute("UPDATE jobs SET state = 'running', claim = 'x' WHERE id = 3")
    assert status(ws)["run"]["id"] == "run-0001" and len(status(ws)["runs"]) == 1
    # Without a daemon, a `running` job is what a crash left: the rollback places it like any waiting job.
    r = run_cli(ws, "rollback", "v2", "--json")
    assert r.code == 0, r.out + r.err
    assert [(j["id"], j["state"], j["run_id"]) for j in status(ws)["jobs"] if j["id"] == 3] == [(3, "queued", None)]
    assert run_cli(ws, "run", "--drain", "-q").code == 0
    assert [(x["run"], x["job"], x["start_step"]) for x in ledger(ws) if x["run"] == "run-0002"] == \
        [("run-0002", 3, 5)]


def test_a_rollback_that_cannot_copy_leaves_nothing_half_made(workspace, tmp_path, monkeypatch):
    from conveyor.store import rollback

    ws = workspace()
    for tag in "ab":
        assert run_cli(ws, "train", text_file(tmp_path / f"{tag}.jsonl", 16, tag), "-q").code == 0

    def disk_full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(rollback, "_copy_checkpoint", disk_full)
    with pytest.raises(OSError):
        run_cli(ws, "rollback", "v1", "--requeue")
    s = status(ws)
    assert [r["id"] for r in s["runs"]] == ["run-0001"] and s["run"]["id"] == "run-0001"
    assert [j["id"] for j in s["jobs"]] == [1, 2]  # the requeued job is gone with the run
    assert not (ws / "runs" / "run-0002").exists()


def test_a_rollback_says_when_the_settings_no_longer_match_the_version(workspace, tmp_path):
    ws = workspace()
    assert run_cli(ws, "train", text_file(tmp_path / "a.jsonl", 16, "a"), "-q").code == 0
    set_setting(ws, "adapter", "r", "4")
    r = run_cli(ws, "rollback", "v1")
    assert r.code == 0 and "does not match v1's identity (adapter.r: 8 → 4)" in r.out, r.out + r.err


def test_two_rollbacks_at_once_make_one_run_and_leave_nothing_behind(workspace, tmp_path):
    """The first rollback is held right after copying its checkpoint while a second one to the same version
    starts: the second waits for the first, then finds the run branched (nothing to do). One new run, no
    temporary folder, no `damaged` message, and the database whole (doctor exit 0)."""
    import os
    import subprocess
    import sys
    import time

    ws = workspace()
    assert run_cli(ws, "train", *[text_file(tmp_path / f"{t}.jsonl", 16, t) for t in "ab"], "-q").code == 0
    release = tmp_path / "release"
    argv = [sys.executable, "-m", "conveyor", "-w", str(ws), "rollback", "v1"]
    first = subprocess.Popen(argv, env={**os.environ, "CONVEYOR_TEST_HOLD": f"rollback-copied:2:{release}"},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    second = None
    try:
        deadline = time.monotonic() + 60
        while not Path(f"{release}.reached").exists():
            assert time.monotonic() < deadline and first.poll() is None, first.communicate()
            time.sleep(0.02)
        second = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        with pytest.raises(subprocess.TimeoutExpired):
            second.wait(1.0)  # waiting for the first (without the lock it took run-0002 meanwhile)
    finally:
        release.write_text("go\n")  # never leave the first one held
    out1, err1 = first.communicate(timeout=60)
    out2, err2 = second.communicate(timeout=60)
    assert first.returncode == 0 and "run-0002 branches from v1" in out1, out1 + err1
    assert second.returncode == 0 and "run-0002 already branches from v1" in out2 and "nothing to do" in out2, \
        out2 + err2
    assert "damaged" not in err1 + err2
    assert sorted(p.name for p in (ws / "runs").iterdir()) == ["run-0001", "run-0002"]
    assert [r["id"] for r in status(ws)["runs"]] == ["run-0001", "run-0002"]
    assert run_cli(ws, "doctor").code == 0
