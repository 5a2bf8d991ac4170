"""conveyor/queue/edits.py called directly (`conveyor queue move/remove`): priorities, refusals, a removed job's
kept file and reason, a claim that wins the race, and a remove cut off at each failpoint and then recovered."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import drain_with_requests, ledger, run_cli, text_file

from conveyor.errors import ConveyorError
from conveyor.queue import edits
from conveyor.store import jobs
from conveyor.store.jobs import JobState
from conveyor.store.workspace import Workspace

HIGH, NORMAL, LOW = jobs.PRIORITIES["high"], jobs.PRIORITIES["normal"], jobs.PRIORITIES["low"]
KEPT = ["00001-a.jsonl", "00001-a.jsonl.reason.txt"]
REMOVE = ("import sys; from conveyor.queue import edits; from conveyor.store.workspace import Workspace; "
          "print(edits.remove(Workspace.open(sys.argv[1]), int(sys.argv[2]), sys.argv[3]))")


def _waiting(ws: Workspace) -> list[tuple[int, str]]:
    return [(j.id, jobs.PRIORITY_NAMES[j.priority]) for j in jobs.waiting(ws.db)]


def _removed(ws: Workspace) -> list[str]:
    folder = ws.root / "removed"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def _intents(ws: Workspace) -> list[str]:
    folder = ws.root / ".pending"
    return sorted(p.name for p in folder.glob("*.json")) if folder.is_dir() else []


def _warnings(ws: Workspace) -> list[str]:
    return [r["message"] for r in ws.db.execute("SELECT message FROM events WHERE level = 'warning' ORDER BY id")]


def _remove_killed(ws: Workspace, job_id: int, reason: str, point: str) -> int:
    """edits.remove in another process, SIGKILLed at the failpoint (a power cut); its pid."""
    env = {**os.environ, "CONVEYOR_FAILPOINT": f"{point}:{job_id}"}
    p = subprocess.Popen([sys.executable, "-c", REMOVE, str(ws.root), str(job_id), reason], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = p.communicate(timeout=120)
    assert p.returncode == -9, f"{point} did not fire: {p.returncode}\n{out}\n{err}"
    return p.pid


@pytest.fixture
def three(workspace, tmp_path) -> Workspace:
    """Three queued jobs: a, b, c."""
    ws = workspace()
    files = [text_file(tmp_path / f"{t}.jsonl", 8, t) for t in "abc"]
    assert run_cli(ws, "add", *files).code == 0
    return Workspace.open(ws)


@pytest.fixture
def interrupted(workspace, tmp_path) -> Workspace:
    """Job 1 (a, 16 examples: 2 steps) stopped after its step 1: interrupted, step 1 in the ledger."""
    ws = workspace()
    assert run_cli(ws, "add", text_file(tmp_path / "a.jsonl", 16, "a")).code == 0
    assert drain_with_requests(ws, "stop@1").code == 75
    opened = Workspace.open(ws)
    job = jobs.get(opened.db, 1)
    assert (job.state, job.steps_done, job.planned_steps) == (JobState.INTERRUPTED, 1, 2)
    return opened


def _ledger_rows(ws: Workspace) -> list[tuple]:
    return [(x["job"], x["start_step"], x["end_step"], x["outcome"]) for x in ledger(ws.root)]


# ---- move


def test_move_changes_a_waiting_jobs_priority_and_so_the_order(three):
    """High goes first, low last; the message names the job, its file and the new priority."""
    assert _waiting(three) == [(1, "normal"), (2, "normal"), (3, "normal")]
    assert edits.move(three, 3, HIGH) == "job 3 (c.jsonl) now has priority high"
    assert edits.move(three, 1, LOW) == "job 1 (a.jsonl) now has priority low"
    assert _waiting(three) == [(3, "high"), (2, "normal"), (1, "low")]
    assert edits.move(three, 1, NORMAL) == "job 1 (a.jsonl) now has priority normal"
    assert _waiting(three) == [(3, "high"), (1, "normal"), (2, "normal")]  # within a priority: arrival


def test_move_of_an_interrupted_job_keeps_its_place_in_the_job(interrupted):
    """An interrupted job is waiting too: its priority changes, its position does not."""
    assert edits.move(interrupted, 1, HIGH) == "job 1 (a.jsonl) now has priority high"
    job = jobs.get(interrupted.db, 1)
    assert (job.state, job.priority, job.steps_done, job.position) == (JobState.INTERRUPTED, HIGH, 1, 8)


def test_move_and_remove_refuse_a_job_that_is_not_waiting(workspace, tmp_path):
    """Done, running and rejected jobs are refused with the exact message; an unknown id too; nothing changes."""
    ws = workspace()
    assert run_cli(ws, "train", text_file(tmp_path / "a.jsonl", 8, "a"), "-q").code == 0
    assert run_cli(ws, "add", text_file(tmp_path / "b.jsonl", 8, "b")).code == 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": "no format"}\n')
    assert run_cli(ws, "add", bad).code == 1
    opened = Workspace.open(ws)
    assert jobs.claim_next(opened.db, "the-daemon").id == 2
    refusals = {
        (edits.move, 1): "job 1 is done; only queued or interrupted jobs can be moved",
        (edits.move, 2): "job 2 is running; only queued or interrupted jobs can be moved",
        (edits.move, 3): "job 3 is rejected; only queued or interrupted jobs can be moved",
        (edits.move, 9): "no job 9; `conveyor status` lists the jobs",
        (edits.remove, 1): "job 1 is done; only queued or interrupted jobs can be removed",
        (edits.remove, 2): "job 2 is running; only queued or interrupted jobs can be removed (use `conveyor skip` "
                           "for the running one)",
        (edits.remove, 3): "job 3 is rejected; only queued or interrupted jobs can be removed",
        (edits.remove, 9): "no job 9; `conveyor status` lists the jobs",
    }
    before = [j.to_json() for j in jobs.all_jobs(opened.db)]
    for (action, job_id), said in refusals.items():
        with pytest.raises(ConveyorError) as e:
            action(opened, job_id, HIGH) if action is edits.move else action(opened, job_id, "not wanted")
        assert str(e.value) == said
    assert [j.to_json() for j in jobs.all_jobs(opened.db)] == before
    assert jobs.get(opened.db, 2).claim == "the-daemon"
    assert _removed(opened) == [] and _intents(opened) == []


def _claimed_after_reading(monkeypatch, job_id: int) -> None:
    """The daemon claims the job right after the edit read it as waiting (the race compare-and-set settles)."""
    real = jobs.get

    def read_then_claimed(con, wanted):
        found = real(con, wanted)
        monkeypatch.setattr(jobs, "get", real)
        assert jobs.claim_next(con, "the-daemon").id == job_id
        return found

    monkeypatch.setattr(jobs, "get", read_then_claimed)


def test_a_move_that_loses_the_race_to_a_claim_is_refused(three, monkeypatch):
    """Read as queued, claimed meanwhile: the priority is not written and the job trains under the daemon."""
    _claimed_after_reading(monkeypatch, 1)
    with pytest.raises(ConveyorError) as e:
        edits.move(three, 1, LOW)
    assert str(e.value) == "job 1 started training just now; it can no longer be moved"
    job = jobs.get(three.db, 1)
    assert (job.state, job.priority, job.claim) == (JobState.RUNNING, NORMAL, "the-daemon")


def test_a_remove_that_loses_the_race_to_a_claim_leaves_no_trace(three, monkeypatch):
    """Read as queued, claimed before the commit: never both trained and removed; the copies made are undone."""
    _claimed_after_reading(monkeypatch, 1)
    with pytest.raises(ConveyorError) as e:
        edits.remove(three, 1, "not wanted")
    assert str(e.value) == "job 1 started training just now; use `conveyor skip` to stop it"
    job = jobs.get(three.db, 1)
    assert (job.state, job.claim, job.error) == (JobState.RUNNING, "the-daemon", None)
    assert _removed(three) == [] and _intents(three) == []


# ---- remove


def test_remove_keeps_the_file_and_its_reason_and_skips_the_job(three, tmp_path):
    """The job is skipped with the reason; removed/ holds the file's bytes and a .reason.txt; the rest wait on."""
    said = edits.remove(three, 1, "wrong data")
    kept = three.root / "removed" / "00001-a.jsonl"
    assert said == f"removed job 1; its file is kept at {kept}"
    job = jobs.get(three.db, 1)
    assert (job.state, job.error) == (JobState.SKIPPED, "removed from the queue: wrong data")
    assert _removed(three) == KEPT
    assert kept.read_bytes() == (tmp_path / "a.jsonl").read_bytes()
    assert (three.root / "removed" / "00001-a.jsonl.reason.txt").read_text() == "wrong data\n"
    assert _waiting(three) == [(2, "normal"), (3, "normal")] and _intents(three) == []
    with pytest.raises(ConveyorError, match="^job 1 is skipped; only queued or interrupted jobs can be removed$"):
        edits.remove(three, 1, "again")
    assert _removed(three) == KEPT


