"""Held-out sets and the forgetting matrix: examples of each job set aside by (seed, fingerprint), never trained,
scored at every evaluation; `conveyor eval --matrix` shows versions × sets."""

from __future__ import annotations

import json
from collections import Counter

from conftest import audit, drain_with_requests, ledger, run_cli, set_setting, status, text_file

from conveyor.data import holdout
from conveyor.data.formats import Tokenized, TokenizedFile


def _matrix(ws) -> dict:
    r = run_cli(ws, "eval", "--matrix", "--json")
    assert r.code == 0, r.out + r.err
    return json.loads(r.out)


def _held(ws, job_id: int) -> list[int]:
    return next(j for j in status(ws)["jobs"] if j["id"] == job_id)["held_out"]


def test_held_out_lines_are_never_trained_and_the_matrix_has_a_column_per_job_and_a_row_per_version(workspace,
                                                                                                    tmp_path):
    ws = workspace(eval={"holdout": 3})
    files = [text_file(tmp_path / "a.jsonl", 19, "a"), text_file(tmp_path / "b.jsonl", 11, "b"),
             text_file(tmp_path / "c.jsonl", 11, "c")]
    r = run_cli(ws, "train", *files, "-q")
    assert r.code == 0, r.out + r.err
    held = {j: _held(ws, j) for j in (1, 2, 3)}
    assert [len(h) for h in held.values()] == [3, 3, 3]
    # Law 1 counts the trained examples only: 16 / 8 = 2 steps, then 8 / 8 = 1 and 1.
    assert [(r["job"], r["start_step"], r["end_step"], r["examples"]) for r in ledger(ws)] == \
        [(1, 1, 2, 16), (2, 3, 3, 8), (3, 4, 4, 8)]
    rows = audit(ws)
    for job, n in ((1, 19), (2, 11), (3, 11)):
        trained = Counter(x for r in rows if r["job"] == job for x in r["lines"])
        assert trained == Counter(set(range(1, n + 1)) - set(held[job]))  # every other line exactly once
    m = _matrix(ws)
    assert [(s["name"], s["job"], s["file"], s["examples"]) for s in m["sets"]] == \
        [("job 1", 1, "a.jsonl", 3), ("job 2", 2, "b.jsonl", 3), ("job 3", 3, "c.jsonl", 3)]
    assert [(r["version"], r["step"]) for r in m["rows"]] == [("v1", 2), ("v2", 3), ("v3", 4)]
    present = [[r["loss"][s] is not None for s in ("job 1", "job 2", "job 3")] for r in m["rows"]]
    assert present == [[True, False, False], [True, True, False], [True, True, True]]
    assert all(loss > 0 for r in m["rows"] for loss in r["loss"].values() if loss is not None)
    versions = json.loads(run_cli(ws, "versions", "--json").out)
    assert versions[2]["eval"] == m["rows"][2]["loss"]
    assert "job 3" in run_cli(ws, "eval").out


def test_the_held_out_choice_is_fixed_by_seed_and_fingerprint_and_a_fraction_rounds(workspace, tmp_path):
    a = text_file(tmp_path / "a.jsonl", 20, "a")
    first = workspace("one", eval={"holdout": 0.25})
    second = workspace("two", eval={"holdout": 0.25})
    for ws in (first, second):
        assert run_cli(ws, "train", a, "-q").code == 0
    assert _held(first, 1) == _held(second, 1) and len(_held(first, 1)) == 5  # 0.25 × 20
    assert ledger(first)[0]["examples"] == 15
    other_seed = workspace("three", eval={"holdout": 0.25}, training={"seed": 7})
    assert run_cli(other_seed, "train", a, "-q").code == 0
    assert len(_held(other_seed, 1)) == 5 and _held(other_seed, 1) != _held(first, 1)


def test_a_job_under_way_keeps_its_held_out_set_when_the_setting_changes(workspace, tmp_path):
    ws = workspace(eval={"holdout": 4}, training={"batch_size": 2, "grad_accum": 1, "save_every": 1})
    assert run_cli(ws, "add", text_file(tmp_path / "a.jsonl", 14, "a")).code == 0
    assert drain_with_requests(ws, "stop@2").code == 75
    before = _held(ws, 1)
    set_setting(ws, "eval", "holdout", "2")
    assert run_cli(ws, "run", "--drain", "-q").code == 0
    assert _held(ws, 1) == before and len(before) == 4
    rows = audit(ws)
    assert [r["step"] for r in rows] == list(range(1, 6))  # 10 trained examples, 2 a step
    assert Counter(x for r in rows for x in r["lines"]) == Counter(set(range(1, 15)) - set(before))


def test_holdout_leaves_at_least_one_example_to_train():
    assert holdout.count(3, 3) == 2 and holdout.count(3, 1) == 0 and holdout.count(0.5, 9) == 4
    assert holdout.count(0, 100) == 0 and holdout.count(0.001, 100) == 0
    data = TokenizedFile([Tokenized(line, [1, 2], [1, 2]) for line in range(1, 11)])
    lines = holdout.choose(42, "f" * 64, data, 3)
    parts = holdout.split(data, lines)
    assert [e.line for e in parts.held] == lines and len(parts.trained.examples) == 7
    assert sorted([e.line for e in parts.trained.examples] + lines) == list(range(1, 11))


def test_a_bad_holdout_setting_is_named(workspace, tmp_path):
    ws = workspace()
    set_setting(ws, "eval", "holdout", "2.5")
    r = run_cli(ws, "run", "--drain")
    assert r.code != 0 and "eval.holdout" in r.err and "whole number" in r.err


def test_held_out_examples_lost_from_data_are_rebuilt_from_the_stored_file(workspace, tmp_path):
    files = [text_file(tmp_path / f"{t}.jsonl", 11, t) for t in "abc"]
    kept, rebuilt = workspace("kept", eval={"holdout": 3}), workspace("rebuilt", eval={"holdout": 3})
    for ws in (kept, rebuilt):
        assert run_cli(ws, "train", *files[:2], "-q").code == 0
    removed = list((rebuilt / "data" / "holdout").glob("job-*.json"))
    assert len(removed) == 2
    for path in removed:
        path.unlink()
    for ws in (kept, rebuilt):
        assert run_cli(ws, "train", files[2], "-q").code == 0
    assert _matrix(rebuilt)["rows"][-1]["loss"] == _matrix(kept)["rows"][-1]["loss"]
    assert len(list((rebuilt / "data" / "holdout").glob("job-*.json"))) == 3
