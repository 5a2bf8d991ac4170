"""The workspace's SQLite database (WAL): schema and connection. Checkpoint manifests stay the truth about weights."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import time
import weakref
from logging.handlers import RotatingFileHandler
from pathlib import Path

from .. import testhooks
from ..faults import DatabaseDamaged, database_message, is_damaged_database

DB_FILE = "conveyor.db"  # in the workspace's folder
LOCK_WAIT = 30.0  # seconds a statement waits for another process's write before "database is locked"

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    identity TEXT NOT NULL,
    global_step INTEGER NOT NULL DEFAULT 0,
    active INTEGER NOT NULL DEFAULT 0,
    note TEXT
);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT,
    file TEXT NOT NULL,
    source TEXT NOT NULL,
    stored TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    format TEXT,
    priority INTEGER NOT NULL DEFAULT 1,
    state TEXT NOT NULL,
    examples INTEGER,
    tokens INTEGER,
    epochs INTEGER,
    planned_steps INTEGER,
    start_step INTEGER,
    end_step INTEGER,
    steps_done INTEGER NOT NULL DEFAULT 0,
    position INTEGER NOT NULL DEFAULT 0,
    segment_start INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,
    deaths INTEGER NOT NULL DEFAULT 0,
    claim TEXT,
    kept TEXT,
    truncated INTEGER NOT NULL DEFAULT 0,
    excluded TEXT,
    warnings TEXT NOT NULL DEFAULT '[]',
    error TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL
);
CREATE TABLE IF NOT EXISTS ledger (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL,
    job_id INTEGER NOT NULL,
    start_step INTEGER NOT NULL,
    end_step INTEGER NOT NULL,
    examples INTEGER NOT NULL,
    epochs INTEGER NOT NULL,
    tokens INTEGER NOT NULL,
    first_loss REAL,
    last_loss REAL,
    mean_loss REAL,
    outcome TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    run_id TEXT NOT NULL,
    step INTEGER NOT NULL,
    job_id INTEGER NOT NULL,
    lines TEXT NOT NULL,
    PRIMARY KEY (run_id, step)
);
CREATE TABLE IF NOT EXISTS metrics (
    run_id TEXT NOT NULL,
    step INTEGER NOT NULL,
    job_id INTEGER NOT NULL,
    loss REAL,
    learning_rate REAL,
    grad_norm REAL,
    tokens INTEGER,
    examples INTEGER,
    step_time REAL,
    created_at REAL NOT NULL,
    PRIMARY KEY (run_id, step)
);
CREATE TABLE IF NOT EXISTS evals (
    run_id TEXT NOT NULL,
    step INTEGER NOT NULL,
    job_id INTEGER,
    eval_loss REAL NOT NULL,
    examples INTEGER NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (run_id, step)
);
CREATE TABLE IF NOT EXISTS versions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL,
    job_id INTEGER NOT NULL,
    step INTEGER NOT NULL,
    pinned INTEGER NOT NULL DEFAULT 0,
    lost INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL
);
-- Losses of the named evaluation sets (each job's held-out examples) at each evaluation; eval.file stays in evals.
CREATE TABLE IF NOT EXISTS set_evals (
    run_id TEXT NOT NULL,
    step INTEGER NOT NULL,
    name TEXT NOT NULL,
    job_id INTEGER,
    loss REAL NOT NULL,
    examples INTEGER NOT NULL,
    tokens INTEGER NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (run_id, step, name)
);
-- Per notification target (a hash of notify.webhook and notify.command): the last event id handled.
CREATE TABLE IF NOT EXISTS notify_cursor (
    target TEXT PRIMARY KEY,
    last_id INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS samples (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL,
    step INTEGER NOT NULL,
    prompt TEXT NOT NULL,
    output TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS controls (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    action TEXT NOT NULL,
    who TEXT NOT NULL,
    reason TEXT,
    requested_at REAL NOT NULL,
    taken_at REAL,
    taken_by TEXT,
    acked_at REAL,
    result TEXT,
    effect TEXT
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    level TEXT NOT NULL,
    kind TEXT NOT NULL,
    job_id INTEGER,
    message TEXT NOT NULL
);
-- Aggregates of metric rows, kept on every write (series.roll_up), so that the dashboard reads a few thousand
-- rows of any range of a run of millions of steps. Bucket b of a level holds steps b*level .. b*level+level-1;
-- job_id is the job of its last step.
CREATE TABLE IF NOT EXISTS metrics_rollup (
    run_id TEXT NOT NULL,
    level INTEGER NOT NULL,
    bucket INTEGER NOT NULL,
    n INTEGER NOT NULL,
    step_min INTEGER NOT NULL,
    step_max INTEGER NOT NULL,
    job_id INTEGER,
    loss_n INTEGER NOT NULL,
    loss_sum REAL,
    loss_min REAL,
    loss_max REAL,
    lr_sum REAL,
    lr_n INTEGER NOT NULL,
    grad_norm_sum REAL,
    grad_norm_n INTEGER NOT NULL,
    tokens INTEGER,
    examples INTEGER,
    step_time REAL,
    PRIMARY KEY (run_id, level, bucket)
) WITHOUT ROWID;
-- The dashboard counts jobs by state, pages the ledger, sums a page of jobs' replayed examples and reads a run's
-- newest samples every second; it names each preference job's reference by the version that ends at its step.
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state);
CREATE INDEX IF NOT EXISTS jobs_by_fingerprint ON jobs (fingerprint);
CREATE INDEX IF NOT EXISTS ledger_by_run ON ledger (run_id, id);
CREATE INDEX IF NOT EXISTS ledger_by_job ON ledger (job_id);
CREATE INDEX IF NOT EXISTS samples_by_run ON samples (run_id, id);
CREATE INDEX IF NOT EXISTS versions_by_step ON versions (run_id, step);
"""

