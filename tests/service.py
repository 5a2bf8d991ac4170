"""A conveyor daemon running in the background of a test: started, watched and always cleaned up."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path


class Service:
    def __init__(self, ws: Path, *extra: str, env: dict | None = None):
        self.ws = ws
        self.log = open(ws / "daemon-test-output.txt", "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "conveyor", "-w", str(ws), "run", *extra], stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**(env or os.environ), "PYTHONUNBUFFERED": "1"})

    def query(self, sql: str, args=()) -> list:
        con = sqlite3.connect(self.ws / "conveyor.db", timeout=30)
        con.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in con.execute(sql, args)]
        except sqlite3.OperationalError:
            return []  # the daemon has not created its tables yet
        finally:
            con.close()

    def jobs(self) -> dict:
        return {r["file"] if r["file"] else r["id"]: r for r in self.query("SELECT * FROM jobs ORDER BY id")}

    def steps(self) -> int:
        rows = self.query("SELECT COALESCE(MAX(step), 0) AS s FROM audit")
        return rows[0]["s"] if rows else 0

    def wait(self, predicate, timeout: float = 120, what: str = "condition") -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if predicate():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited ({self.proc.returncode}) while waiting for {what}:\n"
                                     + self.output())
            time.sleep(0.1)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}:\n" + self.output())

    def ready(self) -> "Service":
        """Wait until the daemon holds its lock and its warm worker has imported the training stack."""
        self.wait(lambda: "watching" in self.output(), 60, "the daemon to start")
        time.sleep(0.5)
        return self

    def output(self) -> str:
        self.log.flush()
        return (self.ws / "daemon-test-output.txt").read_text()

    def messages(self) -> str:
        """Every message the daemon and its workers logged (the events table), one a line."""
        return "\n".join(r["message"] for r in self.query("SELECT message FROM events ORDER BY id"))

    def worker_pid(self, job_id: int) -> int | None:
        rows = self.query("SELECT message FROM events WHERE kind = 'worker' AND job_id = ? ORDER BY id DESC LIMIT 1",
                          (job_id,))
        return int(rows[0]["message"].split()[2]) if rows else None

    def stop(self) -> None:
        """Warm stop, then make sure nothing of it is left running."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)
        self.log.close()


@contextlib.contextmanager
def running(ws: Path, *extra: str):
    """A ready daemon for the workspace, stopped (and its processes gone) afterwards whatever happens."""
    svc = Service(ws, *extra).ready()
    try:
        yield svc
    finally:
        svc.stop()


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def process_running(pid: int) -> bool:
    """Whether the process exists and is not a zombie (a killed child nobody has reaped yet is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")
