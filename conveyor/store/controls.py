"""Controls (pause, resume, stop, skip): a person's request is a row in the database.

ask → take → answer. The CLI and the dashboard `ask` (and wait for the answer); whoever acts (the daemon
between jobs, the worker between optimizer steps) `take`s a request atomically, acts as MEANING says for where
it is, and `answer`s it; every write is a compare-and-set, so an answer and an expiry can never overwrite
each other and no request is acted on twice.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from enum import Enum

from .database import transaction


class Action(str, Enum):
    PAUSE = "pause"
    RESUME = "resume"
    STOP = "stop"
    SKIP = "skip"


class Context(str, Enum):
    """Where the request is taken."""
    BETWEEN_JOBS = "between jobs"
    PAUSED_BETWEEN_JOBS = "paused between jobs"
    BETWEEN_STEPS = "between steps"
    PAUSED_IN_JOB = "paused in a job"


class Effect(str, Enum):
    HOLD = "hold"  # checkpoint (in a job) and wait; no job starts
    GO_ON = "go on"  # leave the pause
    STOP = "stop"  # checkpoint, keep the job interrupted, end the daemon
    SKIP = "skip"  # checkpoint, mark the job skipped, go on with the next
    NOTHING = "nothing"  # answered with why nothing changed


# What each request means where it is taken: the one place that says it.
MEANING: dict[Context, dict[Action, Effect]] = {
    Context.BETWEEN_JOBS: {Action.PAUSE: Effect.HOLD, Action.RESUME: Effect.NOTHING, Action.STOP: Effect.STOP,
                           Action.SKIP: Effect.NOTHING},
    Context.PAUSED_BETWEEN_JOBS: {Action.PAUSE: Effect.NOTHING, Action.RESUME: Effect.GO_ON,
                                  Action.STOP: Effect.STOP, Action.SKIP: Effect.NOTHING},
    Context.BETWEEN_STEPS: {Action.PAUSE: Effect.HOLD, Action.RESUME: Effect.NOTHING, Action.STOP: Effect.STOP,
                            Action.SKIP: Effect.SKIP},
    Context.PAUSED_IN_JOB: {Action.PAUSE: Effect.NOTHING, Action.RESUME: Effect.GO_ON, Action.STOP: Effect.STOP,
                            Action.SKIP: Effect.SKIP},
}

NOTHING_BECAUSE = {
    (Context.BETWEEN_JOBS, Action.RESUME): "not paused",
    (Context.BETWEEN_STEPS, Action.RESUME): "not paused",
    (Context.PAUSED_BETWEEN_JOBS, Action.PAUSE): "already paused",
    (Context.PAUSED_IN_JOB, Action.PAUSE): "already paused",
    (Context.BETWEEN_JOBS, Action.SKIP): "no job is training; nothing to skip (use `conveyor queue remove`)",
    (Context.PAUSED_BETWEEN_JOBS, Action.SKIP): "no job is training; nothing to skip (use `conveyor queue remove`)",
}

EXPIRED = "expired: nobody acted on it in time"


@dataclass
class Request:
    id: int
    action: Action
    who: str
    reason: str | None

    def effect(self, where: Context) -> Effect:
        return MEANING[where][self.action]

    def why_nothing(self, where: Context) -> str:
        return NOTHING_BECAUSE[(where, self.action)]


def ask(con: sqlite3.Connection, action: Action, who: str, reason: str | None = None) -> int:
    """File a request; returns its id."""
    cur = con.execute("INSERT INTO controls (action, who, reason, requested_at) VALUES (?, ?, ?, ?)",
                      (action.value, who, reason, time.time()))
    return cur.lastrowid


def take(con: sqlite3.Connection, taker: str) -> Request | None:
    """The oldest request nobody has taken, now taken by `taker` (atomic), or None."""
    if con.execute("SELECT 1 FROM controls WHERE taken_at IS NULL AND acked_at IS NULL LIMIT 1").fetchone() is None:
        return None  # the common case between steps, answered without a write transaction
    with transaction(con):
        row = con.execute("SELECT * FROM controls WHERE taken_at IS NULL AND acked_at IS NULL ORDER BY id"
                          " LIMIT 1").fetchone()
        if row is None:
            return None
        con.execute("UPDATE controls SET taken_at = ?, taken_by = ? WHERE id = ?", (time.time(), taker, row["id"]))
    return Request(row["id"], Action(row["action"]), row["who"], row["reason"])


def answer(con: sqlite3.Connection, request_id: int, result: str, effect: Effect = Effect.NOTHING) -> bool:
    """Record what was done; False if the request already had an answer (e.g. it expired first)."""
    cur = con.execute("UPDATE controls SET acked_at = ?, result = ?, effect = ? WHERE id = ? AND acked_at IS NULL",
                      (time.time(), result, effect.value, request_id))
    return cur.rowcount == 1


def result_of(con: sqlite3.Connection, request_id: int) -> tuple[str | None, bool]:
    """(the answer or None, whether someone has taken it)."""
    row = con.execute("SELECT result, acked_at, taken_at FROM controls WHERE id = ?", (request_id,)).fetchone()
    if row is None:
        return None, False
    return (row["result"] if row["acked_at"] is not None else None), row["taken_at"] is not None


def wait(con: sqlite3.Connection, request_id: int, timeout: float, taken_grace: float = 600.0) -> str | None:
    """The answer to a request, or None if nobody took it within `timeout` seconds (it is then expired, so a
    daemon started later never acts on a request nobody waits for). A request already taken is being acted on
    (a checkpoint may take a while): it is waited for up to `taken_grace` seconds more."""
    deadline = time.monotonic() + timeout
    while True:
        result, taken = result_of(con, request_id)
        if result is not None:
            return result
        now = time.monotonic()
        if now >= deadline + (taken_grace if taken else 0.0):
            if expire(con, request_id):
                return None
            continue  # answered or taken at the last moment: read it again
        time.sleep(0.05)


def expire(con: sqlite3.Connection, request_id: int, text: str = EXPIRED) -> bool:
    """Mark an untaken request expired (compare-and-set: never overwrites an answer, never a taken request)."""
    cur = con.execute("UPDATE controls SET acked_at = ?, result = ?, effect = ? WHERE id = ? AND acked_at IS NULL"
                      " AND taken_at IS NULL", (time.time(), text, Effect.NOTHING.value, request_id))
    return cur.rowcount == 1


def pending(con: sqlite3.Connection) -> list[Request]:
    """Requests nobody has taken or answered yet, oldest first."""
    rows = con.execute("SELECT * FROM controls WHERE taken_at IS NULL AND acked_at IS NULL ORDER BY id").fetchall()
    return [Request(r["id"], Action(r["action"]), r["who"], r["reason"]) for r in rows]


def orphaned(con: sqlite3.Connection, note: str) -> int:
    """Answer requests taken by a process that died before answering (the daemon calls this on start)."""
    cur = con.execute("UPDATE controls SET acked_at = ?, result = ?, effect = ? WHERE taken_at IS NOT NULL"
                      " AND acked_at IS NULL", (time.time(), note, Effect.NOTHING.value))
    return cur.rowcount


def paused(con: sqlite3.Connection) -> bool:
    """Whether the last pause/resume that took effect was a pause (the daemon holds between jobs too)."""
    return held_by(con) is not None


def held_by(con: sqlite3.Connection) -> str | None:
    """Who holds the queue (a person's pause or "eval.gate"), or None if it is not paused."""
    row = con.execute("SELECT effect, who FROM controls WHERE effect IN ('hold', 'go on') ORDER BY acked_at DESC,"
                      " id DESC LIMIT 1").fetchone()
    return row["who"] if row and row["effect"] == Effect.HOLD.value else None


def hold(con: sqlite3.Connection, who: str, why: str) -> None:
    """Hold the queue without a person's request (eval.gate): a pause that has taken effect, so every daemon
    started later is paused too, until `conveyor resume`."""
    _acted(con, Action.PAUSE, who, why, why, Effect.HOLD)


def release(con: sqlite3.Connection, who: str) -> str:
    """`conveyor resume` with no daemon running: the queue's pause is lifted for the next daemon."""
    _acted(con, Action.RESUME, who, None, "resumed (no daemon was running)", Effect.GO_ON)
    return "the queue is no longer paused; the next `conveyor run` or `conveyor train` trains what is waiting"


def _acted(con: sqlite3.Connection, action: Action, who: str, reason: str | None, result: str, effect: Effect) -> None:
    """A request asked, taken and answered at once by `who`: its effect holds from now on (see paused)."""
    now = time.time()
    con.execute("INSERT INTO controls (action, who, reason, requested_at, taken_at, taken_by, acked_at, result,"
                " effect) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (action.value, who, reason, now, now, who, now, result, effect.value))


def pause_text(con: sqlite3.Connection) -> str | None:
    """Who paused the queue, when and why, with how to go on; None if it is not paused. The one message every
    command that would wait on a paused queue prints."""
    row = con.execute("SELECT effect, who, reason, acked_at FROM controls WHERE effect IN ('hold', 'go on')"
                      " ORDER BY acked_at DESC, id DESC LIMIT 1").fetchone()
    if row is None or row["effect"] != Effect.HOLD.value:
        return None
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row["acked_at"]))
    why = f": {row['reason']}" if row["reason"] else ""
    return (f"the queue is paused (by {row['who']} at {when}{why}); no job starts until `conveyor resume`, which "
            "works with or without a daemon running")
