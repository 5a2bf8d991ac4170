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

from .fingerprint import fsync_dir

FOLDER = ".pending"

# kind -> (committed(ws, data) -> bool, finish(ws, data) -> message, undo(ws, data) -> message)
_KINDS: dict[str, tuple[Callable, Callable, Callable]] = {}


def kind(name: str, committed: Callable, finish: Callable, undo: Callable) -> None:
    """Register how to tell whether an intent of this kind committed, and how to finish or undo it."""
    _KINDS[name] = (committed, finish, undo)



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
    from . import export, queue, rollback  # noqa: F401  (each registers its kind)

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
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                data = None  # cut off while being written: its command had not begun
            if isinstance(data, dict) and data.get("kind") in _KINDS and (text := _settle(ws, data)):
                said.append(text)
            os.unlink(path)
        finally:
            os.close(fd)
    if said:
        from .store import log_event

        for text in said:
            log_event(ws.db, "warning", "message", text)
    return said


def _settle(ws, data: dict) -> str | None:
    committed, finish, undo = _KINDS[data["kind"]]
    return finish(ws, data) if committed(ws, data) else undo(ws, data)


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
