"""A damaged or missing conveyor.db (cut short, garbage on a page, deleted, its -wal deleted after a kill, replaced)
is reported in one line naming the file and the fix by every command, trains nothing and touches nothing under runs/
or data/; `conveyor doctor --repair` moves it aside and rebuilds the runs, versions and jobs from the checkpoint
manifests, after which training continues from the newest checkpoint."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import adapter_weights, make_workspace, max_abs_diff, run_cli, text_file

from conveyor.store import database as store
from conveyor.store import manifest as mf
from conveyor.store import runs

SETTINGS = {"training": {"batch_size": 4, "grad_accum": 2, "learning_rate": 1e-3, "save_every": 2, "max_length": 64}}
STATE_TABLES = ("runs", "jobs", "versions", "ledger", "controls")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_dir) -> Path:
    """a.jsonl trained steps 1–2, b.jsonl 3–5 (checkpoints at 2, 4 and 5; v1 at 2, v2 at 5); more.jsonl beside."""
    root = tmp_path_factory.mktemp("trained")
    ws = make_workspace(root / "ws", tiny_dir, **SETTINGS)
    files = [text_file(root / "a.jsonl", 16, "a"), text_file(root / "b.jsonl", 24, "b")]
    assert run_cli(ws, "train", *files, "-q").code == 0
    text_file(root / "more.jsonl", 16, "m")
    con = sqlite3.connect(ws / "conveyor.db")  # as a workspace no process has open: everything in the main file
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    return ws


@pytest.fixture
def ws(trained, tmp_path) -> Path:
    copy = tmp_path / "ws"
    shutil.copytree(trained, copy)
    shutil.copy(trained.parent / "more.jsonl", tmp_path / "more.jsonl")
    return copy


def cli(ws: Path, *args) -> subprocess.CompletedProcess:
    """The installed command, as a person runs it (a traceback would show here)."""
    return subprocess.run([sys.executable, "-m", "conveyor", "-w", str(ws), *map(str, args)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "COLUMNS": "200"})


def tree(folder: Path) -> dict[str, str]:
    """sha256 of every file under a folder, and every folder (by name), by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def manifests(ws: Path, run_id: str = "run-0001") -> dict[int, mf.Manifest]:
    root = ws / "runs" / run_id / "checkpoints"
    return {int(p.name[5:]): mf.read(p) for p in sorted(root.glob("step-*"))}


