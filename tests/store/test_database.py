"""store: the schema and the connection. connect makes (or brings up to date) the schema, refuses a damaged file by
name, and transaction() commits all or nothing, joining an outer one when nested."""

from __future__ import annotations

import os
import random
import sqlite3

import pytest

from conveyor.faults import DatabaseDamaged
from conveyor.store import database as store


@pytest.fixture
def con(tmp_path):
    con = store.connect(tmp_path / "conveyor.db")
    yield con
    con.close()


def _columns(con, table: str) -> set[str]:
    return {row[1] for row in con.execute(f"PRAGMA table_info({table})")}


def test_connect_creates_the_schema_in_wal_mode_at_the_current_version(con):
    tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"runs", "jobs", "ledger", "audit", "metrics", "evals", "versions", "set_evals", "notify_cursor",
            "samples", "controls", "events", "metrics_rollup"} <= tables
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert con.execute("PRAGMA user_version").fetchone()[0] == store.CURRENT_VERSION
    assert {column for table, column, _ in store.ADDED_COLUMNS if table == "jobs"} <= _columns(con, "jobs")
    con.execute("INSERT INTO runs (id, created_at, identity) VALUES ('run-0001', 0, '{}')")
    assert con.execute("SELECT * FROM runs").fetchone()["id"] == "run-0001"  # rows by column name


def test_connect_adds_the_missing_columns_to_a_database_of_an_older_conveyor_and_keeps_its_rows(tmp_path):
    path = tmp_path / "conveyor.db"
    old = sqlite3.connect(path)  # the first release's jobs and runs tables, without the columns added since
    old.executescript("""
        CREATE TABLE runs (id TEXT PRIMARY KEY, created_at REAL NOT NULL, identity TEXT NOT NULL,
                           global_step INTEGER NOT NULL DEFAULT 0, active INTEGER NOT NULL DEFAULT 0, note TEXT);
        CREATE TABLE jobs (id INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT, file TEXT NOT NULL,
                           source TEXT NOT NULL, stored TEXT NOT NULL, fingerprint TEXT NOT NULL, format TEXT,
                           priority INTEGER NOT NULL DEFAULT 1, state TEXT NOT NULL, examples INTEGER, tokens INTEGER,
                           epochs INTEGER, planned_steps INTEGER, start_step INTEGER, end_step INTEGER,
                           steps_done INTEGER NOT NULL DEFAULT 0, attempts INTEGER NOT NULL DEFAULT 0, kept TEXT,
                           truncated INTEGER NOT NULL DEFAULT 0, excluded TEXT, warnings TEXT NOT NULL DEFAULT '[]',
                           error TEXT, created_at REAL NOT NULL, started_at REAL, finished_at REAL);
        INSERT INTO runs (id, created_at, identity, global_step, active) VALUES ('run-0001', 1, '{}', 5, 1);
        INSERT INTO jobs (file, source, stored, fingerprint, state, created_at) VALUES ('a.jsonl', 'a', 'a', 'f',
                          'done', 1);
    """)
    old.close()
    con = store.connect(path)
    assert {"position", "segment_start", "deaths", "claim", "holdout", "requeued_from"} <= _columns(con, "jobs")
    assert {"parent_run", "parent_version"} <= _columns(con, "runs")
    job = con.execute("SELECT * FROM jobs").fetchone()
    assert (job["file"], job["position"], job["deaths"], job["claim"]) == ("a.jsonl", 0, 0, None)
    assert con.execute("SELECT global_step, parent_run FROM runs").fetchone()[:] == (5, None)
    con.close()
    con = store.connect(path)  # a second open changes nothing
    assert con.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 1
    con.close()


