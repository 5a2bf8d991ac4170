"""How a worker ends and what it tells: one Outcome, which is also its process's exit code, and the reporter its
messages and progress go to (the CLI's prints them with a progress bar; a worker process's as plain lines)."""

from __future__ import annotations

import sys
from enum import Enum

from ..store.jobs import Job, finished_text, started_text


class Outcome(str, Enum):
    DONE = "done"
    STOPPED = "stopped"  # a warm stop: the job is interrupted (or back in the queue) and the daemon ends
    SKIPPED = "skipped"
    FAILED = "failed"  # the job cannot be trained (bad data, 0 steps); it is marked failed with the reason
    CHECKPOINT_ERROR = "checkpoint error"  # the disk, not the job: the daemon pauses
    OUT_OF_MEMORY = "out of memory"  # the settings, not the job: it stays at its last checkpoint, the daemon pauses
    NOT_FINITE = "not finite"  # the settings, not the job: a nan/inf loss; it stays at its last checkpoint, pauses
    DISK_FULL = "disk full"  # the machine, not the job: it stays at its last checkpoint, the daemon waits for room
    NOT_MINE = "not mine"  # the job was no longer under this worker's claim; nothing was trained

    @property
    def code(self) -> int:
        return EXIT_CODES[self]

    @classmethod
    def from_code(cls, code: int) -> "Outcome | None":
        """The outcome a worker process exited with; None if it died (a signal, a traceback)."""
        return next((o for o, c in EXIT_CODES.items() if c == code), None)


EXIT_CODES = {Outcome.DONE: 0, Outcome.FAILED: 3, Outcome.CHECKPOINT_ERROR: 4, Outcome.STOPPED: 5,
              Outcome.SKIPPED: 6, Outcome.NOT_MINE: 7, Outcome.OUT_OF_MEMORY: 8, Outcome.DISK_FULL: 9,
              Outcome.NOT_FINITE: 10}


class Reporter:
    """Where messages and progress go; the CLI prints them, the daemon logs them."""

    def message(self, level: str, text: str) -> None:
        pass

    def job_started(self, job: Job) -> None:
        pass

    def progress(self, job: Job, done: int, planned: int, loss: float | None, examples_per_s: float) -> None:
        pass

    def job_finished(self, job: Job) -> None:
        pass


class PrintedReporter(Reporter):
    """A worker process's reporter: messages and job lines as plain lines on its stdout and stderr, which the
    daemon's terminal shows (the words of the CLI's reporter, without its progress bar)."""

    def message(self, level: str, text: str) -> None:
        print(text if level == "info" else f"{level}: {text}", file=sys.stdout if level == "info" else sys.stderr,
              flush=True)

    def job_started(self, job: Job) -> None:
        print(started_text(job), flush=True)

    def job_finished(self, job: Job) -> None:
        print(finished_text(job), flush=True)
