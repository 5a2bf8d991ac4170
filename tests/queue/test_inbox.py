"""Files dropped into inbox/: each claimed once complete and trained exactly once (daemon scenarios, slow), and
the claiming itself in-process (fast): kept names, the same bytes dropped twice, training.epochs, last resorts."""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from types import SimpleNamespace

import pytest
from conftest import run_cli
from service import running, write_jsonl

from conveyor.data.kept import NAME_MAX, REASON, kept_path, printable
from conveyor.queue import inbox as inbox_module
from conveyor.queue.inbox import Inbox, enqueue, file_finished
from conveyor.store import jobs
from conveyor.store.workspace import Workspace

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


@pytest.mark.slow
def test_dropped_files_are_each_trained_exactly_once(service, tmp_path):
    inbox = service.ws / "inbox"
    writer = threading.Thread(target=_slow_writer, args=(inbox / "slow.jsonl", 12, 0.15))
    writer.start()  # 12 lines over ~2 s, never still for 1 s
    staged = write_jsonl(tmp_path / "staged.jsonl", [f"staged {i}" for i in range(1, 9)])
    (inbox / "renamed.jsonl.part").write_bytes(staged.read_bytes())
    # A witness dropped after the .part file is claimed once settled: the .part file had settled as long.
    write_jsonl(inbox / "witness.jsonl", ["witness"])
    service.wait(lambda: "witness.jsonl" in service.jobs(), 60, "the witness file to be claimed")
    assert "renamed.jsonl.part" not in service.jobs()  # ignored however long it sits
    os.rename(inbox / "renamed.jsonl.part", inbox / "renamed.jsonl")
    writer.join()
    service.wait(lambda: {j["state"] for j in service.jobs().values()} == {"done"} and len(service.jobs()) == 3,
                 120, "the files to train")
    jobs = service.jobs()
    assert jobs["slow.jsonl"]["examples"] == 12 and jobs["renamed.jsonl"]["examples"] == 8
    audit = service.query("SELECT job_id, lines FROM audit ORDER BY step")
    for name, n in (("slow.jsonl", 12), ("renamed.jsonl", 8)):
        lines = Counter(x for r in audit if r["job_id"] == jobs[name]["id"] for x in json.loads(r["lines"]))
        assert lines == Counter(range(1, n + 1))
    assert not any(p.suffix == ".jsonl" for p in inbox.iterdir())  # claimed files left the inbox...
    service.wait(lambda: len(list((service.ws / "finished").glob("*.jsonl"))) == 3, 30, "originals to move")
    finished = service.ws / "finished"
    assert (finished / f"{jobs['renamed.jsonl']['id']:05d}-renamed.jsonl").read_bytes() == staged.read_bytes()
    assert (finished / f"{jobs['slow.jsonl']['id']:05d}-slow.jsonl").exists()  # ...and were kept


@pytest.mark.slow
def test_same_name_twice_never_overwrites(service):
    inbox = service.ws / "inbox"
    write_jsonl(inbox / "data.jsonl", ["first a", "first b"])
    service.wait(lambda: len(service.jobs()) == 1, 60, "the first file to be claimed")
    write_jsonl(inbox / "data.jsonl", ["second a", "second b", "second c"])
    service.wait(lambda: len(service.query("SELECT id FROM jobs WHERE state = 'done'")) == 2, 120, "both to train")
    rows = service.query("SELECT * FROM jobs ORDER BY id")
    assert [r["examples"] for r in rows] == [2, 3] and rows[0]["fingerprint"] != rows[1]["fingerprint"]
    service.wait(lambda: len(list((service.ws / "finished").iterdir())) == 2, 30, "both originals kept")


