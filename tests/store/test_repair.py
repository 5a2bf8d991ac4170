"""repair.py, called directly: what it finds wrong with conveyor.db, what the checkpoints on disk hold, and the exact
runs, versions and jobs it rebuilds from their manifests, with the old database moved aside and never deleted."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sqlite3
from pathlib import Path

import pytest
from conftest import drain_with_requests, make_workspace, run_cli, set_setting, text_file

from conveyor.errors import ConveyorError
from conveyor.faults import database_message, database_mismatch_message, database_missing_message
from conveyor.fingerprint import short
from conveyor.store import consistency, jobs, lock, repair
from conveyor.store import manifest as mf
from conveyor.store.jobs import JobState
from conveyor.store.workspace import Workspace

SETTINGS = {"training": {"batch_size": 4, "grad_accum": 2, "learning_rate": 1e-3, "save_every": 2, "max_length": 64}}
LEDGER_LOST = ("the ledger (which job trained which global steps), per-step metrics, evaluation losses, the example "
               "audit, events, pause and control requests, and versions' gated marks: no checkpoint holds them; they "
               "stay in the moved-aside file (conveyor.db.damaged-…, readable with sqlite3 where it is not damaged)")
REPORTED = ("problem", "moved", "rebuilt", "not_rebuilt")  # Report.to_json's keys (`doctor --repair --json`)
DAMAGED = re.compile(r"conveyor\.db\.damaged-\d{8}-\d{6}x*")


def fingerprint_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def quiesce(root: Path) -> None:
    """Everything in the main file, as in a workspace no process has open."""
    con = sqlite3.connect(root / "conveyor.db")
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_dir) -> Path:
    """run-0001 (adapter r 8): job 1 a.jsonl steps 1–2 (v1, pinned), job 2 b.jsonl stopped at step 3 and removed
    from the queue; run-0002 (r 4): job 3 c.jsonl steps 1–2 (v2), job 4 d.jsonl stopped at step 4 of 3–5.
    Checkpoints: run-0001 steps 2 and 3, run-0002 steps 2 and 4."""
    root = tmp_path_factory.mktemp("two-runs")
    ws = make_workspace(root / "ws", tiny_dir, **SETTINGS)
    for tag, n in (("a", 16), ("b", 24), ("c", 16), ("d", 24)):
        text_file(root / f"{tag}.jsonl", n, tag)
    assert run_cli(ws, "train", root / "a.jsonl", "-q").code == 0
    assert run_cli(ws, "add", root / "b.jsonl").code == 0
    assert drain_with_requests(ws, "stop@3").code == 75
    assert run_cli(ws, "queue", "remove", "2", "--reason", "not now").code == 0
    set_setting(ws, "adapter", "r", "4")
    assert run_cli(ws, "train", root / "c.jsonl", "-q").code == 0
    assert run_cli(ws, "add", root / "d.jsonl").code == 0
    assert drain_with_requests(ws, "stop@4").code == 75
    assert run_cli(ws, "pin", "v1").code == 0
    quiesce(ws)
    return ws


@pytest.fixture(scope="module")
def branched(tmp_path_factory, tiny_dir) -> Path:
    """run-0001: job 1 a.jsonl steps 1–2 (v1), job 2 b.jsonl steps 3–4 (v2); run-0002 rolled back to v1 (step 2)."""
    root = tmp_path_factory.mktemp("branched")
    ws = make_workspace(root / "ws", tiny_dir, **SETTINGS)
    files = [text_file(root / f"{tag}.jsonl", 16, tag) for tag in "ab"]
    assert run_cli(ws, "train", *files, "-q").code == 0
    assert run_cli(ws, "rollback", "v1").code == 0
    quiesce(ws)
    return ws


def copy_of(source: Path, tmp_path: Path) -> Workspace:
    """A copy of a trained workspace (its emptied -wal and -shm left behind) and a Workspace object for it."""
    shutil.copytree(source, tmp_path / "ws", ignore=shutil.ignore_patterns("conveyor.db-wal", "conveyor.db-shm"))
    return Workspace.open(tmp_path / "ws")


def delete_database(ws: Workspace) -> None:
    for suffix in ("", "-wal", "-shm"):
        (ws.root / f"conveyor.db{suffix}").unlink(missing_ok=True)


def edit_database(ws: Workspace, *statements: str) -> None:
    con = sqlite3.connect(ws.root / "conveyor.db")
    for sql in statements:
        con.execute(sql)
    con.commit()
    con.close()


def rows(ws: Workspace, sql: str) -> list[tuple]:
    con = sqlite3.connect(ws.root / "conveyor.db")
    try:
        return [tuple(r) for r in con.execute(sql)]
    finally:
        con.close()


def job_rows(ws: Workspace) -> list[tuple]:
    return rows(ws, "SELECT id, run_id, file, state, examples, epochs, planned_steps, start_step, end_step, steps_done,"
                " position, segment_start, holdout FROM jobs ORDER BY id")


def fingerprints(source: Path) -> dict[str, str]:
    """a.jsonl … d.jsonl of a fixture's folder, by tag: their sha256 names their stored copies in data/."""
    return {p.stem: fingerprint_of(p) for p in sorted(source.parent.glob("*.jsonl"))}


def tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): fingerprint_of(p) if p.is_file() else "dir" for p in sorted(folder.rglob("*"))}


REBUILT_TWO_RUNS = [
    "run-0001: identity and global step 3 from step-000003 (2 verified checkpoint(s))",
    "run-0002: identity and global step 4 from step-000004 (2 verified checkpoint(s))",
    "active run: run-0002, the newest run folder with a verified checkpoint (a rollback or a new identity always "
    "starts the next run number)",
    "versions, one per job-end checkpoint that exists: v1 (run-0001 step 2), v2 (run-0002 step 2); numbered anew, so "
    "a version may have another number than before",
    "job(s) 1, 3: done (their end checkpoints exist)",
    "job(s) 2: skipped: under way in a checkpoint, then no longer, with no end checkpoint (whether they trained "
    "further is not known)",
    "job(s) 4: interrupted where the active run's newest checkpoint has them (each resumes from its own position)"]


# What is wrong -------------------------------------------------------------------------------------------------------
def test_a_whole_matching_database_needs_no_repair_and_is_left_alone(two_runs, tmp_path):
    """diagnose finds nothing; repair returns an empty Report and moves, writes and rebuilds nothing."""
    ws = copy_of(two_runs, tmp_path)
    before = (ws.root / "conveyor.db").read_bytes()
    assert consistency.diagnose(ws) is None
    report = repair.repair(ws)
    assert report == repair.Report()
    assert {key: report.to_json()[key] for key in REPORTED} == {"problem": None, "moved": [], "rebuilt": [],
                                                                "not_rebuilt": []}
    assert (ws.root / "conveyor.db").read_bytes() == before
    assert not [p.name for p in ws.root.iterdir() if "damaged" in p.name or "repair" in p.name]


def test_a_workspace_without_database_or_checkpoints_needs_no_repair(tmp_path, tiny_dir):
    """A missing database is no fault while runs/ holds no checkpoint: the next command makes it; repair makes none."""
    ws = Workspace.open(make_workspace(tmp_path / "ws", tiny_dir))
    (ws.runs / "run-0001" / "checkpoints").mkdir(parents=True)
    assert consistency.diagnose(ws) is None
    assert repair.repair(ws) == repair.Report()
    assert not (ws.root / "conveyor.db").exists()