# PRAGMA user_version from which metrics_rollup is kept on every write of metric rows.
ROLLUP_VERSION = 1
# PRAGMA user_version from which every job end has a version (the jobs a database finished before got theirs).
VERSIONS_VERSION = 2
# PRAGMA user_version from which the rollups keep preference steps' margin and accuracy (runs with such steps
# rolled up before are rolled up again).
MARGINS_VERSION = 3
CURRENT_VERSION = MARGINS_VERSION  # the newest: a new database starts there, upgrade.py brings an older one there


# Columns added after the first release: (table, column, declaration). A database made by an older conveyor
# gets them on open; nothing is dropped or rewritten.
ADDED_COLUMNS = [
    ("jobs", "position", "INTEGER NOT NULL DEFAULT 0"),
    ("jobs", "segment_start", "INTEGER"),
    ("jobs", "deaths", "INTEGER NOT NULL DEFAULT 0"),
    ("jobs", "claim", "TEXT"),
    ("controls", "taken_at", "REAL"),
    ("controls", "taken_by", "TEXT"),
    ("controls", "effect", "TEXT"),
    ("runs", "parent_run", "TEXT"),  # a rollback's run branches from a version of its parent run
    ("runs", "parent_version", "INTEGER"),
    ("versions", "gated", "TEXT"),  # why eval.gate held the queue after this version (NULL: it did not)
    ("jobs", "holdout", "TEXT"),  # the file lines set aside as the job's held-out set (JSON), fixed at its plan
    ("jobs", "requeued_from", "INTEGER"),
    ("audit", "replay", "TEXT"),
    ("ledger", "replayed", "INTEGER NOT NULL DEFAULT 0"),
    ("set_evals", "exact", "REAL"),  # the share of scored answers that matched exactly (NULL: not scored)
    ("set_evals", "f1", "REAL"),  # their mean token F1
    ("set_evals", "answered", "INTEGER"),  # how many answers were scored
    ("jobs", "overrides", "TEXT"),  # per-job settings (`conveyor add --set`), JSON {"training.learning_rate": 1e-4}  # replayed examples the segment trained  # replayed examples of the step: JSON [[job, line], ...] (NULL: none)  # the job of an earlier run this one trains again after a rollback
    ("jobs", "reference", "TEXT"),  # a preference job's reference (JSON: kind, step, weights, sha256), at its start
    ("ledger", "method", "TEXT"),  # how the segment trained: sft, dpo, ipo, orpo or kto (NULL: before there was a choice)
    ("ledger", "reference", "TEXT"),  # the preference job's reference (JSON), as on the job
    ("metrics", "margin", "REAL"),  # preference and feedback steps: mean reward margin
    ("metrics", "accuracy", "REAL"),  # preference steps: share of pairs with the chosen answer's reward above
    ("set_evals", "preference", "REAL"),  # held-out pairs: share with the chosen answer more likely than the rejected
    ("metrics_rollup", "margin_sum", "REAL"),  # the bucket's preference and feedback steps: their margins summed
    ("metrics_rollup", "margin_n", "INTEGER NOT NULL DEFAULT 0"),  # how many steps have a margin
    ("metrics_rollup", "accuracy_sum", "REAL"),
    ("metrics_rollup", "accuracy_n", "INTEGER NOT NULL DEFAULT 0"),
]


