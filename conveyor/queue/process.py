"""Worker processes: spawned ahead of time with the training stack imported (warm), handed one job, waited
for, and stopped as a process group; and the worker process's own side (`run_worker`, behind the hidden
`conveyor worker` command). A job on several processes or hosts is started by launch.py through torchrun. The
worker itself does not know whether it runs in the daemon's process or its own.

A worker must never outlive its daemon (a killed daemon would leave it training unowned): the child asks the
kernel for SIGKILL when its parent dies (PR_SET_PDEATHSIG, set by the child itself after exec, never in a
preexec_fn, which can deadlock while the daemon's watchdog and dashboard threads run). Other commands are
started through the same guard (`python -m conveyor.queue.process PARENT_PID -- argv...` sets it, then execs);
launch.py's agents guard themselves.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from ..config import parse_config
from ..store.pending import recover
from ..store.workspace import Workspace
from .attempt import join_attempt, record_outcome

PARENT_ENV = "CONVEYOR_PARENT_PID"
PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In a child: get SIGKILL when the parent dies; exit at once if it already has (the race before prctl)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the daemon's process-group kill on exit still applies
        return
    expected = os.environ.get(PARENT_ENV)
    if expected and os.getppid() != int(expected):
        os._exit(1)


class WorkerProcess:
    """One worker process (a warm `conveyor worker` waiting on stdin, or a torchrun launch for one job)."""

    def __init__(self, popen: subprocess.Popen, warm: bool):
        self.popen = popen
        self.warm = warm

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self) -> int | None:
        return self.popen.poll()

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode

    def hand(self, job_id: int, claim: str, config: dict) -> None:
        """Give a warm worker its job; if it died while waiting, its exit code will say so."""
        try:
            self.popen.stdin.write(json.dumps({"job": job_id, "claim": claim, "config": config}) + "\n")
            self.popen.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        self.warm = False

    def warm_stop(self) -> None:
        """SIGTERM to the whole group: each process finishes its step, checkpoints and exits."""
        self._signal_group(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL to the whole group (torchrun's ranks included)."""
        self._signal_group(signal.SIGKILL)

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.popen.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def close(self, timeout: float = 30) -> None:
        """A warm worker gets EOF and exits without training; anything still alive after `timeout` is killed."""
        if self.popen.poll() is None and self.warm:
            try:
                self.popen.stdin.close()
            except OSError:
                pass
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self.popen.wait(timeout=30)


def _env() -> dict:
    return {**os.environ, PARENT_ENV: str(os.getpid())}


def spawn_warm(workspace: str) -> WorkerProcess:
    """A worker that imports the training stack now and waits on stdin for its job."""
    argv = [sys.executable, "-m", "conveyor", "-w", workspace, "worker"]
    # Its own session: a Ctrl-C in the terminal reaches only the daemon, which forwards a warm stop.
    popen = subprocess.Popen(argv, stdin=subprocess.PIPE, text=True, env=_env(), start_new_session=True)
    return WorkerProcess(popen, warm=True)


# The worker process's side ---------------------------------------------------------------------------------
def run_worker(root: Path, job: int | None, claim: str | None) -> int:
    """Train one claimed job in this process and return its exit code (report.EXIT_CODES).

    Without a job: a warm worker, which imports the training stack first and then reads {"job": N, "claim": C,
    "config": {...}} on stdin. Under torchrun (launch.py), ranks other than 0 follow rank 0's broadcast orders and
    read the workspace's files only: they never open the database."""
    die_with_parent()
    stopped: list[str] = []  # a warm stop can come at any moment, even while the worker is still starting up
    signal.signal(signal.SIGTERM, lambda *_: stopped.append("SIGTERM"))

    join_attempt()  # started by an attempt's agent: beat, and end with the attempt
    ws = Workspace.open(root)
    if os.environ.get("RANK", "0") == "0":
        recover(ws)  # a multi-step command cut off earlier is finished or undone, as by every command
    raw = os.environ.get("CONVEYOR_CONFIG_JSON")
    if job is None:
        order = wait_for_job()
        if order is None:
            return 0  # the daemon is shutting down
        job, claim, raw = order["job"], order["claim"], json.dumps(order["config"])
    from ..train import distributed  # torch: once the worker process has its job

    config = parse_config(json.loads(raw), "the daemon's settings") if raw else ws.config()
    distributed.init_from_env(config.distributed.backend)  # under torchrun: join the process group
    if not distributed.is_main():
        from ..train.ranks import follow  # the training stack: the worker process's alone

        follow(ws.root, config, distributed.world())
        return 0
    code = _train_as_rank_0(ws, config, job, claim or "", stopped)
    record_outcome(code)
    return code


def _train_as_rank_0(ws, config, job: int, claim: str, stopped: list[str]) -> int:
    from ..train.report import PrintedReporter
    from ..train.worker import Worker  # the training stack: the worker process's alone

    w = Worker(ws, config, job, claim, PrintedReporter())
    signal.signal(signal.SIGTERM, lambda *_: setattr(w, "stop_reason", "SIGTERM"))
    w.stop_reason = w.stop_reason or (stopped[0] if stopped else None)  # one that came during start-up
    return w.run().code


def wait_for_job() -> dict | None:
    """A warm worker: import the training stack now, then read the job the daemon hands over (None: EOF)."""
    import gc
    import logging

    # bitsandbytes (imported by peft) warns at import that an optional hub-downloaded CPU kernel is missing.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import peft  # noqa: F401  (the slow imports happen here, before the job arrives)
    import transformers.trainer  # noqa: F401

    from ..train import trainer as _glue  # noqa: F401

    gc.freeze()  # the imported objects are permanent: spare them the full collection training starts with
    line = sys.stdin.readline()
    return json.loads(line) if line.strip() else None


def _guard_and_exec(argv: list[str]) -> None:
    """`python -m conveyor.queue.process PARENT_PID -- argv...`: die with the parent, then become argv (the guard
    survives exec); torchrun's ranks in turn guard themselves against torchrun."""
    if len(argv) < 3 or argv[1] != "--":
        sys.exit("usage: python -m conveyor.queue.process PARENT_PID -- COMMAND...")
    parent, _, *command = argv
    os.environ[PARENT_ENV] = parent
    die_with_parent()
    os.environ[PARENT_ENV] = str(os.getpid())  # the ranks' parent is this process, once it has exec'd
    os.execv(command[0], command)


if __name__ == "__main__":
    _guard_and_exec(sys.argv[1:])