@pytest.mark.slow
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
    write_jsonl(inbox / "witness.jsonl", ["witness"])  # claimed only after more scans than the problems needed
    service.wait(lambda: service.jobs().get("witness.jsonl", {}).get("state") == "done", 120, "the witness file")
    out = service.messages()
    assert out.count("left notes.txt in place: not a .jsonl file") == 1
    assert out.count("left a-folder in place: a folder") == 1
    assert out.count("left outside.jsonl in place: a symlink to") == 1
    assert out.count("left broken.jsonl in place: a symlink to") == 1  # points outside the inbox (and nowhere)
    assert all((inbox / n).exists() or (inbox / n).is_symlink()
               for n in ("notes.txt", "a-folder", "outside.jsonl", "broken.jsonl"))
    assert set(service.jobs()) == {"good.jsonl", "witness.jsonl"}  # the vanished file never became a job
    assert service.jobs()["good.jsonl"]["priority"] == 0  # inbox/high/
    assert service.proc.poll() is None  # and the daemon is still running


@pytest.mark.slow
def test_bad_file_in_inbox_is_rejected_at_once_and_kept(service):
    inbox = service.ws / "inbox"
    (inbox / "bad.jsonl").write_text('{"text": "ok"}\n{"text": 3}\nnot json\n')
    service.wait(lambda: service.jobs().get("bad.jsonl", {}).get("state") == "rejected", 60, "the rejection")
    job = service.jobs()["bad.jsonl"]
    assert "line 2" in job["error"] and "line 3" in job["error"] and job["attempts"] == 0
    kept = service.ws / "rejected" / f"{job['id']:05d}-bad.jsonl"
    assert kept.read_text().startswith('{"text": "ok"}')
    # The job is recorded first, then the original leaves the inbox (rejected/ holds the identical copy).
    service.wait(lambda: not (inbox / "bad.jsonl").exists(), 30, "the original to leave the inbox")


# In-process claiming (fast) ------------------------------------------------------------------------------------

def _inbox(root, **kwargs) -> tuple[Inbox, list[str]]:
    """An Inbox without a daemon: settle 0, so a file is claimed by the scan after the one that first saw it."""
    said: list[str] = []
    inbox = Inbox(Workspace.open(root), 0.0, lambda level, text: said.append(text), **kwargs)
    inbox.ws.inbox.mkdir(exist_ok=True)
    return inbox, said


def _claim(inbox: Inbox) -> list:
    return inbox.scan() + inbox.scan()


def test_kept_names_fit_the_file_system_keep_the_extension_and_never_collide(tmp_path):
    long_name = "n" * 244 + ".jsonl"  # 250 bytes: with `00012-` and `.reason.txt` beyond NAME_MAX
    first = kept_path(tmp_path, 12, long_name)
    assert first.name.startswith("00012-nnn") and first.suffix == ".jsonl"
    assert len(first.name.encode()) + len(REASON) == NAME_MAX
    first.write_text("kept")
    (tmp_path / (first.name + REASON)).write_text("reason")  # both fit (no ENAMETOOLONG)
    second = kept_path(tmp_path, 12, long_name)
    assert second != first and second.name.endswith("-2.jsonl") and len(second.name.encode()) + len(REASON) <= 255
    unicode = kept_path(tmp_path, 3, "données été " * 30 + ".jsonl")  # 2-byte characters are never split
    assert unicode.name.startswith("00003-données été") and unicode.suffix == ".jsonl"
    assert len(unicode.name.encode()) + len(REASON) <= NAME_MAX
    assert kept_path(tmp_path, 7, "with spaces.jsonl").name == "00007-with spaces.jsonl"
    (tmp_path / ("00008-a.jsonl" + REASON)).write_text("a reason left without its file")
    assert kept_path(tmp_path, 8, "a.jsonl").name == "00008-a-2.jsonl"  # its reason file is not taken either
    assert printable(os.fsdecode(b"caf\xe9.jsonl")) == "caf\\xe9.jsonl"  # not UTF-8: storable, printable


