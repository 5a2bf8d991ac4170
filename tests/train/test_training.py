"""End to end through the real CLI on the tiny model: step accounting (law 1), exactly once (law 2),
content identity (law 4) and never silent (law 7)."""

from __future__ import annotations

import json
from collections import Counter

from conftest import audit, checkpoint_steps, ledger, run_cli, status, text_file


def _jobs(ws):
    return {j["id"]: j for j in status(ws)["jobs"]}


def test_post_mortem_two_files_of_20(workspace, tmp_path):
    """File 1 (20 ex) then file 2 (20 ex), batch 4 × grad_accum 2: steps 1–3, then 4–6, never 0 steps."""
    ws = workspace()
    a, b = text_file(tmp_path / "a.jsonl", 20, "a"), text_file(tmp_path / "b.jsonl", 20, "b")
    r = run_cli(ws, "train", a, b, "-q", subprocess_=True)
    assert r.code == 0, r.out + r.err
    s = status(ws)
    jobs = {j["file"]: j for j in s["jobs"]}
    assert (jobs["a.jsonl"]["start_step"], jobs["a.jsonl"]["end_step"], jobs["a.jsonl"]["planned_steps"]) == (1, 3, 3)
    assert (jobs["b.jsonl"]["start_step"], jobs["b.jsonl"]["end_step"], jobs["b.jsonl"]["planned_steps"]) == (4, 6, 3)
    assert all(j["state"] == "done" for j in s["jobs"])
    assert s["run"]["global_step"] == 6
    steps = checkpoint_steps(ws, s["run"]["id"])
    assert steps == sorted(set(steps)) and steps[-1] == 6 and 3 in steps  # job ends kept, strictly increasing
    rows = ledger(ws)
    assert [(r["start_step"], r["end_step"], r["examples"]) for r in rows] == [(1, 3, 20), (4, 6, 20)]
    assert [a["step"] for a in audit(ws)] == [1, 2, 3, 4, 5, 6]


def test_run_at_step_100_gets_a_50_step_file(workspace, tmp_path):
    ws = workspace(training={"batch_size": 1, "grad_accum": 1, "save_every": 50})
    run_cli(ws, "train", text_file(tmp_path / "first.jsonl", 100, "f"), "-q")
    assert status(ws)["run"]["global_step"] == 100
    r = run_cli(ws, "train", text_file(tmp_path / "second.jsonl", 50, "s"), "-q")
    assert r.code == 0, r.out + r.err
    job = [j for j in status(ws)["jobs"] if j["file"] == "second.jsonl"][0]
    assert (job["start_step"], job["end_step"], job["state"]) == (101, 150, "done")
    assert status(ws)["run"]["global_step"] == 150
    assert len([a for a in audit(ws) if a["job"] == job["id"]]) == 50


def test_dataset_switch_trains_every_step_of_a_shorter_file(workspace, tmp_path):
    """Step 40 from 320 examples, then 100 examples (13 steps): all 13 trained, ending at 53, no line skipped."""
    ws = workspace(training={"save_every": 100})
    run_cli(ws, "train", text_file(tmp_path / "long.jsonl", 320, "l"), "-q")
    assert status(ws)["run"]["global_step"] == 40
    run_cli(ws, "train", text_file(tmp_path / "short.jsonl", 100, "s"), "-q")
    job = [j for j in status(ws)["jobs"] if j["file"] == "short.jsonl"][0]
    assert (job["planned_steps"], job["start_step"], job["end_step"]) == (13, 41, 53)
    rows = [a for a in audit(ws) if a["job"] == job["id"]]
    assert [a["step"] for a in rows] == list(range(41, 54))
    assert sorted(line for a in rows for line in a["lines"]) == list(range(1, 101))
    assert len(rows[-1]["lines"]) == 4  # the last partial step: 100 = 12 × 8 + 4