def test_diagnose_names_a_missing_a_damaged_and_a_mismatched_database(two_runs, tmp_path):
    """Each fault in the words every command uses: the runs a missing one would lose, the damage, the mismatch."""
    ws = copy_of(two_runs, tmp_path)
    path = ws.root / "conveyor.db"
    good = path.read_bytes()
    fp = fingerprints(two_runs)
    edit_database(ws, "DELETE FROM jobs WHERE id = 4")
    assert consistency.diagnose(ws) == database_mismatch_message(path, [
        f"runs/run-0002/checkpoints/step-000004 trained job 4 (data {short(fp['d'])}), which conveyor.db does not "
        "know"])
    path.write_bytes(b"\0" * 4096 + good[4096:])
    assert consistency.diagnose(ws) == database_message(path, f"its {len(good)} bytes do not start with an SQLite header: "
                                                         "not a database, or cut short")
    delete_database(ws)
    assert consistency.diagnose(ws) == database_missing_message(path, [
        "runs/run-0001 holds 2 checkpoint(s) (newest step 3) that conveyor.db does not know",
        "runs/run-0002 holds 2 checkpoint(s) (newest step 4) that conveyor.db does not know"])
    assert not path.exists()  # diagnose makes no database


# What the disk holds -------------------------------------------------------------------------------------------------
def test_scan_verifies_each_run_folders_checkpoints_and_records_nothing(two_runs, tmp_path):
    """Run folders in number order (others ignored), verified checkpoints oldest first, each unusable one with why."""
    ws = copy_of(two_runs, tmp_path)
    for name in ("notes", "run-0002-old", "run-0010"):
        (ws.runs / name).mkdir()
    copied = ws.runs / "run-0002" / "checkpoints" / "step-000005"
    shutil.copytree(copied.with_name("step-000004"), copied)  # a folder whose name is not its manifest's step
    hashes = {run: (ws.runs / run / "checkpoints" / ".hashes.json").read_bytes() for run in ("run-0001", "run-0002")}
    disk = consistency.scan(ws)
    assert [(r.id, [c.step for c in r.checkpoints], r.unusable) for r in disk] == [
        ("run-0001", [2, 3], []),
        ("run-0002", [2, 4], ["step-000005: the folder says step 5, the manifest 4"]),
        ("run-0010", [], [])]
    assert [(c.path.name, c.manifest.job.job_id, c.manifest.job_end) for c in disk[1].checkpoints] == \
        [("step-000002", 3, True), ("step-000004", 4, False)]
    weights = ws.runs / "run-0002" / "checkpoints" / "step-000004" / "adapter_model.safetensors"
    st = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))  # changed in place, its size and mtime kept
    quick = consistency.scan(ws)[1]  # its change time is not the recorded one: hashed again, refused
    deep = consistency.scan(ws, deep=True)[1]
    assert [c.step for c in quick.checkpoints] == [c.step for c in deep.checkpoints] == [2]
    assert quick.unusable == deep.unusable
    assert deep.unusable == ["step-000004: adapter_model.safetensors does not match its sha256 in the manifest "
                             "(changed or truncated)", "step-000005: the folder says step 5, the manifest 4"]
    assert {run: (ws.runs / run / "checkpoints" / ".hashes.json").read_bytes() for run in hashes} == hashes


def test_describe_says_what_each_run_would_be_rebuilt_from(two_runs, tmp_path):
    """One `ok` line a run folder with its newest verified checkpoint (in or at the end of a job), a warning for each
    unusable checkpoint."""
    ws = copy_of(two_runs, tmp_path)
    assert consistency.describe(consistency.scan(ws)) == [
        ("ok", "runs/run-0001: 2 checkpoint(s) verified, newest step 3 (in job 2)"),
        ("ok", "runs/run-0002: 2 checkpoint(s) verified, newest step 4 (in job 4)")]
    with open(ws.runs / "run-0002" / "checkpoints" / "step-000004" / "optimizer.pt", "ab") as f:
        f.write(b"more")
    (ws.runs / "run-0003" / "checkpoints" / "step-000001").mkdir(parents=True)
    assert consistency.describe(consistency.scan(ws)) == [
        ("ok", "runs/run-0001: 2 checkpoint(s) verified, newest step 3 (in job 2)"),
        ("ok", "runs/run-0002: 1 checkpoint(s) verified, newest step 2 (end of job 3)"),
        ("warning", "runs/run-0002/step-000004: optimizer.pt does not match its sha256 in the manifest (changed or "
                    "truncated)"),
        ("warning", "runs/run-0003/step-000001: no manifest.json (not written by conveyor, or the write was cut off)")]
    assert consistency.describe([]) == []


