"""The daemon lock: one daemon per workspace. The daemon holds it (`Lock`); `status`, the controls and every
command that must know whether a daemon runs read it (`daemon_pid`).

Liveness is an flock on daemon.lock, never a PID alone: the OS frees the lock when the process dies, so a dead
daemon never blocks and a reused PID never looks alive. The file holds the PID for messages only.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from typing import Callable

from ..errors import ConveyorError

LOCK_FILE = "daemon.lock"


class Lock:
    """Held by the daemon for as long as it runs (`with Lock(ws): ...`)."""

    def __init__(self, ws):
        self.path = ws.root / LOCK_FILE
        self.fd: int | None = None

    def __enter__(self) -> "Lock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + 1.0  # `status` probes the lock for an instant; that is not a daemon
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                holder = _holder(fd)
                os.close(fd)
                raise ConveyorError(f"another conveyor daemon (pid {holder}) is running in this workspace; "
                                    "stop it with `conveyor stop`, or use another workspace") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)
            self.fd = None


def daemon_pid(ws) -> int | None:
    """PID of the live daemon, if any (-1 if its lock is held but the file names none)."""
    try:
        fd = os.open(ws.root / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:  # held: a daemon is alive
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


@contextlib.contextmanager
def hold(ws, refusal: Callable[[str], str]):
    """Hold the daemon's lock for a command that needs the workspace to itself (`doctor --repair`): no daemon has
    the database open, none starts. Refused at once while a daemon runs, with refusal(its pid) as the message."""
    fd = os.open(ws.root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConveyorError(refusal(_holder(fd))) from None
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def serial(ws, name: str):
    """One command of a kind at a time in the workspace (`rollback`): a second one waits here until the first has
    finished (the OS frees the lock of one that died)."""
    fd = os.open(ws.root / f".{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _holder(fd: int) -> str:
    return os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
