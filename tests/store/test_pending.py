"""pending.py: a multi-step command's intent is flock-held while it runs and removed after; one left by a dead command
is finished when its transaction committed and undone when it did not (export, queue remove, rollback), in words."""

from __future__ import annotations

import fcntl
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conveyor.config import Config
from conveyor.store import jobs, pending, runs, versions
from conveyor.store.jobs import JobState
from conveyor.store.workspace import Workspace


@pytest.fixture
def ws(tmp_path):
    ws = Workspace.create(tmp_path / "ws", Config())
    yield ws
    if "db" in ws.__dict__:
        ws.db.close()


def intents(ws) -> list[Path]:
    folder = ws.root / pending.FOLDER
    return sorted(folder.glob("*.json")) if folder.is_dir() else []


def dead_intent(ws, kind: str, name: str = "1", **data) -> Path:
    """An intent as a command killed mid-way leaves it: written and flushed, held by no process."""
    folder = ws.root / pending.FOLDER
    folder.mkdir(exist_ok=True)
    path = folder / f"{kind}-{name}.json"
    path.write_text(json.dumps({"kind": kind, "pid": 999999, "at": 0.0, **data}), encoding="utf-8")
    return path


def held_by_us(path: Path) -> bool:
    """Whether another open of the file cannot take its flock (flock locks belong to an open file, not a process)."""
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def events(ws) -> list[tuple]:
    return [tuple(r) for r in ws.db.execute("SELECT level, kind, job_id, message FROM events ORDER BY id")]


def a_folder(path: Path, content: str = "weights") -> str:
    path.mkdir(parents=True)
    (path / "file.bin").write_text(content)
    return str(path)


def queued_job(ws) -> int:
    return jobs.insert(ws.db, file="a.jsonl", source="/in/a.jsonl", stored="/data/a.jsonl", fingerprint="a" * 64,
                       priority=1, state=JobState.QUEUED).id


def remove_paths(ws, job_id: int) -> dict:
    """The files `queue remove` writes: a copy and a reason at temporary names, then at their kept names."""
    folder = ws.root / "removed"
    folder.mkdir(exist_ok=True)
    kept = folder / f"{job_id:05d}-a.jsonl"
    (folder / f".tmp-{kept.name}-1").write_text('{"text": "a"}\n')
    (folder / f".tmp-{kept.name}.reason.txt-1").write_text("not this one\n")
    return {"job": job_id, "tmp": str(folder / f".tmp-{kept.name}-1"), "kept": str(kept),
            "tmp_reason": str(folder / f".tmp-{kept.name}.reason.txt-1"), "reason": str(kept) + ".reason.txt"}


def test_the_kinds_are_export_queue_remove_and_rollback():
    """Three commands record intents, each with a check of its commit, a finish and an undo."""
    assert set(pending.KINDS) == {pending.EXPORT, pending.REMOVE, pending.ROLLBACK} == \
        {"export", "queue remove", "rollback"}
    assert all(len(hooks) == 3 and all(map(callable, hooks)) for hooks in pending.KINDS.values())


def test_an_intent_is_written_and_held_while_its_command_runs_and_removed_after(ws, tmp_path):
    """Inside the command the intent names its pid and data and is flock-held (recover leaves it); after, it is gone."""
    tmp, out = tmp_path / ".out.tmp-1", tmp_path / "out"
    with pending.intent(ws, pending.EXPORT, tmp=str(tmp), out=str(out)) as data:
        assert data == {"tmp": str(tmp), "out": str(out)}
        [path] = intents(ws)
        assert re.fullmatch(rf"export-{os.getpid()}-\d+\.json", path.name)
        written = json.loads(path.read_text())
        assert {k: v for k, v in written.items() if k != "at"} == \
            {"kind": "export", "pid": os.getpid(), "tmp": str(tmp), "out": str(out)}
        assert held_by_us(path)
        a_folder(tmp)
        assert pending.recover(ws) == [] and intents(ws) == [path] and tmp.is_dir()  # a live command is left alone
        os.rename(tmp, out)
    assert intents(ws) == [] and out.is_dir()
    assert events(ws) == []