def test_an_interrupted_job_removed_keeps_its_trained_steps_in_the_ledger(interrupted, tmp_path):
    """A removed interrupted job keeps its trained step in the ledger; the next job starts after it."""
    said = edits.remove(interrupted, 1, "enough of a")
    assert said == f"removed job 1 after 1 of 2 steps; its file is kept at {interrupted.root / 'removed/00001-a.jsonl'}"
    job = jobs.get(interrupted.db, 1)
    assert (job.state, job.error, job.steps_done) == (JobState.SKIPPED, "removed from the queue after 1 of 2 "
                                                                         "steps: enough of a", 1)
    assert _ledger_rows(interrupted) == [(1, 1, 1, "interrupted")]
    assert run_cli(interrupted.root, "train", text_file(tmp_path / "b.jsonl", 8, "b"), "-q").code == 0
    assert _ledger_rows(interrupted) == [(1, 1, 1, "interrupted"), (2, 2, 2, "done")]
    assert jobs.get(interrupted.db, 1).steps_done == 1


# ---- cut off at a failpoint, then recovered


def test_a_remove_cut_off_after_its_copies_leaves_temporary_files_the_retry_undoes(three):
    """Killed at remove-copied: only the intent and .tmp- files remain; the retry undoes them, logs it, removes."""
    pid = _remove_killed(three, 1, "first try", "remove-copied")
    assert jobs.get(three.db, 1).state == JobState.QUEUED
    assert _removed(three) == [f".tmp-00001-a.jsonl-{pid}", f".tmp-00001-a.jsonl.reason.txt-{pid}"]
    [intent] = _intents(three)
    assert intent.startswith(f"queue remove-{pid}-")
    recorded = json.loads((three.root / ".pending" / intent).read_text())
    assert (recorded["kind"], recorded["job"], recorded["kept"]) == ("queue remove", 1,
                                                                     str(three.root / "removed/00001-a.jsonl"))

    assert edits.remove(three, 1, "second try").startswith("removed job 1; its file is kept at ")
    assert _removed(three) == KEPT and _intents(three) == []
    assert (three.root / "removed/00001-a.jsonl.reason.txt").read_text() == "second try\n"
    assert _warnings(three) == ["`conveyor queue remove 1` was cut off before it took effect; the job is still "
                                "waiting"]