def test_a_transaction_commits_together_or_rolls_back_together(con, tmp_path):
    with store.transaction(con):
        con.execute("INSERT INTO events (ts, level, kind, message) VALUES (1, 'info', 'x', 'one')")
        con.execute("INSERT INTO events (ts, level, kind, message) VALUES (2, 'info', 'x', 'two')")
    other = sqlite3.connect(tmp_path / "conveyor.db")  # another process sees both
    assert other.execute("SELECT COUNT(*) FROM events").fetchone()[0] == 2
    with pytest.raises(RuntimeError):
        with store.transaction(con):
            con.execute("INSERT INTO events (ts, level, kind, message) VALUES (3, 'info', 'x', 'three')")
            raise RuntimeError("cut off")
    assert not con.in_transaction
    assert [r[0] for r in other.execute("SELECT message FROM events ORDER BY id")] == ["one", "two"]
    other.close()


def test_a_nested_transaction_joins_the_outer_one(con):
    with pytest.raises(RuntimeError):
        with store.transaction(con):
            con.execute("INSERT INTO events (ts, level, kind, message) VALUES (1, 'info', 'x', 'outer')")
            with store.transaction(con):  # joins: no commit of its own
                con.execute("INSERT INTO events (ts, level, kind, message) VALUES (2, 'info', 'x', 'inner')")
            assert con.in_transaction
            raise RuntimeError("the outer one fails after the inner one ended")
    assert con.execute("SELECT COUNT(*) FROM events").fetchone()[0] == 0  # the inner insert went with it
    with store.transaction(con):
        with store.transaction(con):
            con.execute("INSERT INTO events (ts, level, kind, message) VALUES (3, 'info', 'x', 'kept')")
    assert [r[0] for r in con.execute("SELECT message FROM events")] == ["kept"]


def _written(path):
    con = store.connect(path)
    con.execute("INSERT INTO runs (id, created_at, identity) VALUES ('run-0001', 0, '{}')")
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # as after the last process closed it
    con.close()


def test_connect_refuses_a_file_that_is_not_a_database_or_is_cut_short_naming_it(tmp_path):
    path = tmp_path / "conveyor.db"
    path.write_text("name,step\n" * 200)
    with pytest.raises(DatabaseDamaged, match=r"conveyor\.db is damaged \(its 2000 bytes do not start with an SQLite "
                       r"header.*`conveyor doctor --repair`"):
        store.connect(path)
    path.unlink()
    _written(path)
    size = path.stat().st_size
    os.truncate(path, size // 2)
    with pytest.raises(DatabaseDamaged, match=rf"cut short: its header says {size // 4096} pages of 4096 bytes "
                       rf"\({size} bytes\), the file holds {size // 2}"):
        store.connect(path)
    assert path.stat().st_size == size // 2  # refused before SQLite wrote anything


def test_connect_refuses_a_garbled_page_of_a_state_table_and_opens_an_empty_file(tmp_path):
    path = tmp_path / "conveyor.db"
    _written(path)
    con = sqlite3.connect(path)
    page = con.execute("SELECT rootpage FROM sqlite_master WHERE name = 'jobs'").fetchone()[0]
    con.close()
    with open(path, "r+b") as f:
        f.seek((page - 1) * 4096)
        f.write(random.Random(1).randbytes(4096))
    with pytest.raises(DatabaseDamaged, match=r"conveyor\.db is damaged \(.*jobs"):
        store.connect(path)
    empty = tmp_path / "empty.db"
    empty.touch()  # what sqlite3.connect leaves before its first write: a database without tables yet
    store.connect(empty).close()


def test_a_second_connection_never_reads_the_file_under_an_open_one(tmp_path, monkeypatch):
    """Closing any descriptor of the database file drops every POSIX lock this process holds on it (SQLite's
    too): with a connection open, the header check must not open the file, or another process could delete the
    -wal under it (a daemon's commits then vanish: found by the notify test)."""
    path = tmp_path / "conveyor.db"
    first = store.connect(path)
    opened = []
    monkeypatch.setattr(store, "_check_file", lambda p: opened.append(p))
    second = store.connect(path)
    assert opened == []
    second.close()
    first.close()
    store.connect(path).close()
    assert opened == [path]  # nothing open any more: checked again
