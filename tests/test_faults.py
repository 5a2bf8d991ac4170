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
