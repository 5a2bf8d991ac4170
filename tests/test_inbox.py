"""Files dropped into inbox/ while the daemon runs: each claimed once complete and trained exactly once."""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter

import pytest

from service import running, write_jsonl

pytestmark = pytest.mark.slow
FAST = {"training": {"batch_size": 2, "grad_accum": 1, "save_every": 3, "max_length": 48},
        "inbox": {"settle_seconds": 1.0, "poll_seconds": 0.2}, "daemon": {"min_free_mb": 0}}


@pytest.fixture
def service(workspace):
    with running(workspace(**FAST)) as svc:
        yield svc


def _slow_writer(path, n_lines, pause):
    with open(path, "w") as f:
        for i in range(n_lines):
            line = json.dumps({"text": f"slow line {i + 1}"}) + "\n"
            half = len(line) // 2
            f.write(line[:half])  # a line cut in two: a premature claim would see invalid JSON
            f.flush()
            time.sleep(pause)
            f.write(line[half:])
            f.flush()


def test_dropped_files_are_each_trained_exactly_once(service, tmp_path):
    inbox = service.ws / "inbox"
    writer = threading.Thread(target=_slow_writer, args=(inbox / "slow.jsonl", 12, 0.15))
    writer.start()  # 12 lines over ~2 s, never still for 1 s
    staged = write_jsonl(tmp_path / "staged.jsonl", [f"staged {i}" for i in range(1, 9)])
    (inbox / "renamed.jsonl.part").write_bytes(staged.read_bytes())
    time.sleep(1.5)  # the .part file is ignored however long it sits
    assert "renamed.jsonl.part" not in service.jobs()
    os.rename(inbox / "renamed.jsonl.part", inbox / "renamed.jsonl")
    writer.join()
    service.wait(lambda: {j["state"] for j in service.jobs().values()} == {"done"} and len(service.jobs()) == 2,
                 120, "both files to train")
    jobs = service.jobs()
    assert jobs["slow.jsonl"]["examples"] == 12 and jobs["renamed.jsonl"]["examples"] == 8
    audit = service.query("SELECT job_id, lines FROM audit ORDER BY step")
    for name, n in (("slow.jsonl", 12), ("renamed.jsonl", 8)):
        lines = Counter(x for r in audit if r["job_id"] == jobs[name]["id"] for x in json.loads(r["lines"]))
        assert lines == Counter(range(1, n + 1))
    assert not any(p.suffix == ".jsonl" for p in inbox.iterdir())  # claimed files left the inbox...
    service.wait(lambda: len(list((service.ws / "finished").glob("*.jsonl"))) == 2, 30, "originals to move")
    finished = service.ws / "finished"
    assert (finished / f"{jobs['renamed.jsonl']['id']:05d}-renamed.jsonl").read_bytes() == staged.read_bytes()
    assert (finished / f"{jobs['slow.jsonl']['id']:05d}-slow.jsonl").exists()  # ...and were kept


def test_same_name_twice_never_overwrites(service):
    inbox = service.ws / "inbox"
    write_jsonl(inbox / "data.jsonl", ["first a", "first b"])
    service.wait(lambda: len(service.jobs()) == 1, 60, "the first file to be claimed")
    write_jsonl(inbox / "data.jsonl", ["second a", "second b", "second c"])
    service.wait(lambda: len(service.query("SELECT id FROM jobs WHERE state = 'done'")) == 2, 120, "both to train")
    rows = service.query("SELECT * FROM jobs ORDER BY id")
    assert [r["examples"] for r in rows] == [2, 3] and rows[0]["fingerprint"] != rows[1]["fingerprint"]
    service.wait(lambda: len(list((service.ws / "finished").iterdir())) == 2, 30, "both originals kept")


def test_what_is_not_a_jsonl_file_is_left_in_place_and_reported_once(service, tmp_path):
    inbox = service.ws / "inbox"
    (inbox / "notes.txt").write_text("hello")
    (inbox / "a-folder").mkdir()
    (inbox / "outside.jsonl").symlink_to(write_jsonl(tmp_path / "elsewhere.jsonl", ["x"]))
    (inbox / "broken.jsonl").symlink_to(tmp_path / "does-not-exist.jsonl")
    write_jsonl(inbox / "vanishes.jsonl", ["gone before it settles"])
    time.sleep(0.3)
    (inbox / "vanishes.jsonl").unlink()
    write_jsonl(inbox / "high" / "good.jsonl", ["good one", "good two"])
    service.wait(lambda: service.jobs().get("good.jsonl", {}).get("state") == "done", 120, "the good file")
    time.sleep(1.5)  # several more scans: each problem must still be reported only once
    out = service.messages()
    assert out.count("left notes.txt in place: not a .jsonl file") == 1
    assert out.count("left a-folder in place: a folder") == 1
    assert out.count("left outside.jsonl in place: a symlink to") == 1
    assert out.count("left broken.jsonl in place: a symlink to") == 1  # points outside the inbox (and nowhere)
    assert all((inbox / n).exists() or (inbox / n).is_symlink()
               for n in ("notes.txt", "a-folder", "outside.jsonl", "broken.jsonl"))
    assert set(service.jobs()) == {"good.jsonl"}  # the vanished file never became a job
    assert service.jobs()["good.jsonl"]["priority"] == 0  # inbox/high/
    assert service.proc.poll() is None  # and the daemon is still running


def test_bad_file_in_inbox_is_rejected_at_once_and_kept(service):
    inbox = service.ws / "inbox"
    (inbox / "bad.jsonl").write_text('{"text": "ok"}\n{"text": 3}\nnot json\n')
    service.wait(lambda: service.jobs().get("bad.jsonl", {}).get("state") == "rejected", 60, "the rejection")
    job = service.jobs()["bad.jsonl"]
    assert "line 2" in job["error"] and "line 3" in job["error"] and job["attempts"] == 0
    kept = service.ws / "rejected" / f"{job['id']:05d}-bad.jsonl"
    assert kept.read_text().startswith('{"text": "ok"}')
    assert not (inbox / "bad.jsonl").exists()