# Rebuilding ----------------------------------------------------------------------------------------------------------
def test_a_deleted_database_is_rebuilt_from_the_checkpoint_manifests(two_runs, tmp_path):
    """Runs with their identity and step, versions per job end with the pins of .pins.json, jobs with their states."""
    ws = copy_of(two_runs, tmp_path)
    delete_database(ws)
    problem = consistency.diagnose(ws)
    runs_before = tree(ws.runs)
    report = repair.repair(ws)
    assert report.problem == problem and report.moved == []
    assert report.rebuilt == REBUILT_TWO_RUNS
    assert report.lost == [LEDGER_LOST]
    assert {key: report.to_json()[key] for key in REPORTED} == {"problem": problem, "moved": [],
                                                                "rebuilt": REBUILT_TWO_RUNS, "not_rebuilt": [LEDGER_LOST]}
    assert tree(ws.runs) == runs_before  # runs/ is only read

    identity = {run: mf.read(ws.runs / run / "checkpoints" / step).identity
                for run, step in (("run-0001", "step-000003"), ("run-0002", "step-000004"))}
    assert identity["run-0001"]["adapter.r"] == 8 and identity["run-0002"]["adapter.r"] == 4
    note = "rebuilt by `conveyor doctor --repair` from 2 checkpoint(s)"
    assert [(r[0], json.loads(r[1]), *r[2:]) for r in rows(
        ws, "SELECT id, identity, global_step, active, note, parent_run, parent_version FROM runs ORDER BY id")] == [
        ("run-0001", identity["run-0001"], 3, 0, note, None, None),
        ("run-0002", identity["run-0002"], 4, 1, note, None, None)]
    assert rows(ws, "SELECT id, run_id, job_id, step, pinned, lost, gated FROM versions ORDER BY id") == [
        (1, "run-0001", 1, 2, 1, 0, None), (2, "run-0002", 3, 2, 0, 0, None)]  # v1 pinned, as .pins.json says
    fp = fingerprints(two_runs)
    assert job_rows(ws) == [
        (1, "run-0001", f"{fp['a']}.jsonl", "done", 16, 1, 2, 1, 2, 2, 16, 1, "[]"),
        (2, "run-0001", f"{fp['b']}.jsonl", "skipped", 24, 1, 3, 3, None, 1, 8, 3, "[]"),
        (3, "run-0002", f"{fp['c']}.jsonl", "done", 16, 1, 2, 1, 2, 2, 16, 1, "[]"),
        (4, "run-0002", f"{fp['d']}.jsonl", "interrupted", 24, 1, 3, 3, 5, 2, 16, 3, "[]")]
    assert rows(ws, "SELECT id, source, stored FROM jobs WHERE id = 1") == [
        (1, str(ws.data / f"{fp['a']}.jsonl"), str(ws.data / f"{fp['a']}.jsonl"))]
    assert rows(ws, "SELECT error FROM jobs WHERE id = 2") == [(
        "rebuilt by `conveyor doctor --repair`: under way in run-0001 at step 3, then no longer, and no end checkpoint "
        f"of it exists, so whether it trained further is not known; `conveyor add data/{fp['b']}.jsonl` trains it "
        "again from its first example",)]
    assert rows(ws, "SELECT COUNT(*) FROM jobs WHERE error IS NOT NULL") == [(1,)]
    assert rows(ws, "SELECT level, kind, job_id, message FROM events") == [(
        "warning", "repair", None, "conveyor.db rebuilt by `conveyor doctor --repair` from the checkpoint manifests "
        "of 2 run(s); the old one is kept beside it as conveyor.db.damaged-…")]
    for table in ("ledger", "audit", "metrics", "controls"):
        assert rows(ws, f"SELECT COUNT(*) FROM {table}") == [(0,)], table
    assert consistency.diagnose(ws) is None and repair.repair(ws) == repair.Report()  # whole now: a second repair is idle


