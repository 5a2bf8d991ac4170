"""An attempt's folder on the shared workspace (runs/.attempts/<name>/) and what each host does with it: the
agent proves its host sees the workspace (the attempt's nonce, at the same path), every rank beats there and ends
itself once the folder is gone (the daemon ended the attempt: the fence for ranks on hosts the daemon cannot
signal), and rank 0 records how the job ended. launch.py starts and watches attempts.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .. import testhooks

ATTEMPTS = ".attempts"  # under runs/: one folder per attempt, removed when it ends
NOT_SHARED = 78  # an agent's or probe's exit code: its host does not see the workspace (EX_CONFIG)
ATTEMPT_ENV = "CONVEYOR_ATTEMPT"  # the attempt folder, in every agent and rank
NONCE_ENV = "CONVEYOR_NONCE"
BEAT_ENV = "CONVEYOR_BEAT_SECONDS"
HOST_ENV = "CONVEYOR_HOST"  # the host's name as distributed.hosts gives it, for messages


def write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError:
        return None


@dataclass
class Attempt:
    """runs/.attempts/<name>/: nonce (written last: the folder is whole), config.json, agents.json, beat-<rank>,
    outcome (rank 0's exit code). Removed when the attempt ends; its ranks then fence themselves off."""

    folder: Path
    nonce: str

    @classmethod
    def create(cls, root: Path, job_id: int, config: dict) -> "Attempt":
        folder = Path(root) / "runs" / ATTEMPTS / f"job-{job_id}-{secrets.token_hex(4)}"
        folder.mkdir(parents=True)
        attempt = cls(folder, secrets.token_hex(16))
        write(folder / "config.json", json.dumps(config))
        write(folder / "nonce", attempt.nonce)
        return attempt

    @property
    def workspace(self) -> Path:
        return self.folder.parents[2]

    def beats(self) -> dict[int, str]:
        found = {}
        for path in self.folder.glob("beat-*"):
            text = _read(path)
            if text is not None and path.name[5:].isdigit():
                found[int(path.name[5:])] = text
        return found

    def outcome(self) -> int | None:
        text = _read(self.folder / "outcome")
        return int(text) if text and text.lstrip("-").isdigit() else None

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def clear_attempts(root: Path) -> None:
    """At the daemon's start: an earlier daemon's attempts are over (their ranks elsewhere then exit by themselves)."""
    shutil.rmtree(Path(root) / "runs" / ATTEMPTS, ignore_errors=True)


def shared_problem(folder: Path, nonce: str, host: str, node: int | None = None, wait: float = 3.0) -> str | None:
    """Whether this host sees the attempt's nonce where the daemon wrote it (None) or what to tell the person.
    A few seconds of retries allow for a network file system's attribute cache."""
    path = testhooks.seen_path(folder / "nonce", node)
    deadline = time.monotonic() + wait
    while (found := _read(path)) != nonce and time.monotonic() < deadline:
        time.sleep(0.2)
    if found == nonce:
        return None
    ws = folder.parents[2]
    what = "is missing" if found is None else "holds another attempt's nonce"
    who = f"host {host}" + (f" (node {node})" if node is not None else "")
    return (f"{who} does not see the workspace {ws} at the same path: {folder / 'nonce'}, "
            f"written by the daemon for this attempt, {what} there. Every host must see the workspace at the same "
            f"path: mount it at {ws} on {host} (NFS, Lustre, a cloud file system)")


# The ranks' side ----------------------------------------------------------------------------------------------
def join_attempt() -> None:
    """In a rank an attempt's agent started (no-op otherwise): beat in the attempt folder, and end this process
    as soon as the attempt is over (its nonce gone or changed: the daemon ended it, or this host lost sight of the
    workspace)."""
    folder = os.environ.get(ATTEMPT_ENV)
    if not folder:
        return
    rank = int(os.environ.get("RANK", "0"))
    period = float(os.environ.get(BEAT_ENV, "5"))
    threading.Thread(target=_beat, args=(Path(folder), os.environ.get(NONCE_ENV, ""), rank, period),
                     name="conveyor-beat", daemon=True).start()


def _beat(folder: Path, nonce: str, rank: int, period: float) -> None:
    host = os.environ.get(HOST_ENV, socket.gethostname())
    for n in range(1, sys.maxsize):
        if _read(folder / "nonce") != nonce:
            print(f"conveyor: rank {rank} on {host}: attempt {folder.name} is over (ended by the daemon); exiting",
                  file=sys.stderr, flush=True)
            os._exit(1)
        try:
            write(folder / f"beat-{rank}", f"{n} {host} {os.getpid()}")
        except OSError:
            pass  # a full or unreachable disk: the daemon notices the silence
        time.sleep(period)


def record_outcome(code: int) -> None:
    """Rank 0 of an attempt: how the job ended (report.EXIT_CODES), for the daemon (torchrun's own exit code
    says only that some rank did not exit 0)."""
    folder = os.environ.get(ATTEMPT_ENV)
    if folder and os.environ.get("RANK", "0") == "0":
        try:
            write(Path(folder) / "outcome", str(code))
        except OSError:
            pass  # the daemon then reads torchrun's exit code