@pytest.mark.parametrize("state", ["queued", "running", "interrupted"])
def test_same_bytes_dropped_while_their_job_waits_are_kept_and_make_no_new_job(workspace, state):
    inbox, said = _inbox(workspace())
    data = b'{"text": "one"}\n{"text": "two"}\n'
    (inbox.ws.inbox / "data.jsonl").write_bytes(data)
    [first] = _claim(inbox)
    kept = inbox.ws.root / "claimed" / f"{first.job.id:05d}-data.jsonl"
    assert first.new and jobs.get(inbox.ws.db, first.job.id).kept == str(kept) and kept.read_bytes() == data
    inbox.ws.db.execute("UPDATE jobs SET state = ?, steps_done = 1, planned_steps = 2 WHERE id = ?",
                        (state, first.job.id))
    (inbox.ws.inbox / "data.jsonl").write_bytes(data)  # the same name again...
    (inbox.ws.inbox / "copy.jsonl").write_bytes(data)  # ...and another name
    again = _claim(inbox)
    assert [r.new for r in again] == [False, False] and {r.job.id for r in again} == {first.job.id}
    assert len(jobs.all_jobs(inbox.ws.db)) == 1
    for result, name in zip(again, ["copy.jsonl", "data.jsonl"]):
        assert f"{name} is the same dataset ({first.job.fingerprint[:12]}) as job {first.job.id} (data.jsonl)" \
            in result.messages[0] and "no new job" in result.messages[0]
        assert result.messages[1] == f"{name} is kept as finished/{first.job.id:05d}-{name}"
    # The job's own original is untouched and still the one it keeps; each dropped file is kept under its own name.
    assert jobs.get(inbox.ws.db, first.job.id).kept == str(kept) and kept.read_bytes() == data
    finished = sorted((inbox.ws.root / "finished").iterdir())
    assert [p.name for p in finished] == [f"{first.job.id:05d}-copy.jsonl", f"{first.job.id:05d}-data.jsonl"]
    assert all(p.read_bytes() == data for p in finished) and not list(inbox.ws.inbox.glob("*.jsonl"))
    # When the job finishes its original joins them, under a name of its own.
    job = jobs.get(inbox.ws.db, first.job.id)
    file_finished(inbox.ws, job)
    assert jobs.get(inbox.ws.db, job.id).kept == str(inbox.ws.root / "finished" / f"{job.id:05d}-data-2.jsonl")
    assert len(list((inbox.ws.root / "finished").iterdir())) == 3
    assert all(p.read_bytes() == data for p in (inbox.ws.root / "finished").iterdir())


def test_the_cli_queues_the_same_bytes_twice_unless_their_job_stopped_mid_way(workspace, tmp_path):
    ws = Workspace.open(workspace())
    a = write_jsonl(tmp_path / "a.jsonl", ["x", "y"])
    b = tmp_path / "b.jsonl"
    b.write_bytes(a.read_bytes())
    first, second = enqueue(ws, a), enqueue(ws, b)
    assert first.new and second.new and first.job.id != second.job.id  # `conveyor train a b` asks for both
    ws.db.execute("UPDATE jobs SET state = 'interrupted' WHERE id = ?", (first.job.id,))
    third = enqueue(ws, b)  # but a job stopped mid-way resumes from its own position instead (law 2)
    assert not third.new and third.job.id == first.job.id and "no new job" in third.messages[0]
    assert len(jobs.all_jobs(ws.db)) == 2
    assert a.read_bytes() == b.read_bytes() == b'{"text": "x"}\n{"text": "y"}\n'


def test_inbox_files_get_training_epochs_from_conveyor_toml(workspace):
    inbox, said = _inbox(workspace(training={"epochs": 3}))
    write_jsonl(inbox.ws.inbox / "a.jsonl", ["a"])
    assert [r.job.epochs for r in _claim(inbox)] == [3]
    inbox.ws.config_path.write_text(inbox.ws.config_path.read_text() + "\n[training\n")  # invalid TOML now
    write_jsonl(inbox.ws.inbox / "b.jsonl", ["b"])
    assert [r.job.epochs for r in _claim(inbox)] == [3]  # the last valid setting
    other, _ = _inbox(workspace("other"), epochs=lambda: 5)  # the daemon may pass its own
    write_jsonl(other.ws.inbox / "c.jsonl", ["c"])
    assert [r.job.epochs for r in _claim(other)] == [5]


def test_without_a_valid_config_ever_inbox_files_get_one_epoch(workspace):
    inbox, _ = _inbox(workspace())
    inbox.ws.config_path.write_text("[training]\nepochs = 0\n")
    write_jsonl(inbox.ws.inbox / "a.jsonl", ["a"])
    assert [r.job.epochs for r in _claim(inbox)] == [1]