def test_a_command_that_raises_is_undone_before_its_intent_goes(ws, tmp_path):
    """An export that fails before its rename leaves no temporary folder, and the error still reaches the caller."""
    tmp = tmp_path / ".out.tmp-1"
    with pytest.raises(RuntimeError, match="cut"), pending.intent(ws, pending.EXPORT, tmp=str(tmp),
                                                                   out=str(tmp_path / "out")):
        a_folder(tmp)
        raise RuntimeError("cut")
    assert not tmp.exists() and not (tmp_path / "out").exists() and intents(ws) == []


def test_a_command_that_raises_after_its_commit_is_finished(ws):
    """A `queue remove` that raises after its transaction committed still puts the kept file in place."""
    job_id = queued_job(ws)
    paths = remove_paths(ws, job_id)
    with pytest.raises(KeyboardInterrupt), pending.intent(ws, pending.REMOVE, **paths):
        jobs.transition(ws.db, job_id, JobState.SKIPPED, expect=JobState.QUEUED, error=f"{pending.REMOVED}: not this one")
        raise KeyboardInterrupt
    assert Path(paths["kept"]).read_text() == '{"text": "a"}\n'
    assert Path(paths["reason"]).read_text() == "not this one\n"
    assert not Path(paths["tmp"]).exists() and not Path(paths["tmp_reason"]).exists() and intents(ws) == []


def test_a_cut_off_export_has_its_temporary_folder_removed(ws, tmp_path):
    """An export's rename is its commit: a dead export's temporary folder goes, with a message that is logged."""
    tmp, out = tmp_path / ".out.tmp-7", tmp_path / "out"
    dead_intent(ws, pending.EXPORT, tmp=a_folder(tmp), out=str(out))
    text = f"removed {tmp}, left by an export to {out} that was cut off; export again"
    assert pending.recover(ws) == [text]
    assert not tmp.exists() and not out.exists() and intents(ws) == []
    assert events(ws) == [("warning", "message", None, text)]
    log = [json.loads(line) for line in (ws.logs / "conveyor.log").read_text().splitlines()]
    assert [(e["level"], e["kind"], e["message"]) for e in log] == [("warning", "message", text)]


def test_a_cut_off_export_that_left_nothing_is_removed_without_a_word(ws, tmp_path):
    """An export cut off before it wrote anything (or after its rename) needs nothing done and says nothing."""
    out = a_folder(tmp_path / "out")
    dead_intent(ws, pending.EXPORT, tmp=str(tmp_path / ".out.tmp-7"), out=out)
    assert pending.recover(ws) == [] and intents(ws) == [] and events(ws) == []
    assert (tmp_path / "out" / "file.bin").read_text() == "weights"


def test_a_queue_remove_cut_off_after_its_commit_is_finished(ws):
    """The job is skipped as removed: its copy and reason are moved to their kept names."""
    job_id = queued_job(ws)
    paths = remove_paths(ws, job_id)
    jobs.transition(ws.db, job_id, JobState.SKIPPED, expect=JobState.QUEUED, error=f"{pending.REMOVED}: not this one")
    dead_intent(ws, pending.REMOVE, **paths)
    text = f"job {job_id} was removed from the queue by a command cut off; its file is kept at {paths['kept']}"
    assert pending.recover(ws) == [text]
    assert sorted(p.name for p in (ws.root / "removed").iterdir()) == ["00001-a.jsonl", "00001-a.jsonl.reason.txt"]
    assert Path(paths["reason"]).read_text() == "not this one\n"
    assert events(ws) == [("warning", "message", None, text)] and intents(ws) == []


@pytest.mark.parametrize("state, error", [(JobState.QUEUED, None), (JobState.SKIPPED, "skipped by request")])
def test_a_queue_remove_cut_off_before_its_commit_is_undone(ws, state, error):
    """A job still waiting (or skipped by something else) was not removed: the temporary copies go, nothing is kept."""
    job_id = queued_job(ws)
    if state != JobState.QUEUED:
        jobs.transition(ws.db, job_id, state, expect=JobState.QUEUED, error=error)
    paths = remove_paths(ws, job_id)
    dead_intent(ws, pending.REMOVE, **paths)
    text = f"`conveyor queue remove {job_id}` was cut off before it took effect; the job is still waiting"
    assert pending.recover(ws) == [text]
    assert list((ws.root / "removed").iterdir()) == []
    assert jobs.get(ws.db, job_id).state == state
    assert events(ws) == [("warning", "message", None, text)]