# Tables that decide what trains and what a person sees first. They grow with the jobs, not the steps, so every
# connect checks their pages (PRAGMA quick_check of one table: about a millisecond). The per-step tables (metrics,
# audit, rollups, events, ...) are checked by `conveyor doctor` and once before training (consistency.refuse_to_train);
# elsewhere a damaged page of theirs raises DatabaseError when read, which the CLI reports as one line.
STATE_TABLES = ("runs", "jobs", "versions", "ledger", "controls", "sqlite_sequence")
_HEADER = b"SQLite format 3\x00"


def connect(path: Path) -> sqlite3.Connection:
    """Open (and create if needed) the state database in WAL mode; rows come back as sqlite3.Row. A database of an
    older conveyor gets the columns added since; its rows are brought up to date by upgrade.py (Workspace.db).

    Raises faults.DatabaseDamaged (naming the file and the fix) for a file that is not a database, is cut short,
    or whose schema or state tables fail their check."""
    live = _LIVE.setdefault(os.path.realpath(path), weakref.WeakSet())
    if not live:  # see _LIVE: read the file itself only while this process holds no lock on it
        _check_file(Path(path))
    con = sqlite3.connect(path, timeout=testhooks.lock_wait(LOCK_WAIT), isolation_level=None, factory=_Connection)
    live.add(con)
    try:
        con.row_factory = sqlite3.Row
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=NORMAL")
        con.execute("PRAGMA foreign_keys=ON")
        new = con.execute("SELECT 1 FROM sqlite_master WHERE name = 'runs'").fetchone() is None
        con.executescript(SCHEMA)
        if new:  # nothing to bring up to date (upgrade.py): the current version from the start
            con.execute(f"PRAGMA user_version = {CURRENT_VERSION}")
        _check_state_tables(con, Path(path))
        _add_missing_columns(con)
    except BaseException as e:
        con.close()
        if isinstance(e, sqlite3.DatabaseError) and is_damaged_database(e):
            raise DatabaseDamaged(database_message(path, e)) from e
        raise
    return con


# The open connections of this process, per database file. Closing any descriptor of a file drops every POSIX lock
# the process holds on it, SQLite's included: reading the header with open()/close() while a connection of this
# process is open would let another process take the database for unused, checkpoint it and delete its -wal under
# the connection, whose later commits would then go to a deleted file, unseen by every other process.
_LIVE: dict[str, weakref.WeakSet] = {}