def test_a_remove_cut_off_after_its_commit_is_finished_by_the_next_remove(three):
    """Killed at remove-committed: the next remove (of another job) first moves the cut-off one's files into place."""
    pid = _remove_killed(three, 1, "not this one", "remove-committed")
    job = jobs.get(three.db, 1)
    assert (job.state, job.error) == (JobState.SKIPPED, "removed from the queue: not this one")
    assert _removed(three) == [f".tmp-00001-a.jsonl-{pid}", f".tmp-00001-a.jsonl.reason.txt-{pid}"]

    edits.remove(three, 2, "nor this one")
    assert _removed(three) == [*KEPT, "00002-b.jsonl", "00002-b.jsonl.reason.txt"] and _intents(three) == []
    assert (three.root / "removed/00001-a.jsonl.reason.txt").read_text() == "not this one\n"
    assert _warnings(three) == ["job 1 was removed from the queue by a command cut off; its file is kept at "
                                f"{three.root / 'removed/00001-a.jsonl'}"]
    assert _waiting(three) == [(3, "normal")]


def test_an_interrupted_job_whose_remove_was_cut_off_after_its_commit_keeps_its_steps(interrupted, tmp_path):
    """An interrupted job's remove killed after its commit is finished by the retry; its step stays in the ledger."""
    _remove_killed(interrupted, 1, "enough of a", "remove-committed")
    with pytest.raises(ConveyorError) as e:
        edits.remove(interrupted, 1, "enough of a")
    assert str(e.value) == "job 1 is skipped; only queued or interrupted jobs can be removed"
    assert _removed(interrupted) == KEPT and _intents(interrupted) == []
    assert jobs.get(interrupted.db, 1).error == "removed from the queue after 1 of 2 steps: enough of a"
    assert Path(interrupted.root / "removed/00001-a.jsonl").read_bytes() == (tmp_path / "a.jsonl").read_bytes()
    assert run_cli(interrupted.root, "train", text_file(tmp_path / "b.jsonl", 8, "b"), "-q").code == 0
    assert _ledger_rows(interrupted) == [(1, 1, 1, "interrupted"), (2, 2, 2, "done")]