def test_a_line_nested_too_deep_is_rejected_by_line_not_the_end_of_the_daemon(workspace):
    inbox, said = _inbox(workspace())
    data = b'{"text": "fine"}\n' + b"[" * 200_000 + b"\n"
    (inbox.ws.inbox / "deep.jsonl").write_bytes(data)
    [result] = _claim(inbox)
    job = jobs.get(inbox.ws.db, result.job.id)
    assert job.state == jobs.JobState.REJECTED
    assert "line 2: nested deeper than the JSON parser allows" in job.error
    assert open(job.kept, "rb").read() == data and not (inbox.ws.inbox / "deep.jsonl").exists()
    assert (inbox.ws.rejected / f"{job.id:05d}-deep.jsonl{REASON}").read_text() == job.error + "\n"


@pytest.mark.parametrize("error, reason", [
    (MemoryError(), "the machine ran out of memory while checking it; split it into smaller files"),
    (RuntimeError("surprise"), "checking it failed unexpectedly (RuntimeError: surprise)"),
])
def test_any_failure_while_validating_rejects_that_file_with_its_reason(workspace, monkeypatch, error, reason):
    inbox, said = _inbox(workspace())
    monkeypatch.setattr(inbox_module, "scan_file", lambda *a: (_ for _ in ()).throw(error))
    write_jsonl(inbox.ws.inbox / "odd.jsonl", ["fine, really"])
    data = (inbox.ws.inbox / "odd.jsonl").read_bytes()
    [result] = _claim(inbox)
    assert result.job.state == jobs.JobState.REJECTED and result.job.error.startswith("odd.jsonl: rejected")
    assert reason in result.job.error
    assert open(result.job.kept, "rb").read() == data
    assert (inbox.ws.rejected / (os.path.basename(result.job.kept) + REASON)).read_text() == result.job.error + "\n"