def test_three_files_audit_is_exactly_once_per_epoch(workspace, tmp_path):
    ws = workspace()
    files = [text_file(tmp_path / "one.jsonl", 17, "o"), text_file(tmp_path / "two.jsonl", 9, "t")]
    assert run_cli(ws, "add", *files).code == 0
    assert run_cli(ws, "add", text_file(tmp_path / "three.jsonl", 11, "h"), "--epochs", "2").code == 0
    assert run_cli(ws, "run", "--drain", "-q").code == 0
    jobs = sorted(status(ws)["jobs"], key=lambda j: j["id"])
    assert [j["planned_steps"] for j in jobs] == [3, 2, 3]  # ceil(17/8), ceil(9/8), ceil(22/8)
    rows = audit(ws)
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert all(r["lines"] for r in rows)
    assert [r["job"] for r in rows] == [jobs[0]["id"]] * 3 + [jobs[1]["id"]] * 2 + [jobs[2]["id"]] * 3
    for job, n, epochs in ((jobs[0], 17, 1), (jobs[1], 9, 1), (jobs[2], 11, 2)):
        seen = Counter(line for r in rows if r["job"] == job["id"] for line in r["lines"])
        assert seen == Counter({line: epochs for line in range(1, n + 1)})
    # each epoch of the 2-epoch job is a whole pass: the first 11 positions hold every line once
    two_epoch = [line for r in rows if r["job"] == jobs[2]["id"] for line in r["lines"]]
    assert sorted(two_epoch[:11]) == list(range(1, 12)) and sorted(two_epoch[11:]) == list(range(1, 12))
    assert two_epoch[:11] != two_epoch[11:]  # epochs are ordered differently (seed, fingerprint, epoch)


def test_data_order_is_fixed_by_seed_and_content(workspace, tmp_path):
    data = text_file(tmp_path / "d.jsonl", 24, "d")
    orders = []
    for name in ("x", "y"):
        ws = workspace(name)
        run_cli(ws, "train", data, "-q")
        orders.append([r["lines"] for r in audit(ws)])
    assert orders[0] == orders[1]
    assert [line for lines in orders[0] for line in lines] != list(range(1, 25))  # shuffled, not file order


def test_same_bytes_under_another_name_is_the_same_dataset(workspace, tmp_path):
    ws = workspace()
    a = text_file(tmp_path / "a.jsonl", 8, "a")
    copy = tmp_path / "elsewhere" / "renamed.jsonl"
    copy.parent.mkdir()
    copy.write_bytes(a.read_bytes())
    r = run_cli(ws, "train", a, copy, "-q")
    assert r.code == 0
    jobs = sorted(status(ws)["jobs"], key=lambda j: j["id"])
    assert jobs[0]["fingerprint"] == jobs[1]["fingerprint"]
    assert [j["state"] for j in jobs] == ["done", "done"]  # default: trained again...
    assert any("job 1 (a.jsonl), trained at steps 1–1" in w for w in jobs[1]["warnings"])  # ...with a warning
    assert "same bytes" in r.out + r.err
    # New bytes under the old name are a new dataset.
    a.write_text(a.read_text() + json.dumps({"text": "one more"}) + "\n")
    run_cli(ws, "add", a)
    assert len({j["fingerprint"] for j in status(ws)["jobs"]}) == 2


def test_skip_duplicates_skips_with_reason(workspace, tmp_path):
    ws = workspace(data={"skip_duplicates": True})
    a = text_file(tmp_path / "a.jsonl", 8, "a")
    b = tmp_path / "b.jsonl"
    b.write_bytes(a.read_bytes())
    assert run_cli(ws, "train", a, b, "-q").code == 0
    jobs = sorted(status(ws)["jobs"], key=lambda j: j["id"])
    assert [j["state"] for j in jobs] == ["done", "skipped"]
    assert "job 1 (a.jsonl)" in jobs[1]["error"] and "skip_duplicates" in jobs[1]["error"]
    assert status(ws)["run"]["global_step"] == 1
    assert len(ledger(ws)) == 1


def test_editing_the_original_after_enqueue_changes_nothing(workspace, tmp_path):
    ws = workspace()
    a = text_file(tmp_path / "a.jsonl", 16, "a")
    run_cli(ws, "add", a)
    a.write_text('{"text": "changed"}\n')
    run_cli(ws, "run", "--drain", "-q")
    job = status(ws)["jobs"][0]
    assert (job["examples"], job["planned_steps"], job["state"]) == (16, 2, "done")
    assert a.read_text() == '{"text": "changed"}\n'  # the person's file was not touched by conveyor