def test_a_failpoint_for_another_job_does_not_fire(three):
    """The failpoints are keyed by job id: removing job 1 with job 2's failpoint set completes."""
    env = {**os.environ, "CONVEYOR_FAILPOINT": "remove-copied:2"}
    p = subprocess.run([sys.executable, "-c", REMOVE, str(three.root), "1", "fine"], env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout == f"removed job 1; its file is kept at {three.root / 'removed/00001-a.jsonl'}\n"
    assert _removed(three) == KEPT and jobs.get(three.db, 1).state == JobState.SKIPPED


def test_a_remove_held_mid_way_is_left_alone_by_another_remove_and_loses_to_a_claim(three, tmp_path):
    """A remove held mid-way is left alone by another remove, then loses to a claim and undoes itself."""
    release = tmp_path / "release"
    env = {**os.environ, "CONVEYOR_TEST_HOLD": f"remove-copied:1:{release}"}
    env.pop("CONVEYOR_FAILPOINT", None)
    p = subprocess.Popen([sys.executable, "-c", REMOVE, str(three.root), "1", "first"], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not Path(f"{release}.reached").exists():
            assert p.poll() is None and time.monotonic() < deadline, "the remove never reached remove-copied"
            time.sleep(0.02)
        edits.remove(three, 2, "second")
        held = [f".tmp-00001-a.jsonl-{p.pid}", f".tmp-00001-a.jsonl.reason.txt-{p.pid}"]
        assert _removed(three) == [*held, "00002-b.jsonl", "00002-b.jsonl.reason.txt"]
        assert [name.split("-")[1] for name in _intents(three)] == [str(p.pid)]
        assert jobs.claim_next(three.db, "the-daemon").id == 1
    finally:
        release.write_text("go\n")
        out, err = p.communicate(timeout=60)
    assert p.returncode == 1 and out == ""
    assert "ConveyorError: job 1 started training just now; use `conveyor skip` to stop it" in err
    assert _removed(three) == ["00002-b.jsonl", "00002-b.jsonl.reason.txt"] and _intents(three) == []
    job = jobs.get(three.db, 1)
    assert (job.state, job.claim, job.error) == (JobState.RUNNING, "the-daemon", None)
