"""Versions: each job's end is a version (v1, v2, ... never reused), listed with its step and evaluation; a pinned
version's checkpoint survives retention, and the latest version is always kept."""

from __future__ import annotations

import json

from conftest import checkpoint_steps, run_cli, status, text_file

from conveyor.store import manifest as mf


def _versions(ws) -> list[dict]:
    r = run_cli(ws, "versions", "--json")
    assert r.code == 0, r.out + r.err
    return json.loads(r.out)


def test_each_job_end_is_a_version_with_its_step_and_evaluation(workspace, tmp_path):
    eval_file = text_file(tmp_path / "eval.jsonl", 4, "e")
    ws = workspace(eval={"file": str(eval_file)})
    files = [text_file(tmp_path / "a.jsonl", 16, "a"), text_file(tmp_path / "b.jsonl", 24, "b")]  # 2 + 3 steps
    assert run_cli(ws, "train", *files, "-q").code == 0
    got = _versions(ws)
    run_id = status(ws)["run"]["id"]
    assert [(v["version"], v["run"], v["job"], v["file"], v["step"], v["pinned"]) for v in got] == [
        ("v1", run_id, 1, "a.jsonl", 2, False), ("v2", run_id, 2, "b.jsonl", 5, False)]
    assert all(set(v["eval"]) == {"eval.file"} and v["eval"]["eval.file"] > 0 for v in got)
    assert "v2" in run_cli(ws, "versions").out


def test_a_pinned_version_survives_retention_and_the_latest_is_always_kept(workspace, tmp_path):
    ws = workspace(training={"save_every": 1, "keep_checkpoints": 1, "keep_job_ends": 0})
    assert run_cli(ws, "train", text_file(tmp_path / "a.jsonl", 16, "a"), "-q").code == 0  # v1 at step 2
    run_id = status(ws)["run"]["id"]
    r = run_cli(ws, "pin", "v1")
    assert r.code == 0 and "pinned v1" in r.out, r.out + r.err
    for tag in "bcde":  # v2..v5 at steps 4, 6, 8, 10
        assert run_cli(ws, "train", text_file(tmp_path / f"{tag}.jsonl", 16, tag), "-q").code == 0
    assert checkpoint_steps(ws, run_id) == [2, 4, 6, 8, 10]  # every version keeps its weights (law 6)
    mf.verify(ws / "runs" / run_id / "checkpoints" / "step-000002")
    # Whole: pinned v1 and the newest (the latest version, v5); the others lost their optimizer state only.
    assert [(v["pinned"], v["optimizer"]) for v in _versions(ws)] == [
        (True, "kept"), (False, "pruned"), (False, "pruned"), (False, "pruned"), (False, "kept")]
    assert run_cli(ws, "unpin", "v1").code == 0
    assert run_cli(ws, "train", text_file(tmp_path / "f.jsonl", 16, "f"), "-q").code == 0
    assert checkpoint_steps(ws, run_id) == [2, 4, 6, 8, 10, 12]
    assert [v["optimizer"] for v in _versions(ws)] == ["pruned"] * 5 + ["kept"]


def test_pinning_what_does_not_exist_says_what_does(workspace, tmp_path):
    ws = workspace(training={"save_every": 1, "keep_checkpoints": 1, "keep_job_ends": 0})
    r = run_cli(ws, "pin", "v1")
    assert r.code != 0 and "no version 'v1'" in r.err and "a version is made when a job ends" in r.err
    for tag in "ab":
        assert run_cli(ws, "train", text_file(tmp_path / f"{tag}.jsonl", 16, tag), "-q").code == 0
    r = run_cli(ws, "pin", "seven")
    assert r.code != 0 and "versions: v1, v2" in r.err
    r = run_cli(ws, "pin", "v1")  # its optimizer state went when v2 was written (keep 1, no job ends); not its weights
    assert r.code == 0 and "optimizer state was already pruned by retention (training.keep_job_ends)" in r.out


def test_generate_answers_with_the_newest_checkpoint_or_a_version_the_same_way_each_time(workspace, tmp_path):
    ws = workspace()
    r = run_cli(ws, "generate", "hello")
    assert r.code != 0 and "nothing trained yet" in r.err
    assert run_cli(ws, "train", text_file(tmp_path / "a.jsonl", 16, "a"), text_file(tmp_path / "b.jsonl", 16, "b"),
                   "-q").code == 0
    first = json.loads(run_cli(ws, "generate", "the quick", "--max-new-tokens", "6", "--json").out)
    assert (first["version"], first["step"], first["chat"]) == ("v2", 4, False) and isinstance(first["output"], str)
    again = json.loads(run_cli(ws, "generate", "the quick", "--max-new-tokens", "6", "--json").out)
    assert again == first  # greedy: the same version answers the same way
    v1 = json.loads(run_cli(ws, "generate", "the quick", "--version", "v1", "--json").out)
    assert (v1["version"], v1["step"]) == ("v1", 2)
    r = run_cli(ws, "generate", "hi", "--version", "v9")
    assert r.code != 0 and "no version 'v9'; versions: v1, v2" in r.err


def test_generate_uses_the_chat_template_for_a_chat_trained_run(workspace, tmp_path):
    ws = workspace()
    chats = tmp_path / "chat.jsonl"
    chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                                      {"role": "assistant", "content": f"a{i}"}]}) + "\n"
                             for i in range(8)))
    assert run_cli(ws, "train", chats, "-q").code == 0
    result = json.loads(run_cli(ws, "generate", "q1", "--max-new-tokens", "4", "--json").out)
    assert result["chat"] is True and result["version"] == "v1"


def test_a_database_from_before_versions_gets_one_per_finished_job(workspace, tmp_path):
    import sqlite3

    ws = workspace()
    files = [text_file(tmp_path / "a.jsonl", 16, "a"), text_file(tmp_path / "b.jsonl", 24, "b")]  # 2 + 3 steps
    assert run_cli(ws, "train", *files, "-q").code == 0
    con = sqlite3.connect(ws / "conveyor.db")
    con.execute("DELETE FROM versions")
    con.execute("DELETE FROM sqlite_sequence WHERE name = 'versions'")  # a table that never had a row
    con.execute("PRAGMA user_version = 1")  # as a database written before versions existed
    con.commit()
    con.close()
    assert [(v["version"], v["job"], v["step"]) for v in _versions(ws)] == [("v1", 1, 2), ("v2", 2, 5)]


def test_export_a_version_gives_that_versions_weights(workspace, tmp_path):
    ws = workspace()
    assert run_cli(ws, "train", text_file(tmp_path / "a.jsonl", 16, "a"), text_file(tmp_path / "b.jsonl", 16, "b"),
                   "-q").code == 0
    r = run_cli(ws, "export", tmp_path / "v1-out", "--version", "v1")
    assert r.code == 0 and "exported the adapter of v1 (run-0001, global step 2, step-000002)" in r.out, r.out + r.err
    from conftest import adapter_weights, max_abs_diff

    assert max_abs_diff(adapter_weights(tmp_path / "v1-out"),
                        adapter_weights(ws / "runs/run-0001/checkpoints/step-000002")) == 0
    assert json.loads((tmp_path / "v1-out" / "conveyor-export.json").read_text())["version"] == "v1"
    r = run_cli(ws, "export", tmp_path / "x", "--version", "v1", "--run", "run-0001")
    assert r.code != 0 and "give one of them" in r.err
    r = run_cli(ws, "export", tmp_path / "y", "--version", "v7")
    assert r.code != 0 and "no version 'v7'" in r.err