# The damages --------------------------------------------------------------------------------------------------
def cut_short(ws: Path) -> None:
    db = ws / "conveyor.db"
    os.truncate(db, db.stat().st_size // 2)


def garbage_on_a_state_page(ws: Path) -> None:
    """4 KB of random bytes over the page of a state table nearest the middle of the file (its root page: a used
    page; the tables are small enough to be one page each)."""
    db = ws / "conveyor.db"
    con = sqlite3.connect(db)
    page_size = con.execute("PRAGMA page_size").fetchone()[0]
    roots = dict(con.execute(f"SELECT name, rootpage FROM sqlite_master WHERE name IN {STATE_TABLES}").fetchall())
    con.close()
    middle = db.stat().st_size / 2
    name, page = min(roots.items(), key=lambda item: abs((item[1] - 0.5) * page_size - middle))
    assert page * page_size <= db.stat().st_size, (name, page)
    with open(db, "r+b") as f:
        f.seek((page - 1) * page_size)
        f.write(random.Random(7).randbytes(page_size))


def deleted(ws: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        (ws / f"conveyor.db{suffix}").unlink(missing_ok=True)


def wal_deleted(ws: Path) -> None:
    """The realistic way to lose the log: a process killed mid-job (its writes still in conveyor.db-wal), then the
    -wal and -shm files deleted (a clean-up script, a copy without them). SQLite then silently opens the database
    as it was at its last checkpoint: job 3 and its two steps are gone from it, but not from runs/."""
    env = {**os.environ, "CONVEYOR_FAILPOINT": "checkpoint-renamed:6"}  # job 3 half done at step 6
    p = subprocess.run([sys.executable, "-m", "conveyor", "-w", str(ws), "train", str(ws.parent / "more.jsonl"),
                        "-q"], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == -9, p.stdout + p.stderr
    assert (ws / "conveyor.db-wal").stat().st_size > 0
    (ws / "conveyor.db-wal").unlink()
    (ws / "conveyor.db-shm").unlink()


DAMAGES = {"cut short": cut_short, "garbage on a page": garbage_on_a_state_page, "deleted": deleted,
           "-wal deleted after a kill": wal_deleted}


def every_command(ws: Path, out: Path) -> dict[str, tuple[int, str]]:
    """Every command a person would try, in this process (fast: torch is imported once) except three through the
    installed command (where a traceback would show): (exit code, what it printed)."""
    more = ws.parent / "more.jsonl"
    commands = [("status",), ("history",), ("versions",), ("queue",), ("add", more), ("train", more, "-q"),
                ("run", "--drain", "-q"), ("export", out), ("export", out, "--version", "v1"), ("rollback", "v1"),
                ("pin", "v1"), ("eval", "--matrix"), ("generate", "hello"), ("doctor",), ("logs",)]
    results = {}
    for command in commands:
        name = " ".join(map(str, command)).replace(str(ws.parent), "…")
        if command[0] in ("status", "train", "doctor"):
            p = cli(ws, *command)
            results[name + " (installed)"] = (p.returncode, p.stdout + p.stderr)
        r = run_cli(ws, *command)  # raises what is not a ConveyorError (a traceback from the installed command)
        results[name] = (r.code, r.out + r.err)
    return results


# The log lost after a kill trains a job first: the slow run's (CI runs both).
@pytest.mark.parametrize("damage", [pytest.param(d, marks=pytest.mark.slow) if d == "-wal deleted after a kill" else d
                                    for d in DAMAGES])
def test_every_command_names_the_damaged_database_and_touches_nothing_then_repair_rebuilds(ws, damage):
    DAMAGES[damage](ws)
    before = {"runs": tree(ws / "runs"), "data": tree(ws / "data")}
    steps = manifests(ws)
    results = every_command(ws, ws.parent / "out")
    for command, (code, said) in results.items():
        assert "Traceback" not in said, (command, said)
        if command == "logs":  # the one command that needs no database: how a person looks into it
            assert code == 0, (command, said)
            continue
        assert code != 0 and "conveyor.db" in said and "conveyor doctor --repair" in said, (command, said)
    code, said = results["doctor (installed)"]
    assert code == 1 and "error  the state database" in said, said
    assert "runs/run-0001: " in said  # what the checkpoints hold, read without the database
    assert {"runs": tree(ws / "runs"), "data": tree(ws / "data")} == before
    assert not (ws / "out").exists()
    assert (ws / "conveyor.db").exists() == (damage != "deleted")  # no empty database made in its place

    r = cli(ws, "doctor", "--repair", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)["repair"]
    assert "conveyor.db" in report["problem"]
    if damage == "deleted":
        assert report["moved"] == []
    else:
        assert report["moved"][0].startswith("conveyor.db.damaged-") and (ws / report["moved"][0]).exists()
    assert any("ledger" in text for text in report["not_rebuilt"])
    assert {"runs": tree(ws / "runs"), "data": tree(ws / "data")} == before
    newest = max(steps)
    st = json.loads(run_cli(ws, "status", "--json").out)
    assert [(x["id"], x["global_step"], x["active"]) for x in st["runs"]] == [("run-0001", newest, True)]
    ends = [(s, m.job.job_id) for s, m in sorted(steps.items()) if m.job_end]
    got = json.loads(run_cli(ws, "versions", "--json").out)
    assert [(v["version"], v["run"], v["step"], v["job"]) for v in got] == \
        [(f"v{i}", "run-0001", s, j) for i, (s, j) in enumerate(ends, 1)]
    r = run_cli(ws, "export", ws.parent / "v1-out", "--version", "v1")
    assert r.code == 0 and "global step 2" in r.out, r.out + r.err
    assert max_abs_diff(adapter_weights(ws.parent / "v1-out"),
                        adapter_weights(ws / "runs/run-0001/checkpoints/step-000002")) == 0

    if damage == "-wal deleted after a kill":  # job 3 stood at its step 1 of 2 in step-000006: it resumes there
        assert {j["id"]: j["state"] for j in st["jobs"]} == {1: "done", 2: "done", 3: "interrupted"}
        r = run_cli(ws, "run", "--drain", "-q")
        assert r.code == 0 and "job 3 resumes at global step 7 from step-000006" in r.out, r.out + r.err
        return
    r = run_cli(ws, "train", ws.parent / "more.jsonl", "-q")
    assert r.code == 0 and "global 6–7" in r.out, r.out + r.err
    assert max(manifests(ws)) == 7 and manifests(ws)[7].job_end


@pytest.mark.slow
def test_a_job_resumed_after_a_lost_wal_and_a_repair_ends_with_the_weights_of_an_uninterrupted_run(trained, ws):
    wal_deleted(ws)
    assert run_cli(ws, "train", ws.parent / "more.jsonl", "-q").code == 1  # refused: job 3 is not known
    assert run_cli(ws, "doctor", "--repair").code == 0
    assert run_cli(ws, "run", "--drain", "-q").code == 0
    clean = ws.parent / "clean"
    shutil.copytree(trained, clean)
    assert run_cli(clean, "train", ws.parent / "more.jsonl", "-q").code == 0
    end = "runs/run-0001/checkpoints/step-000007"
    assert max_abs_diff(adapter_weights(ws / end), adapter_weights(clean / end)) == 0
    versions = json.loads(run_cli(ws, "versions", "--json").out)
    assert [(v["version"], v["job"], v["step"]) for v in versions] == [("v1", 1, 2), ("v2", 2, 5), ("v3", 3, 7)]
    assert [v["file"] for v in versions][:2] == ["a.jsonl", "b.jsonl"]  # the old file still named them


def test_a_deleted_database_never_lets_train_run_over_the_orphaned_checkpoints(ws):
    deleted(ws)
    before = tree(ws / "runs")
    r = cli(ws, "train", ws.parent / "more.jsonl", "-q")
    assert r.returncode == 1 and "conveyor.db is missing, but runs/run-0001 holds 3 checkpoint(s) (newest step 5)" \
        in r.stderr, r.stderr
    assert not (ws / "conveyor.db").exists() and tree(ws / "runs") == before  # nothing trained, no job left running


def test_a_damaged_page_of_the_per_step_tables_stops_training_and_doctor_says_so(ws):
    """Metric pages are not checked at every open (they grow with the steps): a command that reads one says so in
    one line; training checks every page first and refuses."""
    db = ws / "conveyor.db"
    con = sqlite3.connect(db)
    page = con.execute("SELECT rootpage FROM sqlite_master WHERE name = 'metrics'").fetchone()[0]
    con.close()
    with open(db, "r+b") as f:
        f.seek((page - 1) * 4096)
        f.write(random.Random(3).randbytes(4096))
    before = tree(ws / "runs")
    r = cli(ws, "train", ws.parent / "more.jsonl", "-q")
    assert r.returncode == 1 and "conveyor.db is damaged" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert tree(ws / "runs") == before
    r = cli(ws, "history")
    assert "Traceback" not in r.stderr and (r.returncode == 0 or "conveyor.db is damaged" in r.stderr), r.stderr
    r = run_cli(ws, "doctor")
    assert r.code == 1 and "conveyor.db is damaged" in r.out, r.out
    r = run_cli(ws, "doctor", "--repair")
    assert r.code == 0, r.out + r.err
    assert "job 3, more.jsonl, queued" in r.out and "conveyor add data/" in r.out  # listed, not queued again
    assert json.loads(run_cli(ws, "queue", "--json").out) == []


def test_a_database_of_another_model_is_refused_with_the_differences(ws):
    con = sqlite3.connect(ws / "conveyor.db")
    identity = json.loads(con.execute("SELECT identity FROM runs").fetchone()[0])
    con.execute("UPDATE runs SET identity = ?", (json.dumps({**identity, "adapter.r": 4}),))
    con.commit()
    con.close()
    r = run_cli(ws, "run", "--drain", "-q")
    assert r.code == 1 and "was trained as another model than conveyor.db records for run-0001 " \
        "(adapter.r: 4 → 8)" in r.err, r.err
    assert run_cli(ws, "doctor", "--repair").code == 0
    assert json.loads(run_cli(ws, "status", "--json").out)["run"]["identity"] == identity


def test_repair_leaves_a_whole_matching_database_alone(ws):
    before = tree(ws)
    r = cli(ws, "doctor", "--repair")
    assert r.returncode == 0 and "nothing to repair" in r.stdout, r.stdout + r.stderr
    assert "conveyor.db: integrity check passed, and it matches the runs on disk" in r.stdout
    after = tree(ws)
    kept = lambda k: ("conveyor.db" in k or k.startswith(("runs", "data"))) and not k.endswith(("-wal", "-shm"))
    assert {k for k in after if kept(k)} == {k for k in before if kept(k)}  # SQLite's -wal/-shm come and go
    assert {k: v for k, v in after.items() if k.startswith(("runs", "data"))} == \
        {k: v for k, v in before.items() if k.startswith(("runs", "data"))}


def test_a_new_run_never_takes_the_name_of_a_folder_that_holds_something(tmp_path):
    (tmp_path / "runs" / "run-0001" / "checkpoints").mkdir(parents=True)
    (tmp_path / "runs" / "run-0002").mkdir()  # empty: harmless to use
    con = store.connect(tmp_path / "conveyor.db")
    assert runs.next_id(con) == "run-0002"
    (tmp_path / "runs" / "run-0002" / "trainer").mkdir()
    assert runs.next_id(con) == "run-0003"
    con.close()
