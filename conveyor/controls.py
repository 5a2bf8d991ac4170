"""Controls (pause, resume, stop, skip): a person's request is a row in the database; the worker acts on it
between optimizer steps and writes back what it did, which the requesting command prints."""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from enum import Enum



class Action(str, Enum):
    PAUSE = "pause"
    RESUME = "resume"
    STOP = "stop"
    SKIP = "skip"


@dataclass
class Request:
    id: int
    action: Action
    who: str
    reason: str | None


def request(con: sqlite3.Connection, action: Action, who: str, reason: str | None = None) -> int:
    """Queue a control request; returns its id."""
    cur = con.execute("INSERT INTO controls (action, who, reason, requested_at) VALUES (?, ?, ?, ?)",
                      (action.value, who, reason, time.time()))
    return cur.lastrowid


def pending(con: sqlite3.Connection) -> list[Request]:
    """Requests not yet acted on, oldest first."""
    rows = con.execute("SELECT * FROM controls WHERE acked_at IS NULL ORDER BY id").fetchall()
    return [Request(r["id"], Action(r["action"]), r["who"], r["reason"]) for r in rows]


def ack(con: sqlite3.Connection, request_id: int, result: str) -> None:
    con.execute("UPDATE controls SET acked_at = ?, result = ? WHERE id = ?", (time.time(), result, request_id))


def wait(con: sqlite3.Connection, request_id: int, timeout: float) -> str | None:
    """What was done about a request, or None if nobody acted within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = con.execute("SELECT result FROM controls WHERE id = ? AND acked_at IS NOT NULL",
                          (request_id,)).fetchone()
        if row:
            return row["result"]
        time.sleep(0.05)
    return None


def paused(con: sqlite3.Connection) -> bool:
    """Whether the last acted-on pause/resume was a pause (the daemon holds between jobs too)."""
    row = con.execute("SELECT action FROM controls WHERE action IN ('pause', 'resume') AND acked_at IS NOT NULL"
                      " AND (result IS NULL OR result NOT LIKE 'expired%') ORDER BY id DESC LIMIT 1").fetchone()
    return bool(row) and row["action"] == "pause"
