"""What counts as a damaged database: the file's own faults, never a lock, a race's constraint or a full disk."""

from __future__ import annotations

import sqlite3

import pytest

from conveyor.faults import DatabaseDamaged, is_damaged_database


def _raised(sql_setup: list[str], sql: str) -> sqlite3.Error:
    con = sqlite3.connect(":memory:")
    for s in sql_setup:
        con.execute(s)
    with pytest.raises(sqlite3.Error) as e:
        con.execute(sql)
    return e.value


def test_a_constraint_two_racing_commands_break_is_not_damage():
    """Two rollbacks inserting the same run id: an IntegrityError, which `doctor --repair` must not be advised for."""
    e = _raised(["CREATE TABLE runs (id TEXT PRIMARY KEY)", "INSERT INTO runs VALUES ('run-0002')"],
                "INSERT INTO runs VALUES ('run-0002')")
    assert isinstance(e, sqlite3.IntegrityError) and not is_damaged_database(e)


def test_a_lock_is_not_damage_and_a_malformed_file_is(tmp_path):
    assert not is_damaged_database(sqlite3.OperationalError("database is locked"))
    path = tmp_path / "x.db"
    path.write_bytes(b"not a database at all, just some bytes" * 100)
    with pytest.raises(sqlite3.DatabaseError) as e:
        sqlite3.connect(path).execute("SELECT * FROM sqlite_master")
    assert is_damaged_database(e.value)
    assert is_damaged_database(DatabaseDamaged("named"))


def test_a_database_held_by_another_write_ends_in_one_line_naming_the_holder(workspace, tmp_path):
    """Another process holds a write transaction on conveyor.db: `conveyor add` waits (here 1 s, 30 s by default),
    then exits 1 with one line that names the holder's pid and what to do; no traceback, nothing queued."""
    import subprocess
    import sys

    from conftest import run_cli, status, text_file

    ws = workspace()
    assert run_cli(ws, "status").code == 0
    release = tmp_path / "release"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sqlite3, sys, time, pathlib\n"
        f"con = sqlite3.connect({str(ws / 'conveyor.db')!r}, isolation_level=None)\n"
        "con.execute('BEGIN IMMEDIATE'); con.execute(\"INSERT INTO events (ts, level, kind, message) VALUES "
        "(0, 'info', 'message', 'held')\")\n"
        "print('holding', flush=True)\n"
        f"while not pathlib.Path({str(release)!r}).exists(): time.sleep(0.02)\n"
        "con.execute('ROLLBACK')\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        r = run_cli(ws, "add", text_file(tmp_path / "a.jsonl", 8), subprocess_=True,
                    env={"CONVEYOR_TEST_LOCK_WAIT": "1"})
        assert r.code == 1, r.out + r.err
        assert "stayed locked by another process's write" in r.err and f"pid {holder.pid} (" in r.err, r.err
        assert "Traceback" not in r.err and len(r.err.strip().splitlines()) == 1
    finally:
        release.write_text("go\n")
        holder.wait(30)
    assert status(ws)["queue"] == []
