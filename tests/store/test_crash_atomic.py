"""Multi-step commands are crash-atomic (law 6): SIGKILL at each step of rollback, queue remove, export and a new
run after an identity change leaves either the whole result or no trace; the next command finishes or undoes it,
a retry succeeds, and after a drain every requeued line trained once (law 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import ledger, run_cli, set_setting, status, text_file


def _history(ws: Path, run_id: str) -> list[dict]:
    r = run_cli(ws, "history", "--examples", "--json", "--run", run_id, "--own")
    assert r.code == 0, r.out + r.err
    return json.loads(r.out)


def _killed(ws: Path, monkeypatch, failpoint: str, *args: str):
    monkeypatch.setenv("CONVEYOR_FAILPOINT", failpoint)
    r = run_cli(ws, *args, subprocess_=True)
    monkeypatch.delenv("CONVEYOR_FAILPOINT")
    assert r.code == -9, f"{failpoint} did not fire: {r.code}\n{r.out}\n{r.err}"
    return r


def _leftovers(ws: Path) -> list[str]:
    """Temporary files and intents anywhere in the workspace."""
    return sorted(str(p.relative_to(ws)) for p in ws.rglob("*") if p.name.startswith(".tmp-")
                  or (p.parent.name == ".pending" and p.suffix == ".json"))


SLOW = pytest.mark.slow  # every point is walked in the slow run; the default run keeps one of each outcome


@pytest.mark.parametrize("point, committed", [pytest.param("rollback-begun", False, marks=SLOW),
                                              pytest.param("rollback-copied", False, marks=SLOW),
                                              ("rollback-sealed", False), ("rollback-committed", True),
                                              pytest.param("rollback-renamed", True, marks=SLOW)])
def test_rollback_killed_at_each_step_leaves_all_or_nothing_and_requeued_files_train_once(
        workspace, tmp_path, monkeypatch, point, committed):
    ws = workspace()
    files = [text_file(tmp_path / f"{t}.jsonl", 16, t) for t in "abc"]  # 2 steps each
    assert run_cli(ws, "train", *files, "-q").code == 0
    _killed(ws, monkeypatch, f"{point}:2", "rollback", "v1", "--requeue")

    s = status(ws)  # the next command finishes or undoes the cut-off rollback
    assert _leftovers(ws) == []
    if committed:
        assert [r["id"] for r in s["runs"]] == ["run-0001", "run-0002"] and s["run"]["id"] == "run-0002"
        assert (ws / "runs/run-0002/checkpoints/step-000002/manifest.json").exists()
        assert [(j["id"], j["state"]) for j in s["jobs"] if j["id"] > 3] == [(4, "queued"), (5, "queued")]
    else:
        assert [r["id"] for r in s["runs"]] == ["run-0001"] and s["run"]["id"] == "run-0001"
        assert not (ws / "runs/run-0002").exists() and [j["id"] for j in s["jobs"]] == [1, 2, 3]

    r = run_cli(ws, "rollback", "v1", "--requeue", "--json")  # the retry
    assert r.code == 0, r.out + r.err
    got = json.loads(r.out)
    assert (got["run"], got["requeued"]) == ("run-0002", [{"job": 4, "from": 2}, {"job": 5, "from": 3}])
    if committed:
        assert "nothing to do" in got["message"]
    assert [j["id"] for j in status(ws)["jobs"]] == [1, 2, 3, 4, 5]  # nothing queued twice

    assert run_cli(ws, "run", "--drain", "-q").code == 0
    rows = [x for x in ledger(ws) if x["run"] == "run-0002"]
    assert [(x["job"], x["start_step"], x["end_step"], x["outcome"]) for x in rows] == \
        [(4, 3, 4, "done"), (5, 5, 6, "done")]  # ends at step 6, each requeued file once
    trained = _history(ws, "run-0002")
    assert [r["lines"] for r in trained] == [r["lines"] for r in _history(ws, "run-0001")[2:]]
    assert sorted(line for r in trained if r["job"] == 4 for line in r["lines"]) == list(range(1, 17))
    assert _leftovers(ws) == []


@pytest.mark.parametrize("point, committed", [("remove-copied", False), ("remove-committed", True)])
def test_queue_remove_killed_leaves_all_or_nothing(workspace, tmp_path, monkeypatch, point, committed):
    ws = workspace()
    assert run_cli(ws, "add", text_file(tmp_path / "a.jsonl", 16, "a"), text_file(tmp_path / "b.jsonl", 16, "b")
                   ).code == 0
    _killed(ws, monkeypatch, f"{point}:1", "queue", "remove", "1", "--reason", "not this one")
    jobs = {j["id"]: j for j in status(ws)["jobs"]}
    assert _leftovers(ws) == []
    removed = sorted(p.name for p in (ws / "removed").iterdir())
    if committed:
        assert jobs[1]["state"] == "skipped"
        assert removed == ["00001-a.jsonl", "00001-a.jsonl.reason.txt"]
        assert (ws / "removed/00001-a.jsonl").read_bytes() == (tmp_path / "a.jsonl").read_bytes()
        assert (ws / "removed/00001-a.jsonl.reason.txt").read_text() == "not this one\n"
    else:
        assert jobs[1]["state"] == "queued" and removed == []
        r = run_cli(ws, "queue", "remove", "1", "--reason", "not this one")
        assert r.code == 0, r.out + r.err
        assert sorted(p.name for p in (ws / "removed").iterdir()) == ["00001-a.jsonl", "00001-a.jsonl.reason.txt"]
    assert run_cli(ws, "run", "--drain", "-q").code == 0
    assert [(x["job"], x["start_step"], x["end_step"]) for x in ledger(ws)] == [(2, 1, 2)]


def test_export_killed_leaves_no_hidden_folder_and_the_retry_works(workspace, tmp_path, monkeypatch):
    ws = workspace()
    assert run_cli(ws, "train", text_file(tmp_path / "a.jsonl", 16, "a"), "-q").code == 0
    out = tmp_path / "exports" / "merged"
    _killed(ws, monkeypatch, "export-written:2", "export", str(out), "--merge")
    assert [p.name for p in out.parent.iterdir()][0].startswith(".merged.tmp-")  # what the cut left
    r = run_cli(ws, "export", str(out), "--merge")  # the next command removes it, then exports
    assert r.code == 0, r.out + r.err
    assert sorted(p.name for p in out.parent.iterdir()) == ["merged"]
    assert (out / "conveyor-export.json").exists() and _leftovers(ws) == []


def test_a_gguf_export_killed_after_writing_leaves_only_its_temporary_folder_then_redoes(workspace, tmp_path,
                                                                                         monkeypatch):
    pytest.importorskip("gguf")
    ws = workspace()
    assert run_cli(ws, "train", text_file(tmp_path / "a.jsonl", 16, "a"), "-q").code == 0
    out = tmp_path / "exports" / "model"
    _killed(ws, monkeypatch, "export-written:2", "export", str(out), "--gguf", "--quant", "f32")
    [left] = out.parent.iterdir()
    assert left.name.startswith(".model.tmp-") and (left / "model-f32.gguf").exists()  # written, read back, not moved
    r = run_cli(ws, "export", str(out), "--gguf", "--quant", "f32")
    assert r.code == 0, r.out + r.err
    assert sorted(p.name for p in out.parent.iterdir()) == ["model"] and _leftovers(ws) == []
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "conveyor-export.json", "model-f32.gguf"]


def test_a_new_run_after_an_identity_change_killed_mid_way_leaves_the_old_run_active(workspace, tmp_path,
                                                                                     monkeypatch):
    ws = workspace()
    assert run_cli(ws, "train", text_file(tmp_path / "a.jsonl", 16, "a"), "-q").code == 0
    assert run_cli(ws, "add", text_file(tmp_path / "b.jsonl", 16, "b")).code == 0
    set_setting(ws, "adapter", "r", "4")
    _killed(ws, monkeypatch, "new-run:2", "run", "--drain", "-q")
    s = status(ws)
    assert [r["id"] for r in s["runs"]] == ["run-0001"] and s["run"]["global_step"] == 2
    assert run_cli(ws, "run", "--drain", "-q").code == 0
    assert [(x["run"], x["job"], x["start_step"], x["end_step"]) for x in ledger(ws)] == [("run-0002", 2, 1, 2)]
    assert [r["id"] for r in status(ws)["runs"]] == ["run-0001", "run-0002"]
