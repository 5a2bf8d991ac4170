"""Retention: the base model's answers to the probe recorded once and kept (verified), and every version scored
against them; on `tiny`, training on unrelated data lowers retention below the base's own row."""

from __future__ import annotations

import json
import os
import re

import pytest
from conftest import chat_file, run_cli, status, text_file


def _matrix(ws) -> dict:
    r = run_cli(ws, "eval", "--matrix", "--json")
    assert r.code == 0, r.out + r.err
    return json.loads(r.out)


def _warnings(ws) -> list[str]:
    return [w for j in status(ws)["jobs"] for w in j.get("warnings") or []]


def test_unrelated_training_lowers_retention_below_the_base(workspace, tmp_path):
    ws = workspace(eval={"probe": "general", "max_new_tokens": 8}, training={"learning_rate": 3e-3})
    r = run_cli(ws, "train", chat_file(tmp_path / "a.jsonl", 16), text_file(tmp_path / "b.jsonl", 16), "-q")
    assert r.code == 0, r.out + r.err
    m = _matrix(ws)
    assert [(s["name"], s["file"], s["examples"]) for s in m["sets"]] == [("retention", "base answers", 36)]
    base, v1, v2 = m["rows"]
    assert (base["version"], base["step"], base["job"]) == ("base", 0, None)
    assert base["answers"]["retention"] == {"exact": 1.0, "f1": 1.0, "answered": 36}
    for row in (v1, v2):
        kept = row["answers"]["retention"]
        assert kept["answered"] == 36 and kept["f1"] < 1.0  # its answers moved away from the base's
        assert row["loss"]["retention"] > base["loss"]["retention"]  # and the base's answers grew less likely
    [kept_file] = (ws / "data" / "probe").glob("*.json")
    data = json.loads(kept_file.read_text())
    assert len(data["answers"]) == 36 and data["source"] == "the built-in general set"


@pytest.mark.slow
def test_the_base_answers_are_recorded_once_and_kept(workspace, tmp_path):
    ws = workspace(eval={"probe": "general", "max_new_tokens": 4})
    assert run_cli(ws, "train", chat_file(tmp_path / "a.jsonl", 8), "-q").code == 0
    [kept] = (ws / "data" / "probe").glob("*.json")
    os.utime(kept, (1_000_000, 1_000_000))
    assert run_cli(ws, "train", chat_file(tmp_path / "b.jsonl", 12), "-q").code == 0
    assert kept.stat().st_mtime == 1_000_000  # read and verified, not written again
    rows = _matrix(ws)["rows"]
    assert [r["version"] for r in rows] == ["base", "v1", "v2"]  # one base row: recorded once
    assert not _warnings(ws)


@pytest.mark.slow
def test_changed_base_answers_are_named_and_recorded_again_from_the_base(workspace, tmp_path):
    ws = workspace(eval={"probe": "general", "max_new_tokens": 4})
    assert run_cli(ws, "train", chat_file(tmp_path / "a.jsonl", 8), "-q").code == 0
    [kept] = (ws / "data" / "probe").glob("*.json")
    recorded = json.loads(kept.read_text())
    changed = {**recorded, "answers": ["Paris"] * 36}
    kept.write_text(json.dumps(changed))
    assert run_cli(ws, "train", chat_file(tmp_path / "b.jsonl", 12), "-q").code == 0
    [warning] = _warnings(ws)
    assert f"the probe's kept base answers, data/probe/{kept.name} no longer holds the answers written there" in \
        warning and "recorded again from the base model" in warning
    assert json.loads(kept.read_text())["answers"] == recorded["answers"]  # LoRA: the base is the adapter off


def test_a_probe_that_cannot_be_read_is_said_on_the_job_and_training_goes_on(workspace, tmp_path):
    (tmp_path / "probe.jsonl").write_text('{"prompt": "fine"}\n{"prompt": 3}\n')
    ws = workspace(eval={"probe": str(tmp_path / "probe.jsonl")})
    r = run_cli(ws, "train", chat_file(tmp_path / "a.jsonl", 8), "-q")
    assert r.code == 0, r.out + r.err
    [warning] = _warnings(ws)
    assert warning.startswith(f"retention not measured: eval.probe: {tmp_path / 'probe.jsonl'}, line 2: needs a "
                              "non-empty \"prompt\" string")
    assert not (ws / "data" / "probe").exists()


def test_auto_measures_nothing_on_the_random_weight_built_ins(workspace, tmp_path):
    ws = workspace()  # eval.probe = "auto" by default; the model is tiny
    assert run_cli(ws, "train", chat_file(tmp_path / "a.jsonl", 8), "-q").code == 0
    assert not (ws / "data" / "probe").exists() and _matrix(ws)["sets"] == []


def test_a_full_fine_tune_that_trained_before_the_probe_was_set_records_the_base_from_its_folder(workspace,
                                                                                                   tmp_path):
    from conftest import set_setting

    ws = workspace(adapter={"method": "full"}, eval={"max_new_tokens": 4})
    assert run_cli(ws, "train", chat_file(tmp_path / "a.jsonl", 8), "-q").code == 0
    set_setting(ws, "eval", "probe", '"general"')
    r = run_cli(ws, "train", chat_file(tmp_path / "b.jsonl", 12), "-q")
    assert r.code == 0 and "job 2: recording the base model's answers to the probe (the built-in general set) " \
        "from" in " ".join(r.out.split()), r.out + r.err
    assert not _warnings(ws)
    rows = _matrix(ws)["rows"]  # no base row: the base is not in memory to score its own answers' loss
    assert [r["version"] for r in rows] == ["v1", "v2"] and rows[0]["answers"] == {}
    assert rows[1]["answers"]["retention"]["answered"] == 36


@pytest.mark.slow
def test_the_retention_gate_holds_the_queue_and_says_why(workspace, tmp_path):
    ws = workspace(eval={"probe": "general", "max_new_tokens": 8, "gate_retention": 0.9},
                   training={"learning_rate": 3e-3})
    r = run_cli(ws, "train", chat_file(tmp_path / "a.jsonl", 16), chat_file(tmp_path / "b.jsonl", 8), "-q")
    assert r.code == 1, r.out + r.err  # the gate ended the drain
    said = " ".join((r.out + r.err).split())
    assert re.search(r"eval\.gate: v1 \(job 1, a\.jsonl\) kept \d+% of the base model's answers to the probe \(F1\), "
                     r"below eval\.gate_retention = 90%\. The queue is paused and v1 marked gated", said), said
    assert [j["state"] for j in status(ws)["jobs"]] == ["done", "queued"]
    versions = json.loads(run_cli(ws, "versions", "--json").out)
    assert versions[0]["gated"].startswith("eval.gate: v1")


def test_a_retention_gate_without_a_probe_says_it_cannot_judge(workspace, tmp_path):
    ws = workspace(eval={"gate_retention": 0.9})  # probe "auto": nothing measured on tiny
    assert run_cli(ws, "train", chat_file(tmp_path / "a.jsonl", 8), "-q").code == 0
    [warning] = _warnings(ws)
    assert "eval.gate_retention = 90% could not judge v1: its retention was not measured (eval.probe = 'auto'" \
        in warning
