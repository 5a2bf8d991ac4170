"""The regression gate (eval.gate): a job that raises an earlier held-out set's loss by more than the gate holds
the queue, marks its version gated and says which set rose by how much; `conveyor resume` continues."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import ledger, run_cli, set_setting, status, text_file
from service import running

# A full fine-tune at a high rate, 6 epochs: job b's endings overwrite job a's (a's held-out loss rises ~45%).
FORGETFUL = {"adapter": {"method": "full"}, "training": {"learning_rate": 1e-2, "epochs": 6}}


def _keyed(path: Path, n: int, ending: str) -> Path:
    """Lines "key i: <ending>": two files with other endings teach contradicting continuations of one prefix."""
    path.write_text("".join(json.dumps({"text": f"key {i}: {ending}"}) + "\n" for i in range(1, n + 1)))
    return path


def test_a_job_that_raises_an_earlier_sets_loss_holds_the_queue_until_resume(workspace, tmp_path):
    ws = workspace(eval={"holdout": 3, "gate": 0.1}, **FORGETFUL)
    a, b, c = (_keyed(tmp_path / "a.jsonl", 19, "red green blue"), _keyed(tmp_path / "b.jsonl", 19, "one two three"),
               text_file(tmp_path / "c.jsonl", 11, "c"))
    r = run_cli(ws, "train", a, b, c, "-q")
    assert r.code == 1, r.out + r.err  # held, not failed: c waits
    versions = json.loads(run_cli(ws, "versions", "--json").out)
    assert [(v["version"], v["job"], bool(v["gated"])) for v in versions] == [("v1", 1, False), ("v2", 2, True)]
    text = versions[1]["gated"]
    before, after = versions[0]["eval"]["job 1"], versions[1]["eval"]["job 1"]
    assert after > before * 1.1  # learning b's endings made a's worse
    assert f"job 1 (a.jsonl) {before:.4f} → {after:.4f} ({(after - before) / before:+.1%})" in text
    assert "eval.gate = 10%" in text
    assert "`conveyor resume` accepts v2" in text and "`conveyor rollback v1`" in text
    events = [json.loads(line) for line in run_cli(ws, "logs").out.splitlines()]
    assert [e["message"] for e in events if e["kind"] == "gate"] == [text]
    assert status(ws)["daemon"]["paused"] is True
    assert [j["state"] for j in status(ws)["jobs"]] == ["done", "done", "queued"]
    assert json.loads(run_cli(ws, "eval", "--json").out)["rows"][1]["gated"] == text
    r = run_cli(ws, "run", "--drain", "-q")  # still held: a drain says so and ends
    assert r.code == 1 and "paused by eval.gate" in r.out + r.err
    r = run_cli(ws, "resume")
    assert r.code == 0 and "no longer paused" in r.out
    assert status(ws)["daemon"]["paused"] is False
    r = run_cli(ws, "run", "--drain", "-q")  # c trains; it raises b's loss in turn, and is gated too
    assert r.code == 1 and "eval.gate: v3 (job 3, c.jsonl) raised the held-out loss of job" in r.out + r.err
    assert [(x["job"], x["start_step"], x["end_step"]) for x in ledger(ws)] == [(1, 1, 12), (2, 13, 24), (3, 25, 30)]
    assert [bool(v["gated"]) for v in json.loads(run_cli(ws, "versions", "--json").out)] == [False, True, True]


def test_the_gate_is_off_by_default_and_resume_without_a_pause_says_so(workspace, tmp_path):
    ws = workspace(eval={"holdout": 3}, **FORGETFUL)
    r = run_cli(ws, "train", _keyed(tmp_path / "a.jsonl", 19, "red green blue"),
                _keyed(tmp_path / "b.jsonl", 19, "one two three"), "-q")
    assert r.code == 0 and not any(v["gated"] for v in json.loads(run_cli(ws, "versions", "--json").out))
    r = run_cli(ws, "resume")
    assert r.code != 0 and "not paused" in r.err


@pytest.mark.slow
def test_the_gate_pauses_a_running_daemon_and_resume_continues(workspace, tmp_path):
    """The service: a gated version pauses the daemon between jobs (it stays up); `conveyor resume` goes on."""
    ws = workspace(eval={"holdout": 3, "gate": 0.1}, **FORGETFUL)
    for name, ending in (("a.jsonl", "red green blue"), ("b.jsonl", "one two three")):
        assert run_cli(ws, "add", _keyed(tmp_path / name, 19, ending)).code == 0
    assert run_cli(ws, "add", text_file(tmp_path / "c.jsonl", 11, "c")).code == 0
    with running(ws) as svc:
        svc.wait(lambda: any(r["gated"] for r in svc.query("SELECT gated FROM versions")), 300, "the gate")
        svc.wait(lambda: "paused: eval.gate holds the queue" in svc.messages(), 60, "the daemon to pause")
        assert [j["state"] for j in svc.jobs().values()] == ["done", "done", "queued"]
        assert svc.proc.poll() is None  # paused, not stopped
        r = run_cli(ws, "resume", subprocess_=True)
        assert r.code == 0 and "resumed" in r.out, r.out + r.err
        svc.wait(lambda: svc.jobs()["c.jsonl"]["state"] == "done", 300, "job 3 to train after resume")
    assert [(x["job"], x["start_step"], x["end_step"]) for x in ledger(ws)] == [(1, 1, 12), (2, 13, 24), (3, 25, 30)]


def test_a_gate_without_held_out_sets_is_a_settings_error(workspace, tmp_path):
    ws = workspace()
    set_setting(ws, "eval", "gate", "0.1")
    r = run_cli(ws, "run", "--drain")
    assert r.code != 0 and "eval.gate = 0.1" in r.err and "eval.holdout = 0 holds none out" in r.err
