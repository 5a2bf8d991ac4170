"""Commands that change several things (rollback, queue remove, export) are crash-atomic: each writes its files
to temporary places first, commits its database change in one transaction, then moves the files into place. An
*intent* (a small JSON file in the workspace's `.pending/`, held under an flock while its command runs) names
those temporary places, so that a command cut off at any point (SIGKILL, power loss) is finished or undone by
the next command that looks (`recover`): finished when its transaction committed, undone when it did not. The
flock tells a live command from a dead one (the OS frees it when the process dies; a reused PID is not alive).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

from ..fingerprint import fsync_dir
from .database import log_event

FOLDER = ".pending"
# The kinds of intent (the commands that record one); how each is finished or undone is KINDS, at the end.
EXPORT = "export"
REMOVE = "queue remove"
ROLLBACK = "rollback"
REMOVED = "removed from the queue"  # how a removed job's error begins: the mark that `queue remove` committed


@contextlib.contextmanager
def intent(ws, name: str, **data):
    """Record what a multi-step command is about to do (flushed before it does anything), hold it while the
    command runs, and remove it when the command returns or raises (after undoing what a raise left)."""
    folder = ws.root / FOLDER
    folder.mkdir(exist_ok=True)
    path = folder / f"{name}-{os.getpid()}-{time.monotonic_ns()}.json"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, json.dumps({"kind": name, "pid": os.getpid(), "at": time.time(), **data}).encode())
        os.fsync(fd)
        fsync_dir(folder)
        yield data
    except BaseException:
        with contextlib.suppress(Exception):
            _settle(ws, {"kind": name, **data})
        raise
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


def recover(ws) -> list[str]:
    """Finish or undo every intent whose command died; what was done, in words (also logged)."""
    folder = ws.root / FOLDER
    if not folder.is_dir():
        return []
    said = []
    for path in sorted(folder.glob("*.json")):
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            continue  # its command just finished
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its command is still running
            if os.fstat(fd).st_nlink == 0:
                continue  # its command finished between our open and our lock: it removed the file, then unlocked
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                data = None  # cut off while being written: its command had not begun
            if isinstance(data, dict) and data.get("kind") in KINDS and (text := _settle(ws, data)):
                said.append(text)
            os.unlink(path)
        finally:
            os.close(fd)
    if said:
        for text in said:
            log_event(ws.db, "warning", "message", text)
    return said


def _settle(ws, data: dict) -> str | None:
    committed, finished, undone = KINDS[data["kind"]]
    return finished(ws, data) if committed(ws, data) else undone(ws, data)


def finish(ws, kind: str, data: dict) -> str:
    """Finish a command's intent once its transaction committed (what `recover` does for one cut off)."""
    return KINDS[kind][1](ws, data)


def remove_tree(path: str | Path | None) -> bool:
    """Remove a temporary folder or file if it is there; whether it was."""
    if not path:
        return False
    path = Path(path)
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
        return True
    if path.exists():
        path.unlink()
        return True
    return False


def move_into_place(tmp: str | Path | None, final: str | Path) -> bool:
    """Rename a temporary folder or file to its final name unless that is already there; whether it moved."""
    if not tmp or not Path(tmp).exists() or Path(final).exists():
        return False
    os.rename(tmp, final)
    fsync_dir(Path(final).parent)
    return True


# Each kind: committed(ws, data) -> whether its transaction went through; then finish or undo -> what was done.
def _export_undo(ws, data: dict) -> str | None:
    if not remove_tree(data["tmp"]):
        return None
    return f"removed {data['tmp']}, left by an export to {data['out']} that was cut off; export again"


def _remove_committed(ws, data: dict) -> bool:
    row = ws.db.execute("SELECT state, error FROM jobs WHERE id = ?", (data["job"],)).fetchone()
    return row is not None and row["state"] == "skipped" and (row["error"] or "").startswith(REMOVED)


def _remove_finish(ws, data: dict) -> str:
    move_into_place(data["tmp"], data["kept"])
    move_into_place(data["tmp_reason"], data["reason"])
    return f"job {data['job']} was removed from the queue by a command cut off; its file is kept at {data['kept']}"


def _remove_undo(ws, data: dict) -> str:
    remove_tree(data["tmp"])
    remove_tree(data["tmp_reason"])
    return f"`conveyor queue remove {data['job']}` was cut off before it took effect; the job is still waiting"


def _rollback_committed(ws, data: dict) -> bool:
    """Whether an interrupted rollback's transaction went through: its run is recorded, branching as it said."""
    row = ws.db.execute("SELECT parent_run, parent_version FROM runs WHERE id = ?", (data["run"],)).fetchone()
    return row is not None and (row["parent_run"], row["parent_version"]) == (data["parent"], data["version_id"])


def _rollback_finish(ws, data: dict) -> str:
    move_into_place(data["tmp"], data["final"])
    return f"a rollback cut off after it was recorded is finished: {data['run']}'s first checkpoint is in place"


def _rollback_undo(ws, data: dict) -> str:
    remove_tree(data["tmp"])
    return (f"a rollback cut off before it was recorded left nothing behind (its copy for {data['run']} was "
            "removed); run it again")


KINDS: dict[str, tuple[Callable, Callable, Callable]] = {
    # An export's rename is its commit: after it, nothing is left to do; before it, the temporary folder goes.
    EXPORT: (lambda ws, data: False, _export_undo, _export_undo),
    REMOVE: (_remove_committed, _remove_finish, _remove_undo),
    ROLLBACK: (_rollback_committed, _rollback_finish, _rollback_undo),
}
