"""`conveyor doctor --repair` cut off (SIGKILL) after each of its writes: the next repair finishes it or starts over,
and either way the rebuilt database keeps what the first one had read of the old one (job names, a rejected job),
and no temporary file of it stays."""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_workspace, run_cli, text_file

SETTINGS = {"training": {"batch_size": 4, "grad_accum": 2, "learning_rate": 1e-3, "save_every": 2, "max_length": 64}}
BEFORE_COMMIT = ["repair-built", "repair-intent"]  # the old database stays in place, untouched
AFTER_COMMIT = ["repair-committed", "repair-aside-db", "repair-moved"]  # the next repair puts the new one in place


@pytest.fixture(scope="module")
def mismatched(tmp_path_factory, tiny_dir) -> Path:
    """a.jsonl (job 1) and b.jsonl (job 2) trained, bad.jsonl rejected (job 3); then the database's run is set back
    to step 2 (its history too) while its checkpoints reach step 5: a database behind the runs on disk, readable."""
    root = tmp_path_factory.mktemp("mismatched")
    ws = make_workspace(root / "ws", tiny_dir, **SETTINGS)
    assert run_cli(ws, "train", text_file(root / "a.jsonl", 16, "a"), text_file(root / "b.jsonl", 24, "b"),
                   "-q").code == 0
    (root / "bad.jsonl").write_text('{"text": "fine"}\n{"oops": 1}\n')
    assert run_cli(ws, "add", root / "bad.jsonl").code == 1
    con = sqlite3.connect(ws / "conveyor.db")
    con.execute("UPDATE runs SET global_step = 2")  # as an older copy of the database, from step 2
    con.execute("DELETE FROM audit WHERE step > 2")
    con.commit()
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    return ws


def _repair(ws: Path, failpoint: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **({"CONVEYOR_FAILPOINT": f"{failpoint}:0"} if failpoint else {})}
    return subprocess.run([sys.executable, "-m", "conveyor", "-w", str(ws), "doctor", "--repair"],
                          capture_output=True, text=True, timeout=300, env=env)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# One write before the commit and one after run by default; the other three in the slow run (CI runs both).
@pytest.mark.parametrize("failpoint", [f if f in ("repair-built", "repair-committed") else
                                       pytest.param(f, marks=pytest.mark.slow) for f in BEFORE_COMMIT + AFTER_COMMIT])
def test_a_repair_cut_off_after_any_write_is_finished_or_started_over_by_the_next(mismatched, tmp_path, failpoint):
    ws = tmp_path / "ws"
    shutil.copytree(mismatched, ws)
    old = _digest(ws / "conveyor.db")
    killed = _repair(ws, failpoint)
    assert killed.returncode == -9, killed.stdout + killed.stderr
    if failpoint in BEFORE_COMMIT:
        assert _digest(ws / "conveyor.db") == old  # nothing of the repair is in place before its commit
        assert not list(ws.glob("conveyor.db.damaged-*"))
    else:
        assert (ws / ".conveyor.db.repaired").exists() or (ws / "conveyor.db").exists()
    again = _repair(ws)
    assert again.returncode == 0, again.stdout + again.stderr
    said = "is finished: the new one is in place" if failpoint in AFTER_COMMIT else "now removed; conveyor.db is as it was"
    assert said in again.stdout, again.stdout
    assert not [p.name for p in ws.glob(".conveyor.db.repair*")]
    aside = sorted(p.name for p in ws.glob("conveyor.db.damaged-*"))
    assert len(aside) == 1 and _digest(ws / aside[0]) == old  # the old database, whole, kept aside (once)
    con = sqlite3.connect(ws / "conveyor.db")
    jobs = con.execute("SELECT id, file, state FROM jobs ORDER BY id").fetchall()
    step = con.execute("SELECT global_step FROM runs").fetchone()[0]
    con.close()
    assert jobs == [(1, "a.jsonl", "done"), (2, "b.jsonl", "done"), (3, "bad.jsonl", "rejected")]
    assert step == 5
    assert _repair(ws).returncode == 0 and "nothing to repair" in _repair(ws).stdout