def rollback_paths(ws) -> dict:
    """What `rollback` records: the run it makes, the version it branches from, its copy's temporary folder."""
    tmp = ws.runs / ".tmp-run-0002-1"
    a_folder(tmp / "checkpoints" / "step-000002")
    return {"run": "run-0002", "parent": "run-0001", "version_id": 1, "tmp": str(tmp),
            "final": str(ws.runs / "run-0002")}


def test_a_rollback_cut_off_after_its_commit_is_finished(ws):
    """The new run is recorded as branching from the version: its copied checkpoint is moved to its run folder."""
    runs.create(ws.db, {"a": 1})
    versions.add(ws.db, "run-0001", 1, 2)
    runs.create(ws.db, {"a": 1}, run_id="run-0002", step=2, parent_run="run-0001", parent_version=1)
    dead_intent(ws, pending.ROLLBACK, **rollback_paths(ws))
    text = "a rollback cut off after it was recorded is finished: run-0002's first checkpoint is in place"
    assert pending.recover(ws) == [text]
    assert sorted(p.name for p in ws.runs.iterdir()) == ["run-0002"]
    assert (ws.runs / "run-0002/checkpoints/step-000002/file.bin").read_text() == "weights"
    assert events(ws) == [("warning", "message", None, text)]


@pytest.mark.parametrize("recorded", [False, True])
def test_a_rollback_cut_off_before_its_commit_is_undone(ws, recorded):
    """No run row branching from the version (none, or another lineage): the copy is removed, no run folder made."""
    runs.create(ws.db, {"a": 1})
    if recorded:  # a run-0002 that branches from another version is not this rollback's
        runs.create(ws.db, {"a": 1}, run_id="run-0002", step=2, parent_run="run-0001", parent_version=7)
    dead_intent(ws, pending.ROLLBACK, **rollback_paths(ws))
    text = ("a rollback cut off before it was recorded left nothing behind (its copy for run-0002 was removed); "
            "run it again")
    assert pending.recover(ws) == [text]
    assert list(ws.runs.iterdir()) == []
    assert events(ws) == [("warning", "message", None, text)]