def test_a_file_that_cannot_be_read_is_reported_once_left_in_place_and_retried(workspace, monkeypatch):
    inbox, said = _inbox(workspace())
    real_store, calls = inbox_module.store, []

    def locked(*args):
        calls.append(args)
        raise PermissionError(13, "denied")

    monkeypatch.setattr(inbox_module, "store", locked)
    clock = [1000.0]
    monkeypatch.setattr(inbox_module, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    path = write_jsonl(inbox.ws.inbox / "locked.jsonl", ["a"])
    for _ in range(4):
        assert inbox.scan() == []
    assert said == ["inbox: left locked.jsonl in place: cannot be read ([Errno 13] denied)"] and path.exists()
    assert len(calls) == 1  # not again until it changes or RETRY_SECONDS pass
    clock[0] += inbox_module.RETRY_SECONDS
    assert _claim(inbox) == [] and len(calls) == 2 and len(said) == 1  # tried again, not reported again
    monkeypatch.setattr(inbox_module, "store", real_store)
    write_jsonl(path, ["a", "b"])  # changed: tried again at once
    assert [r.job.examples for r in _claim(inbox)] == [2]


def test_when_even_rejecting_fails_the_file_is_reported_once_and_left(workspace, monkeypatch):
    inbox, said = _inbox(workspace())
    fail = lambda *a: (_ for _ in ()).throw(RuntimeError("database gone"))
    monkeypatch.setattr(inbox_module, "enqueue_stored", fail)
    monkeypatch.setattr(inbox_module, "reject", fail)
    path = write_jsonl(inbox.ws.inbox / "a.jsonl", ["a"])
    for _ in range(4):
        assert inbox.scan() == []
    assert said == ["inbox: left a.jsonl in place: cannot be claimed (RuntimeError: database gone); touch or copy "
                    "it again to retry"]
    assert path.read_bytes() == b'{"text": "a"}\n' and jobs.all_jobs(inbox.ws.db) == []


def test_a_file_whose_original_cannot_be_moved_still_becomes_its_job_and_stays(workspace, monkeypatch):
    inbox, said = _inbox(workspace())
    monkeypatch.setattr(inbox_module, "_move_new", lambda *a: (_ for _ in ()).throw(OSError(28, "disk full")))
    path = write_jsonl(inbox.ws.inbox / "a.jsonl", ["a"])
    data = path.read_bytes()
    [result] = _claim(inbox)
    assert result.job.state == jobs.JobState.QUEUED and path.read_bytes() == data
    assert said == [f"inbox: left a.jsonl in place: taken as job {result.job.id}, but it could not be moved out of "
                    "the inbox (OSError: [Errno 28] disk full)"]
    assert inbox.scan() == [] and len(said) == 1


def test_a_long_or_odd_name_is_claimed_and_kept_under_a_name_that_fits(workspace):
    inbox, said = _inbox(workspace())
    names = ["n" * 249 + ".jsonl", "with spaces.jsonl", "données 数据.jsonl", os.fsdecode(b"caf\xe9.jsonl")]
    for i, name in enumerate(names):
        write_jsonl(inbox.ws.inbox / name, [f"file {i}"])
    results = _claim(inbox)
    assert sorted(r.job.file for r in results) == sorted(printable(n) for n in names)
    for r in results:
        kept = jobs.get(inbox.ws.db, r.job.id).kept
        assert os.path.dirname(kept) == str(inbox.ws.root / "claimed") and os.path.exists(kept)
        assert len(os.path.basename(kept).encode()) + len(REASON) <= NAME_MAX and kept.endswith(".jsonl")
    assert not [n for n in os.listdir(inbox.ws.inbox) if n.endswith(".jsonl")] and not said


def test_scanning_survives_entries_that_cannot_be_examined(workspace, tmp_path):
    inbox, said = _inbox(workspace())
    (inbox.ws.inbox / "loop.jsonl").symlink_to("loop.jsonl")
    os.mkfifo(inbox.ws.inbox / "pipe.jsonl")
    (inbox.ws.inbox / "high").write_text("a file where a folder is expected")
    write_jsonl(inbox.ws.inbox / "good.jsonl", ["ok"])
    assert [r.job.file for r in _claim(inbox)] == ["good.jsonl"]
    assert inbox.scan() == []
    assert sorted(said) == sorted([
        "inbox: left high in place: not a .jsonl file; conveyor only takes JSONL (one JSON object a line)",
        "inbox: left loop.jsonl in place: a symlink that loops back on itself; copy the file in instead",
        "inbox: left pipe.jsonl in place: not a regular file (a pipe, socket or device); copy the data into a "
        ".jsonl file",
    ])


def test_taking_in_a_file_costs_the_same_whatever_the_queue_holds(workspace):
    """A burst of 120 files: the statements each claim runs are the same for the first files and the last (index
    seeks, no scan of the jobs table), the hashes file is written once a scan, and a scan claims CLAIMS_PER_SCAN
    files at most, so the daemon acts on controls between scans. (The rate itself: benchmarks/inbox.py --burst.)"""
    import re

    from conveyor.fingerprint import FileHashes
    from conveyor.queue.inbox import CLAIMS_PER_SCAN

    inbox, _ = _inbox(workspace())
    for i in range(120):
        (inbox.ws.inbox / f"f{i:04d}.jsonl").write_text(json.dumps({"text": f"file {i}"}) + "\n")
    statements: list[str] = []
    inbox.ws.db.set_trace_callback(statements.append)
    saves = []
    original = FileHashes.save
    FileHashes.save = lambda self: (saves.append(1), original(self))[1]
    try:
        assert inbox.scan() == []  # first sight of each file
        batches, per_claim = [], []
        while len(batches) < 10 and (claimed := (statements.clear(), inbox.scan())[1]):
            batches.append(len(claimed))
            per_claim.append(len(statements) / len(claimed))
    finally:
        FileHashes.save = original
        inbox.ws.db.set_trace_callback(None)
    assert batches == [CLAIMS_PER_SCAN] * 3 + [120 - 3 * CLAIMS_PER_SCAN]
    assert len(saves) == len(batches)  # once a scan, not once a file
    assert per_claim[0] == per_claim[1] == per_claim[2], per_claim  # full batches: the same statements per file
    assert not [s for s in statements if re.search(r"FROM jobs( ORDER BY|$)", s)]  # never every job
    assert len(json.loads(run_cli(inbox.ws.root, "status", "--json").out)["queue"]) == 120