def test_a_damaged_database_is_moved_aside_never_deleted(two_runs, tmp_path):
    """The damaged file keeps its bytes under conveyor.db.damaged-<time>; a new one takes its name."""
    ws = copy_of(two_runs, tmp_path)
    path = ws.root / "conveyor.db"
    os.truncate(path, path.stat().st_size // 2)
    damaged = path.read_bytes()
    before = sorted(p.name for p in ws.root.iterdir())
    report = repair.repair(ws)
    assert report.problem.startswith(f"the state database {path} is damaged (cut short: its header says ")
    [moved] = report.moved
    assert DAMAGED.fullmatch(moved) and (ws.root / moved).read_bytes() == damaged
    assert sorted(p.name for p in ws.root.iterdir()) == sorted([*before, moved])  # no temporary file is left
    assert report.rebuilt == REBUILT_TWO_RUNS
    [partly, ledger_lost] = report.lost  # how many job rows a cut-short file still yields depends on its pages
    assert partly.startswith("the old conveyor.db could be read only in part (") and ledger_lost == LEDGER_LOST
    assert [(r[0], r[3]) for r in job_rows(ws)] == [(1, "done"), (2, "skipped"), (3, "done"), (4, "interrupted")]
    assert consistency.diagnose(ws) is None


def test_jobs_only_the_old_database_knew_are_kept_when_finished_and_listed_when_waiting(two_runs, tmp_path):
    """A readable old database lends file names; its finished, failed or rejected jobs no checkpoint names are kept
    as they were; its waiting ones are not queued again but listed with their stored copies."""
    ws = copy_of(two_runs, tmp_path)
    con = sqlite3.connect(ws.root / "conveyor.db")
    con.row_factory = sqlite3.Row
    con.execute("DELETE FROM jobs WHERE id = 4")  # lost its last writes: checkpoint step 4 names a job it lacks
    for tag, state, error in (("e", JobState.REJECTED, "line 3: no text"), ("f", JobState.FAILED, "copy changed"),
                              ("g", JobState.QUEUED, None), ("h", JobState.QUEUED, None)):
        jobs.insert(con, file=f"{tag}.jsonl", source=f"/in/{tag}.jsonl", stored=str(ws.data / f"{tag * 64}.jsonl"),
                    fingerprint=tag * 64, priority=1, state=state, error=error)
    con.commit()
    old = {r["id"]: dict(r) for r in con.execute("SELECT * FROM jobs")}
    con.close()
    (ws.data / f"{'g' * 64}.jsonl").write_text('{"text": "g"}\n')  # job 7's stored copy; job 8's is gone
    report = repair.repair(ws)
    assert report.problem.startswith(f"the state database {ws.root / 'conveyor.db'} does not match the runs on disk")
    [moved] = report.moved
    assert DAMAGED.fullmatch(moved)
    assert report.rebuilt == REBUILT_TWO_RUNS + [
        "job(s) 5, 6: as the old conveyor.db had them (finished, skipped, failed or rejected; no checkpoint names "
        "them)"]
    assert report.lost == [
        f"data/{'g' * 64}.jsonl (job 7, g.jsonl, queued): in no checkpoint, so not queued again; `conveyor add "
        f"data/{'g' * 64}.jsonl` queues it, if it never trained (conveyor cannot tell)",
        f"job 8, h.jsonl, queued: in no checkpoint, and its stored copy data/{'h' * 64}.jsonl is gone; add the "
        "original file again if it never trained",
        LEDGER_LOST]
    fp = fingerprints(two_runs)
    assert [(r[0], r[2], r[3]) for r in job_rows(ws)] == [
        (1, "a.jsonl", "done"), (2, "b.jsonl", "skipped"), (3, "c.jsonl", "done"), (4, f"{fp['d']}.jsonl",
                                                                                    "interrupted"),
        (5, "e.jsonl", "rejected"), (6, "f.jsonl", "failed")]
    con = sqlite3.connect(ws.root / "conveyor.db")
    con.row_factory = sqlite3.Row
    assert {r["id"]: dict(r) for r in con.execute("SELECT * FROM jobs WHERE id IN (5, 6)")} == \
        {5: old[5], 6: old[6]}
    assert tuple(con.execute("SELECT source, created_at FROM jobs WHERE id = 1").fetchone()) == \
        (old[1]["source"], old[1]["created_at"])
    con.close()
    aside = sqlite3.connect(ws.root / moved)  # the old database, whole, beside the new one
    assert [r[0] for r in aside.execute("SELECT id FROM jobs ORDER BY id")] == [1, 2, 3, 5, 6, 7, 8]
    aside.close()


def test_a_database_of_other_models_lends_nothing_to_the_rebuild(two_runs, tmp_path):
    """When the old database's runs carry other identities than the checkpoints, none of its rows is used."""
    ws = copy_of(two_runs, tmp_path)
    [(identity,)] = rows(ws, "SELECT identity FROM runs WHERE id = 'run-0001'")
    other = json.dumps({**json.loads(identity), "adapter.r": 16})
    edit_database(ws, f"UPDATE runs SET identity = '{other}' WHERE id = 'run-0001'")
    report = repair.repair(ws)
    assert report.lost == [
        "nothing was taken from the old conveyor.db: its runs were trained as other models than the checkpoints in "
        "runs/ (a database of another workspace?)", LEDGER_LOST]
    fp = fingerprints(two_runs)
    assert [r[2] for r in job_rows(ws)] == [f"{fp[t]}.jsonl" for t in "abcd"]
    assert json.loads(rows(ws, "SELECT identity FROM runs WHERE id = 'run-0001'")[0][0]) == json.loads(identity)


def test_unusable_checkpoints_and_empty_run_folders_are_left_as_they_are_and_said(two_runs, tmp_path):
    """A checkpoint that fails its hashes is not used (nor changed); a run folder with none verified makes no run."""
    ws = copy_of(two_runs, tmp_path)
    delete_database(ws)
    optimizer = ws.runs / "run-0002" / "checkpoints" / "step-000004" / "optimizer.pt"
    with open(optimizer, "ab") as f:
        f.write(b"more")
    bad = optimizer.read_bytes()
    (ws.runs / "run-0003" / "checkpoints" / "step-000001").mkdir(parents=True)
    report = repair.repair(ws)
    fp = fingerprints(two_runs)
    assert report.lost == [
        "runs/run-0002: 1 checkpoint(s) fail verification and are not used (step-000004: optimizer.pt does not match "
        "its sha256 in the manifest (changed or truncated)); they are left as they are",
        "runs/run-0003: 1 checkpoint(s) fail verification and are not used (step-000001: no manifest.json (not "
        "written by conveyor, or the write was cut off)); they are left as they are",
        "runs/run-0003: no verified checkpoint, so no run is made of it (a new run never takes its name: runs.next_id "
        "skips folders that hold anything)",
        f"data/{fp['d']}.jsonl (its job is not known): in no checkpoint, so not queued again; `conveyor add "
        f"data/{fp['d']}.jsonl` queues it, if it never trained (conveyor cannot tell)",
        LEDGER_LOST]
    assert optimizer.read_bytes() == bad
    assert rows(ws, "SELECT id, global_step, active FROM runs ORDER BY id") == [("run-0001", 3, 0),
                                                                                ("run-0002", 2, 1)]
    assert [(r[0], r[3]) for r in job_rows(ws)] == [(1, "done"), (2, "skipped"), (3, "done")]


def test_a_rolled_back_run_is_rebuilt_branching_from_its_parents_version(branched, tmp_path):
    """A rollback's run names its parent run and version; its copied checkpoint is no version of its own."""
    ws = copy_of(branched, tmp_path)
    delete_database(ws)
    report = repair.repair(ws)
    assert report.rebuilt[:2] == [
        "run-0001: identity and global step 4 from step-000004 (2 verified checkpoint(s))",
        "run-0002: identity and global step 2 from step-000002 (1 verified checkpoint(s)), branched from run-0001 at "
        "step 2"]
    assert rows(ws, "SELECT id, global_step, active, parent_run, parent_version FROM runs ORDER BY id") == [
        ("run-0001", 4, 0, None, None), ("run-0002", 2, 1, "run-0001", 1)]
    assert rows(ws, "SELECT id, run_id, job_id, step FROM versions ORDER BY id") == [
        (1, "run-0001", 1, 2), (2, "run-0001", 2, 4)]
    assert [(r[0], r[1], r[3], r[8]) for r in job_rows(ws)] == [(1, "run-0001", "done", 2), (2, "run-0001", "done", 4)]
    assert report.lost == [LEDGER_LOST]


def test_a_rolled_back_run_whose_parent_checkpoint_is_gone_is_rebuilt_without_its_parent_version(branched, tmp_path):
    """With the version it branched from gone from disk, the run still names its parent run, and the loss is said."""
    ws = copy_of(branched, tmp_path)
    delete_database(ws)
    shutil.rmtree(ws.runs / "run-0001" / "checkpoints" / "step-000002")
    report = repair.repair(ws)
    assert report.lost == ["run-0002 branched from run-0001 at step 2, whose checkpoint is gone: its parent version is "
                           "not known", LEDGER_LOST]
    assert rows(ws, "SELECT id, parent_run, parent_version FROM runs ORDER BY id") == [
        ("run-0001", None, None), ("run-0002", "run-0001", None)]
    assert rows(ws, "SELECT id, run_id, job_id, step FROM versions") == [(1, "run-0001", 2, 4)]
    assert [(r[0], r[1], r[3], r[8]) for r in job_rows(ws)] == [(1, "run-0001", "done", 2), (2, "run-0001", "done", 4)]


def test_repair_refuses_while_a_daemon_holds_the_workspace(two_runs, tmp_path):
    """A running daemon has conveyor.db open: repair says so with its pid and changes nothing."""
    ws = copy_of(two_runs, tmp_path)
    delete_database(ws)
    with lock.Lock(ws), pytest.raises(ConveyorError) as e:
        repair.repair(ws)
    assert str(e.value) == (f"a conveyor daemon (pid {os.getpid()}) is running in {ws.root} with conveyor.db open; "
                            "end it first (`kill -TERM <pid>` stops it warmly), then `conveyor doctor --repair`")
    assert not (ws.root / "conveyor.db").exists()


def test_a_repair_cut_off_while_rebuilding_leaves_the_old_database_where_it_was(two_runs, tmp_path, monkeypatch):
    """The new database is built beside the old one and put in place last: a failure leaves the old one alone."""
    ws = copy_of(two_runs, tmp_path)
    path = ws.root / "conveyor.db"
    os.truncate(path, path.stat().st_size // 2)
    damaged = path.read_bytes()
    before = sorted(p.name for p in ws.root.iterdir())

    def cut(*args):
        raise RuntimeError("power lost")

    monkeypatch.setattr(repair, "_rebuild", cut)
    with pytest.raises(RuntimeError, match="power lost"):
        repair.repair(ws)
    assert path.read_bytes() == damaged and sorted(p.name for p in ws.root.iterdir()) == before