class _Connection(sqlite3.Connection):
    """A connection that leaves _LIVE when closed (or collected: the WeakSet forgets it)."""

    def close(self) -> None:
        super().close()
        for live in _LIVE.values():
            live.discard(self)


def _check_file(path: Path) -> None:
    """Read the 100-byte header: not a database, or shorter than the pages it says it has (cut short), is damage.

    The page count in the header is trusted only when SQLite marked it valid; and only when no write-ahead log
    holds frames, since pages that live in the log may not be in the main file yet (a checkpoint under way)."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return
    if size == 0:
        return  # created but never written (SQLite's own first state): an empty database
    with open(path, "rb") as f:
        header = f.read(100)
    if len(header) < 100 or not header.startswith(_HEADER):
        raise DatabaseDamaged(database_message(path, f"its {size} bytes do not start with an SQLite header: "
                                                     "not a database, or cut short"))
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages, counter, valid_for = (int.from_bytes(header[i:i + 4], "big") for i in (28, 24, 92))
    wal = path.with_name(path.name + "-wal")
    log_frames = wal.exists() and wal.stat().st_size > 32  # 32: a log header without frames
    if pages and counter == valid_for and not log_frames and size < pages * page_size:
        raise DatabaseDamaged(database_message(path, f"cut short: its header says {pages} pages of {page_size} "
                                                     f"bytes ({pages * page_size} bytes), the file holds {size}"))


def _check_state_tables(con: sqlite3.Connection, path: Path) -> None:
    for table in STATE_TABLES:
        problems = [row[0] for row in con.execute(f"PRAGMA quick_check({table})")]
        if problems != ["ok"]:
            raise DatabaseDamaged(database_message(path, f"table {table} fails its check: {'; '.join(problems[:3])}"))


def _add_missing_columns(con: sqlite3.Connection) -> None:
    for table, column, declaration in ADDED_COLUMNS:
        present = {row["name"] for row in con.execute(f"PRAGMA table_info({table})")}
        if column not in present:
            try:
                con.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
            except sqlite3.OperationalError as e:  # another process added it first
                if "duplicate column" not in str(e):
                    raise


@contextlib.contextmanager
def transaction(con: sqlite3.Connection):
    """All statements inside commit together or not at all (BEGIN IMMEDIATE: writers queue, never interleave).

    Nested use joins the outer transaction, so a function that needs atomicity can be called from one that
    already holds it."""
    if con.in_transaction:
        yield con
        return
    con.execute("BEGIN IMMEDIATE")
    try:
        yield con
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


LEVELS = {"info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
logger = logging.getLogger("conveyor")


def log_event(con: sqlite3.Connection, level: str, kind: str, message: str, job_id: int | None = None) -> None:
    """Append to the events table (what status and the dashboard show) and to the workspace's log file."""
    now = time.time()
    con.execute("INSERT INTO events (ts, level, kind, job_id, message) VALUES (?, ?, ?, ?, ?)",
                (now, level, kind, job_id, message))
    logger.log(LEVELS.get(level, logging.INFO), json.dumps(
        {"ts": round(now, 3), "pid": os.getpid(), "level": level, "kind": kind, "job": job_id, "message": message}))


class _LogFile(RotatingFileHandler):
    """The workspace log. A line it cannot write (a full disk) is dropped without a word: the same message is in
    the events table or on the terminal, and logging's own report would be a traceback on stderr."""

    def handleError(self, record: logging.LogRecord) -> None:
        self.dropped = getattr(self, "dropped", 0) + 1


def attach_log_file(folder: Path) -> None:
    """Structured log (one JSON object a line) in logs/conveyor.log, rotated at 5 MB, 5 files kept."""
    folder.mkdir(exist_ok=True)
    path = str(folder / "conveyor.log")
    if any(getattr(h, "baseFilename", None) == path for h in logger.handlers):
        return
    handler = _LogFile(path, maxBytes=5 * 2**20, backupCount=5, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
