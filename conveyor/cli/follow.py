"""`conveyor train` and `run --drain`: how a foreground training command ends, as an exit code, and what it does
beside a daemon that already runs in the workspace (it hands the files to that daemon and follows their jobs to
the end, as if it trained them itself; it never queues a file and then fails).

Exit codes: 0 every job trained; 1 a job failed, was rejected or skipped (or a pause, eval.gate or a full disk
ended the drain); 75 stopped by `conveyor stop` with jobs still waiting (run again to go on: EX_TEMPFAIL); 130
interrupted by Ctrl-C (SIGINT); 143 by SIGTERM. A cut job keeps its place and resumes on the next start.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

from ..store import jobs
from ..store.jobs import JobState
from ..store.lock import daemon_pid
from ..store.workspace import Workspace
from .console import console, err

INTERRUPTED = {"SIGINT": 128 + signal.SIGINT, "SIGTERM": 128 + signal.SIGTERM}
STOPPED = 75  # sysexits' EX_TEMPFAIL: not done, run again to go on
FINAL = (JobState.DONE, JobState.FAILED, JobState.SKIPPED, JobState.REJECTED)


def drain_code(ws: Workspace, ok: bool, stop_reason: str | None) -> int:
    """The exit code of a drain that returned `ok`: interrupted by a signal, stopped with work left, or done."""
    if stop_reason in INTERRUPTED:
        left = len(jobs.waiting(ws.db))
        err.print(f"interrupted ({stop_reason}): {left} job(s) wait; `conveyor run --drain` goes on where it stopped",
                  style="yellow", markup=False)
        return INTERRUPTED[stop_reason]
    left = jobs.waiting(ws.db)
    if stop_reason and left:
        err.print(f"stopped ({stop_reason}) with {len(left)} job(s) waiting; `conveyor run --drain` trains them",
                  style="yellow", markup=False)
        return STOPPED if ok and stop_reason.startswith("stop requested") else 1
    return 0 if ok else 1


def follow(ws: Workspace, ids: list[int], pid: int, drain_here: Callable[[], int | None]) -> int:
    """Follow jobs that a running daemon trains until each ends; the exit code `train` would have given. If the
    daemon stops first, what is left trains here (`drain_here`; None if another daemon took the workspace)."""
    console.print(f"a conveyor daemon (pid {pid}) runs in this workspace: it trains job(s) "
                  f"{', '.join(map(str, ids))}; following them to their end (Ctrl-C stops following, not the jobs)")
    said: dict[int, JobState] = {}
    try:
        while True:
            now = {i: jobs.get(ws.db, i) for i in ids}
            for job in now.values():
                if said.get(job.id) != job.state:
                    said[job.id] = job.state
                    _say(job)
            if all(j.state in FINAL for j in now.values()):
                return 0 if all(j.state == JobState.DONE for j in now.values()) else 1
            if daemon_pid(ws) is None:
                console.print("the daemon stopped before these jobs ended; training them here")
                code = drain_here()
                if code is not None:
                    return code if code else (0 if all(jobs.get(ws.db, i).state == JobState.DONE for i in ids)
                                              else 1)
            time.sleep(0.5)
    except KeyboardInterrupt:
        err.print("stopped following; the daemon goes on with the jobs (`conveyor status` shows them)",
                  style="yellow", markup=False)
        return INTERRUPTED["SIGINT"]


def _say(job: jobs.Job) -> None:
    if job.state == JobState.RUNNING:
        console.print(f"job {job.id} ({job.file}): training")
    elif job.state == JobState.DONE:
        console.print(f"job {job.id} ({job.file}): done, global steps {job.start_step}–{job.end_step}")
    elif job.state in FINAL:
        err.print(f"job {job.id} ({job.file}): {job.state.value}" + (f": {job.error}" if job.error else ""),
                  style="red", markup=False)
    elif job.state == JobState.INTERRUPTED:
        console.print(f"job {job.id} ({job.file}): stopped at its step {job.steps_done} of {job.planned_steps}; "
                      "it resumes there")
