"""Test hooks, read from the environment: crash the process at a named point, or make a person's request
arrive at a given step. They let tests walk every path deterministically; unset, they cost one dict lookup.

CONVEYOR_FAILPOINT="<name>:<step>[:<marker file>]" SIGKILLs this process at that point (a power cut); with a
marker file only once. Names: step, checkpoint-write, checkpoint-renamed. Two names raise instead, right after
that step (before its checkpoint): oom raises torch.OutOfMemoryError (as CUDA does), host-oom a MemoryError.
CONVEYOR_TEST_STEP_SECONDS="<seconds>" makes every optimizer step last at least that long (a sleep after it), so
that a test killing processes from outside can land between steps of the tiny model, whose steps take ~20 ms.
CONVEYOR_TEST_REQUESTS="<action>@<step>[,...]" files a control request (pause, resume, stop, skip) right
after that global step, as `conveyor <action>` would.
CONVEYOR_TEST_HOLD="<name>:<step>:<file>" holds this process at that failpoint: it writes <file>.reached, then waits
(60 s at most) until <file> exists; so a test can start a second command while the first is mid-way.
CONVEYOR_TEST_LOCK_WAIT="<seconds>" shortens how long a command waits on a database another process is writing.
CONVEYOR_TEST_NOT_SHARED="<node rank>" makes that node's agent miss the attempt's nonce (launch.py), as a host that
does not mount the workspace would.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def _due(name: str, step: int) -> bool:
    spec = os.environ.get("CONVEYOR_FAILPOINT", "")
    if not spec:
        return False
    parts = spec.split(":", 2)
    if parts[:2] != [name, str(step)]:
        return False
    if len(parts) == 3:
        marker = Path(parts[2])
        if marker.exists():
            return False
        marker.write_text("fired\n")
    return True


def failpoint(name: str, step: int) -> None:
    if _due(name, step):
        os.kill(os.getpid(), signal.SIGKILL)
    hold = os.environ.get("CONVEYOR_TEST_HOLD", "").split(":", 2)
    if hold[:2] == [name, str(step)] and len(hold) == 3:
        release = Path(hold[2])
        Path(f"{release}.reached").write_text(f"{os.getpid()}\n")
        deadline = time.monotonic() + 60
        while not release.exists() and time.monotonic() < deadline:
            time.sleep(0.01)


def after_step(step: int) -> None:
    pace = os.environ.get("CONVEYOR_TEST_STEP_SECONDS")
    if pace:
        time.sleep(float(pace))
    failpoint("step", step)
    if _due("oom", step):
        import torch

        oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
        raise oom(f"CUDA out of memory. Tried to allocate 2.00 GiB (test failpoint oom:{step})")
    if _due("host-oom", step):
        raise MemoryError(f"test failpoint host-oom:{step}")


def lock_wait(seconds: float) -> float:
    """How long a database statement waits for another's write: CONVEYOR_TEST_LOCK_WAIT seconds in tests."""
    return float(os.environ.get("CONVEYOR_TEST_LOCK_WAIT", seconds))


def requests_due(step: int) -> list[str]:
    """Control actions a test asked to arrive right after this global step."""
    spec = os.environ.get("CONVEYOR_TEST_REQUESTS", "")
    due = []
    for item in filter(None, spec.split(",")):
        action, _, at = item.partition("@")
        if at.isdigit() and int(at) == step:
            due.append(action)
    return due


def fill_disk(name: str, step: int, db: Path | None = None) -> None:
    """CONVEYOR_TEST_FILL="<name>:<step>:<filler file>" fills the file system of the filler file to its last byte
    at that point (once: `<filler file>.fired` marks it), so that the next real write there fails with
    ENOSPC, as on a full disk. Names: checkpoint (before a checkpoint's files are written), tokenized (before a
    job's tokenized arrays are written), db (before the worker records a step; the WAL is truncated first so that
    the database must grow)."""
    spec = os.environ.get("CONVEYOR_TEST_FILL", "")
    parts = spec.split(":", 2)
    marker = Path(parts[2] + ".fired") if len(parts) == 3 else None
    if marker is None or parts[:2] != [name, str(step)] or marker.exists():
        return
    marker.write_text("fired\n")
    if db is not None:
        _truncate_wal(db)
    block = b"\0" * (1 << 20)
    with open(parts[2], "wb", buffering=0) as f:
        while block:
            try:
                f.write(block)
            except OSError:
                block = block[: len(block) // 2]  # down to the last byte the file system has
    os.sync()


def _truncate_wal(db: Path) -> None:
    import sqlite3

    if db.is_file():
        con = sqlite3.connect(db, timeout=30)
        try:
            con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            con.close()


def seen_path(path: Path, node: int | None) -> Path:
    """CONVEYOR_TEST_NOT_SHARED="<node rank>": that node's agent looks for the workspace's files under another root,
    as a host that does not mount the workspace at the same path would."""
    if node is not None and os.environ.get("CONVEYOR_TEST_NOT_SHARED") == str(node):
        return Path("/nonexistent-mount") / path.relative_to(path.anchor)
    return path
