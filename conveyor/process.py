"""Worker processes: spawned ahead of time with the training stack imported (warm), handed one job, waited
for, and stopped as a process group. Everything about processes lives here; the worker itself does not know
whether it runs in the daemon's process or its own.

A worker must never outlive its daemon (a killed daemon would leave it training unowned): the child asks the
kernel for SIGKILL when its parent dies (PR_SET_PDEATHSIG, set by the child itself after exec, never in a
preexec_fn, which can deadlock while the daemon's watchdog and dashboard threads run). torchrun is started
through the same guard (`python -m conveyor.process PARENT_PID -- argv...` sets it, then execs).
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys

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


def launch_distributed(workspace: str, job_id: int, claim: str, config: dict, nproc: int) -> WorkerProcess:
    """torchrun starts nproc worker processes for the job (data parallel); conveyor does not reimplement it."""
    env = {**_env(), "CONVEYOR_CONFIG_JSON": json.dumps(config)}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                "-m", "conveyor", "-w", workspace, "worker", "--job", str(job_id), "--claim", claim]
    argv = [sys.executable, "-m", "conveyor.process", str(os.getpid()), "--", *torchrun]
    return WorkerProcess(subprocess.Popen(argv, env=env, start_new_session=True), warm=False)


def _guard_and_exec(argv: list[str]) -> None:
    """`python -m conveyor.process PARENT_PID -- argv...`: die with the parent, then become argv (the guard
    survives exec); torchrun's ranks in turn guard themselves against torchrun."""
    parent, sep, *command = argv
    if sep != "--" or not command:
        sys.exit("usage: python -m conveyor.process PARENT_PID -- COMMAND...")
    os.environ[PARENT_ENV] = parent
    die_with_parent()
    os.environ[PARENT_ENV] = str(os.getpid())  # the ranks' parent is this process, once it has exec'd
    os.execv(command[0], command)


if __name__ == "__main__":
    _guard_and_exec(sys.argv[1:])
