"""Faults of the machine, not of a job: a full disk and a damaged state database. One place recognises them (from
an OSError, an SQLite error, wherever the write happened) and says what they mean and what to do, for the daemon,
the worker and the CLI alike. Neither is ever a traceback: a full disk pauses the queue, a damaged database stops
the command with the file named and the fix.
"""

from __future__ import annotations

import errno
import os
import shutil
import sqlite3
from pathlib import Path

from .errors import ConveyorError

_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
_FULL_SQLITE = {sqlite3.SQLITE_FULL}
_DAMAGED_SQLITE = {sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB, getattr(sqlite3, "SQLITE_CORRUPT_INDEX", -1),
                   getattr(sqlite3, "SQLITE_CORRUPT_SEQUENCE", -1), getattr(sqlite3, "SQLITE_CORRUPT_VTAB", -1)}


class DiskFull(ConveyorError):
    """A write failed for lack of space (a checkpoint, tokenized data, the database, the log)."""


class DatabaseDamaged(ConveyorError):
    """conveyor.db is unreadable, cut short or does not match the runs on disk."""


def _causes(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def is_disk_full(e: BaseException) -> bool:
    """Whether `e` (or what caused it) is a write that failed for lack of space."""
    for x in _causes(e):
        if isinstance(x, DiskFull):
            return True
        if isinstance(x, OSError) and x.errno in _FULL_ERRNOS:
            return True
        if isinstance(x, sqlite3.Error) and (getattr(x, "sqlite_errorcode", None) in _FULL_SQLITE
                                             or "database or disk is full" in str(x)):
            return True
    return False


# A lock, a constraint a race broke (two commands inserting the same id), a misuse: the file itself is whole.
_NOT_DAMAGE = (sqlite3.OperationalError, sqlite3.IntegrityError, sqlite3.ProgrammingError, sqlite3.InterfaceError)


def is_damaged_database(e: BaseException) -> bool:
    """Whether `e` says the database file itself is damaged (not a lock or a full disk)."""
    for x in _causes(e):
        if isinstance(x, DatabaseDamaged):
            return True
        if isinstance(x, sqlite3.DatabaseError) and not isinstance(x, _NOT_DAMAGE) and not is_disk_full(x):
            return True  # DatabaseError proper: "file is not a database", "database disk image is malformed"
        if isinstance(x, sqlite3.Error) and getattr(x, "sqlite_errorcode", None) in _DAMAGED_SQLITE:
            return True
    return False


def free_mb(folder: Path) -> float:
    try:
        return shutil.disk_usage(folder).free / 1e6
    except OSError:
        return 0.0


def disk_full_message(root: Path, what: str = "a write", need_bytes: int | None = None) -> str:
    need = f"; about {need_bytes / 1e6:.0f} MB more are needed" if need_bytes else ""
    return (f"disk full: {what} in {root} failed ({free_mb(root):.1f} MB free{need}). Nothing trained is lost: "
            "the newest checkpoint is intact and the job keeps its place. Free some space; a running daemon "
            "resumes by itself once there is room (or `conveyor resume`)")


REBUILDS = "rebuilds the runs, versions and jobs from the checkpoint manifests, saying what it could not rebuild"
REPAIR = f"`conveyor doctor --repair` moves it aside (nothing is deleted) and {REBUILDS}"
UNTOUCHED = "Nothing under runs/ or data/ was touched: the checkpoints hold the weights and positions"


def database_message(path: Path, e: BaseException | str | None = None) -> str:
    """conveyor.db cannot be read: not a database, cut short, or a page that fails its check (`e` says which)."""
    found = f" ({e})" if e else ""
    return f"the state database {path} is damaged{found}. {UNTOUCHED}. {REPAIR}"


def database_missing_message(path: Path, found: list[str]) -> str:
    """conveyor.db is gone while runs/ holds checkpoints: a new empty one would train over them."""
    return (f"the state database {path} is missing, but {'; '.join(found)}: it was deleted or moved. {UNTOUCHED}, "
            f"and no new database was made. Put it back (with its -wal file) if you have it; otherwise "
            f"`conveyor doctor --repair` {REBUILDS}")


def database_mismatch_message(path: Path, found: list[str]) -> str:
    """conveyor.db is readable but disagrees with the runs on disk, so nothing may train on it."""
    return (f"the state database {path} does not match the runs on disk: {'; '.join(found)}. It was deleted, "
            f"replaced or lost its last writes (a deleted {path.name}-wal loses them), so nothing trains on it. "
            f"{UNTOUCHED}. {REPAIR}")


def explain(e: BaseException, root: Path) -> ConveyorError | None:
    """The machine fault behind `e`, as a message a person can act on; None if `e` is not one."""
    if isinstance(e, (DiskFull, DatabaseDamaged)):
        return e
    if is_disk_full(e):
        return DiskFull(disk_full_message(root))
    if is_damaged_database(e):
        return DatabaseDamaged(database_message(root / "conveyor.db", e))
    if is_locked(e):
        return DatabaseLocked(locked_message(root / "conveyor.db"))
    return None


class DatabaseLocked(ConveyorError):
    """Another process held a write on conveyor.db longer than a command waits (30 s)."""


def is_locked(e: BaseException) -> bool:
    return any(isinstance(x, sqlite3.OperationalError) and "locked" in str(x) for x in _causes(e))


def locked_message(db: Path) -> str:
    holders = [f"pid {pid} ({command})" for pid, command in holding(db)]
    who = ("; it is open in " + ", ".join(holders[:5]) + (f" and {len(holders) - 5} more" if len(holders) > 5 else "")
           ) if holders else ""
    return (f"{db} stayed locked by another process's write longer than conveyor waits (30 s), so this command "
            f"changed nothing{who}. Wait for that "
            "process to finish (a conveyor command holds a write for well under a second; a longer one is another "
            "program, or a `sqlite3` shell left inside a transaction), then run the command again")


def holding(path: Path) -> list[tuple[int, str]]:
    """The processes (but this one) that have `path` open, from /proc (Linux; elsewhere none are named)."""
    target, found = os.path.realpath(path), []
    for proc in Path("/proc").glob("[0-9]*"):
        pid = int(proc.name)
        if pid == os.getpid():
            continue
        try:
            if any(os.path.realpath(fd) == target for fd in (proc / "fd").iterdir()):
                command = " ".join((proc / "cmdline").read_bytes().decode(errors="replace").replace("\0", " ").split())
                found.append((pid, command[:80] or "?"))
        except OSError:  # gone meanwhile, or not ours to look at
            continue
    return found
