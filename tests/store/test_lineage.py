"""A rollback's run shows its lineage everywhere: the steps it inherited from the run it branched from (marked, with
that run's id, up to the branch step), then its own, in `history` (ledger and examples), `status` and the dashboard's
series and tables; never the parent's steps after the branch. Through the real CLI on the tiny model.

Three files of 18 lines, 2 held out each, at 8 examples a step: job 1 trains steps 1–2 (v1), job 2 steps 3–4, job 3
steps 5–6, each evaluated (eval.file, held-out sets, a sample) at its end. `rollback v1 --requeue` branches run-0002
at step 2; a drain trains the requeued jobs 4 and 5 at steps 3–4 and 5–6 in it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_workspace, run_cli, text_file
from fastapi.testclient import TestClient

from conveyor.serve.api import snapshot
from conveyor.serve.dashboard import create_app
from conveyor.store.workspace import Workspace

LOCAL = "http://127.0.0.1:8750"
PARENT, BRANCH = "run-0001", "run-0002"
LINEAGE = [{"run": PARENT, "inherited": True, "first_step": 1, "last_step": 2, "steps": 2, "version": "v1"},
           {"run": BRANCH, "inherited": False, "first_step": 3, "last_step": 6, "steps": 4}]


def _json(ws: Path, *args: str):
    r = run_cli(ws, *args, "--json")
    assert r.code == 0, r.out + r.err
    return json.loads(r.out)



@pytest.fixture(scope="module")
def branched(tmp_path_factory, tiny_dir) -> dict:
    """The workspace after the drain, and what status and the dashboard said right after the rollback."""
    root = tmp_path_factory.mktemp("lineage")
    (root / "e.jsonl").write_text("".join(json.dumps({"text": f"eval {i}: the quick brown fox"}) + "\n"
                                          for i in range(4)))
    ws = make_workspace(root / "ws", tiny_dir,
                        training={"batch_size": 4, "grad_accum": 2, "learning_rate": 1e-3, "save_every": 2,
                                  "max_length": 64},
                        eval={"file": str(root / "e.jsonl"), "sample_prompts": ["the quick"], "max_new_tokens": 4,
                              "holdout": 2})
    r = run_cli(ws, "train", *[text_file(root / f"{t}.jsonl", 18, t) for t in "abc"], "-q")
    assert r.code == 0, r.out + r.err
    r = run_cli(ws, "rollback", "v1", "--requeue")
    assert r.code == 0, r.out + r.err
    client = TestClient(create_app(ws), base_url=LOCAL)
    before = {"status": _json(ws, "status"), "text": run_cli(ws, "status").out,
              **{path: client.get(path).json() for path in ("/api/metrics", "/api/evals", "/api/ledger",
                                                            "/api/set_evals", "/api/samples")}}
    r = run_cli(ws, "run", "--drain", "-q")
    assert r.code == 0, r.out + r.err
    return {"ws": ws, "before": before, "client": client}


def test_history_lists_the_inherited_rows_then_its_own(branched):
    ws = branched["ws"]
    rows = _json(ws, "history")
    assert [(r["run"], r["inherited"], r["job"], r["start_step"], r["end_step"], r["outcome"]) for r in rows] == [
        (PARENT, True, 1, 1, 2, "done"), (BRANCH, False, 4, 3, 4, "done"), (BRANCH, False, 5, 5, 6, "done")]
    assert rows == _json(ws, "history", "--run", BRANCH)  # --run names the same run the same way
    parent = _json(ws, "history", "--run", PARENT)
    assert [(r["run"], r["inherited"], r["job"], r["end_step"]) for r in parent] == [
        (PARENT, False, 1, 2), (PARENT, False, 2, 4), (PARENT, False, 3, 6)]
    assert rows[0] == {**parent[0], "inherited": True}
    assert [r["job"] for r in _json(ws, "history", "--own")] == [4, 5]
    text = run_cli(ws, "history").out
    assert "run-0001 (inherited)" in text and "steps 1–2: inherited from run-0001" in text


@pytest.mark.slow  # the default run keeps history's and status's lineage
def test_history_examples_lists_each_inherited_step_then_its_own(branched):
    ws = branched["ws"]
    steps = _json(ws, "history", "--examples")
    assert [(r["run"], r["inherited"], r["step"], r["job"]) for r in steps] == [
        (PARENT, True, 1, 1), (PARENT, True, 2, 1), (BRANCH, False, 3, 4), (BRANCH, False, 4, 4),
        (BRANCH, False, 5, 5), (BRANCH, False, 6, 5)]
    parent = _json(ws, "history", "--examples", "--run", PARENT)
    assert [r["lines"] for r in steps[:2]] == [r["lines"] for r in parent[:2]]
    assert [r["lines"] for r in steps[2:]] == [r["lines"] for r in parent[2:]]  # the same jobs, the same order
    assert [r["step"] for r in _json(ws, "history", "--examples", "--own")] == [3, 4, 5, 6]
    assert "step 1 (run-0001, inherited): job 1 lines" in run_cli(ws, "history", "--examples").out


def test_status_shows_the_lineage(branched):
    ws, before = branched["ws"], branched["before"]
    assert before["status"]["run"]["lineage"] == [LINEAGE[0], {"run": BRANCH, "inherited": False, "first_step": None,
                                                               "last_step": None, "steps": 0}]
    assert "steps 1–2 inherited from run-0001 (up to v1), none of its own yet" in before["text"]
    assert before["status"]["last_eval"]["step"] == 2  # the parent's, at the branch step: the weights it has
    s = _json(ws, "status")
    assert (s["run"]["id"], s["run"]["global_step"], s["run"]["lineage"]) == (BRANCH, 6, LINEAGE)
    assert s["last_eval"]["step"] == 6
    assert "steps 1–2 inherited from run-0001 (up to v1), 3–6 its own" in run_cli(ws, "status").out


@pytest.mark.slow  # the default run keeps history's and status's lineage
def test_right_after_the_rollback_the_dashboard_shows_the_inherited_steps(branched):
    before = branched["before"]
    metrics = before["/api/metrics"]
    assert (metrics["run"], [(m["step"], m["run"], m["inherited"], m["job_id"]) for m in metrics["rows"]]) == (
        BRANCH, [(1, PARENT, True, 1), (2, PARENT, True, 1)])
    assert [(e["step"], e["run"]) for e in before["/api/evals"]["rows"]] == [(2, PARENT)]
    assert [(e["step"], e["name"], e["run"]) for e in before["/api/set_evals"]["rows"]] == [(2, "job 1", PARENT)]
    assert [(r["job"], r["run"], r["inherited"]) for r in before["/api/ledger"]["rows"]] == [(1, PARENT, True)]
    assert [(x["step"], x["run"]) for x in before["/api/samples"]["rows"]] == [(2, PARENT)]


@pytest.mark.slow  # the default run keeps history's and status's lineage
def test_the_dashboard_series_follow_the_lineage(branched):
    client, ws = branched["client"], branched["ws"]
    body = client.get("/api/metrics").json()
    assert (body["run"], body["lineage"]) == (BRANCH, LINEAGE)
    rows = body["rows"]
    assert [(m["step"], m["run"], m["inherited"], m["job_id"]) for m in rows] == [
        (1, PARENT, True, 1), (2, PARENT, True, 1), (3, BRANCH, False, 4), (4, BRANCH, False, 4),
        (5, BRANCH, False, 5), (6, BRANCH, False, 5)]
    parent = client.get(f"/api/metrics?run={PARENT}").json()["rows"]
    assert [(m["step"], m["run"], m["inherited"], m["job_id"]) for m in parent] == [
        (s, PARENT, False, (s + 1) // 2) for s in range(1, 7)]
    assert [m["loss"] for m in rows[:2]] == [m["loss"] for m in parent[:2]]
    assert [m["created_at"] for m in rows[2:]] != [m["created_at"] for m in parent[2:]]  # its own, not the parent's
    assert [m["step"] for m in client.get("/api/metrics?since_step=1").json()["rows"]] == [2, 3, 4, 5, 6]
    merged = client.get("/api/metrics?points=2").json()  # downsampled: the runs' steps merged by range
    assert [(r["step_min"], r["step"], r["n"], r["run"], r["job_id"]) for r in merged["rows"]] == [
        (1, 3, 3, BRANCH, 4), (4, 6, 3, BRANCH, 5)]
    evals = client.get("/api/evals").json()["rows"]
    assert [(e["step"], e["run"], e["inherited"], e["job_id"]) for e in evals] == [
        (2, PARENT, True, 1), (4, BRANCH, False, 4), (6, BRANCH, False, 5)]
    sets = client.get("/api/set_evals").json()["rows"]
    assert [(r["step"], r["run"], r["inherited"]) for r in sets][:2] == [(2, PARENT, True), (4, BRANCH, False)]
    assert {r["step"] for r in sets} == {2, 4, 6}
    assert [(x["step"], x["run"], x["inherited"]) for x in client.get("/api/samples").json()["rows"]] == [
        (6, BRANCH, False), (4, BRANCH, False), (2, PARENT, True)]
    workspace = Workspace(ws)
    try:
        got = snapshot(workspace)
    finally:
        workspace.db.close()
    assert (got["run"], got["metric_step"], got["eval_step"]) == (BRANCH, 6, 6)


@pytest.mark.slow  # the default run keeps history's and status's lineage
def test_the_dashboard_ledger_pages_through_the_lineage(branched):
    client = branched["client"]
    page = client.get("/api/ledger").json()
    assert (page["total"], [(r["run"], r["inherited"], r["job"]) for r in page["rows"]]) == (
        3, [(BRANCH, False, 5), (BRANCH, False, 4), (PARENT, True, 1)])  # newest first
    assert [(r["run"], r["job"]) for r in client.get("/api/ledger?offset=1&limit=1").json()["rows"]] == [(BRANCH, 4)]
    assert [(r["run"], r["job"]) for r in client.get("/api/ledger?offset=2&limit=5").json()["rows"]] == [(PARENT, 1)]
    assert client.get("/api/ledger?offset=3").json()["rows"] == []
    parent = client.get(f"/api/ledger?run={PARENT}").json()
    assert (parent["total"], parent["lineage"]) == (3, [{"run": PARENT, "inherited": False, "first_step": 1,
                                                         "last_step": 6, "steps": 6}])
