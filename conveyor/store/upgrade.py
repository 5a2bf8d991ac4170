"""Bring a database from an older conveyor up to date, once, when a workspace opens it (not lazily on read): rollups
of its metric rows (from then on every write keeps them, and no reader ever sees a run half rolled up), then
versions for the jobs it finished before versions existed, then the rollups of runs whose preference steps were
rolled up before the rollups kept their margin and accuracy. Afterwards this costs one PRAGMA."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from ..faults import DatabaseDamaged, database_message, is_damaged_database
from .database import CURRENT_VERSION, MARGINS_VERSION, ROLLUP_VERSION, VERSIONS_VERSION, transaction
from .series import rebuild_rollups
from .versions import backfill


def upgrade(con: sqlite3.Connection, path: Path) -> None:
    """Each step in one transaction, skipped if another process did it meanwhile; damage found on the way is
    faults.DatabaseDamaged, as at connect."""
    try:
        if _version(con) >= CURRENT_VERSION:
            return
        with transaction(con):
            if _version(con) < ROLLUP_VERSION:
                rebuild_rollups(con)
                con.execute(f"PRAGMA user_version = {ROLLUP_VERSION}")
        with transaction(con):
            if _version(con) < VERSIONS_VERSION:
                backfill(con)
                con.execute(f"PRAGMA user_version = {VERSIONS_VERSION}")
        with transaction(con):
            if _version(con) < MARGINS_VERSION:
                for (run_id,) in con.execute("SELECT DISTINCT run_id FROM metrics WHERE margin IS NOT NULL").fetchall():
                    rebuild_rollups(con, run_id)
                con.execute(f"PRAGMA user_version = {MARGINS_VERSION}")
    except sqlite3.DatabaseError as e:
        if is_damaged_database(e):
            raise DatabaseDamaged(database_message(path, e)) from e
        raise


def _version(con: sqlite3.Connection) -> int:
    return con.execute("PRAGMA user_version").fetchone()[0]