HOLD = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
sys.stdin.read()
"""


def test_an_intent_held_by_a_live_process_is_left_alone_until_it_dies(ws, tmp_path):
    """Another process holding the flock is a command still running; once it is gone the intent is settled."""
    tmp = tmp_path / ".out.tmp-7"
    path = dead_intent(ws, pending.EXPORT, tmp=a_folder(tmp), out=str(tmp_path / "out"))
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        assert pending.recover(ws) == []
        assert intents(ws) == [path] and tmp.is_dir() and events(ws) == []
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert pending.recover(ws) == [f"removed {tmp}, left by an export to {tmp_path / 'out'} that was cut off; "
                                   "export again"]
    assert intents(ws) == [] and not tmp.exists()


@pytest.mark.parametrize("content", [b"", b'{"kind": "export", "pid": 12, "tm', b"\xff\xfe", b"[1, 2]",
                                     b'{"kind": "defrag", "tmp": "x"}'])
def test_an_unreadable_or_unknown_intent_is_removed_without_action(ws, tmp_path, content):
    """An intent cut off while being written (its command had not begun), or of no known kind, goes; nothing else."""
    tmp = a_folder(tmp_path / ".out.tmp-7")
    folder = ws.root / pending.FOLDER
    folder.mkdir()
    (folder / "export-12-34.json").write_bytes(content)
    (folder / "notes.txt").write_text("not an intent")
    assert pending.recover(ws) == []
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    assert Path(tmp, "file.bin").read_text() == "weights" and events(ws) == []


def test_several_dead_intents_are_settled_in_the_order_of_their_names(ws, tmp_path):
    """Each dead intent is settled once and said once, in file-name order; a second recover finds nothing."""
    first, second = tmp_path / ".a.tmp-1", tmp_path / ".b.tmp-1"
    dead_intent(ws, pending.EXPORT, "2", tmp=a_folder(second), out=str(tmp_path / "b"))
    dead_intent(ws, pending.EXPORT, "1", tmp=a_folder(first), out=str(tmp_path / "a"))
    said = [f"removed {first}, left by an export to {tmp_path / 'a'} that was cut off; export again",
            f"removed {second}, left by an export to {tmp_path / 'b'} that was cut off; export again"]
    assert pending.recover(ws) == said
    assert [e[3] for e in events(ws)] == said
    assert pending.recover(ws) == [] and len(events(ws)) == 2


def test_recover_without_a_pending_folder_does_nothing(ws):
    """A workspace where no multi-step command ever ran has no .pending/ and needs no database to say so."""
    assert pending.recover(ws) == [] and not (ws.root / pending.FOLDER).exists() and "db" not in ws.__dict__


def test_finish_puts_a_committed_commands_files_in_place(ws):
    """finish is what a command calls after its commit: the same words recover would say."""
    paths = remove_paths(ws, 3)
    assert pending.finish(ws, pending.REMOVE, paths) == \
        f"job 3 was removed from the queue by a command cut off; its file is kept at {paths['kept']}"
    assert Path(paths["kept"]).exists() and Path(paths["reason"]).exists() and not Path(paths["tmp"]).exists()


def test_remove_tree_removes_a_folder_or_a_file_and_says_whether_it_was_there(tmp_path):
    """True for a folder (with its contents) or a file that was there; False for nothing, None or ''."""
    folder = Path(a_folder(tmp_path / "d" / "e"))
    (tmp_path / "f").write_text("x")
    assert pending.remove_tree(tmp_path / "d") and not (tmp_path / "d").exists() and not folder.exists()
    assert pending.remove_tree(str(tmp_path / "f")) and not (tmp_path / "f").exists()
    assert not pending.remove_tree(tmp_path / "f")
    assert not pending.remove_tree(None) and not pending.remove_tree("")


def test_move_into_place_renames_only_onto_a_free_name(tmp_path):
    """The temporary name moves to the final one; a final name already there, or no temporary, is left as it is."""
    tmp, final = tmp_path / ".tmp-x", tmp_path / "x"
    tmp.write_text("new")
    assert pending.move_into_place(tmp, final) and final.read_text() == "new" and not tmp.exists()
    tmp.write_text("newer")
    assert not pending.move_into_place(str(tmp), str(final))
    assert final.read_text() == "new" and tmp.read_text() == "newer"
    assert not pending.move_into_place(tmp_path / "missing", tmp_path / "y") and not (tmp_path / "y").exists()
    assert not pending.move_into_place(None, tmp_path / "y") and not pending.move_into_place("", tmp_path / "y")
    assert pending.move_into_place(Path(a_folder(tmp_path / ".tmp-d")), tmp_path / "d")
    assert (tmp_path / "d" / "file.bin").read_text() == "weights"


def test_an_intent_whose_command_ends_between_recovers_open_and_lock_is_passed_over(ws, tmp_path, monkeypatch):
    """A command that returns while recover is looking at its intent is not an error for the command recovering."""
    tmp, out = tmp_path / ".out.tmp-1", tmp_path / "out"
    command = pending.intent(ws, pending.EXPORT, tmp=str(tmp), out=str(out))
    command.__enter__()
    real_flock, ended = fcntl.flock, []

    def flock(fd, operation):
        if operation & fcntl.LOCK_NB and not ended:  # recover has opened the intent and now tries its lock
            command.__exit__(None, None, None)  # the export returns: its intent is unlinked and its lock freed
            ended.append(True)
        return real_flock(fd, operation)

    monkeypatch.setattr(pending.fcntl, "flock", flock)
    assert pending.recover(ws) == []
    assert ended and intents(ws) == []
