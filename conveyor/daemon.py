"""The daemon: owns the queue. `Daemon.work(drain=False)` reads top to bottom: claim inbox files, act on
controls, check disk, train the next job (in a worker process, or in this process), record, repeat.

The first SIGTERM/SIGINT is a warm stop (the worker finishes its step, checkpoints, exits); a second one
stops at once. Run it with `conveyor run` (a long-running service) or `conveyor run --drain`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time

from . import checkpoints as ck
from . import controls, jobs, runs
from .config import Config
from .errors import ConveyorError
from .inbox import Inbox, file_finished
from .jobs import JobState
from .status import LOCK_FILE
from .store import log_event
from .training import DISK, FAILED, STOPPED, Reporter, Training
from .workspace import Workspace


class Daemon:
    def __init__(self, ws: Workspace, reporter: Reporter | None = None, isolate: bool = False, watch: bool = False):
        self.ws = ws
        self.db = ws.db
        self.reporter = reporter or Reporter()
        self.isolate = isolate  # one worker process per job (frees memory, survives worker crashes)
        self.watch = watch  # claim files dropped into inbox/
        self.stop_reason: str | None = None
        self.config: Config | None = None  # the last valid settings
        self.training: Training | None = None
        self.worker: subprocess.Popen | None = None
        self.paused = controls.paused(self.db)
        self._signals = 0
        self._inbox: Inbox | None = None
        self._warm: subprocess.Popen | None = None
        self._said: set[str] = set()

    # The work loop -----------------------------------------------------------------------------
    def work(self, drain: bool = False) -> bool:
        """Train queued jobs in order; False if any failed. drain=True returns once nothing is queued."""
        ok = True
        if self.isolate and self.reload_config() and self.config.distributed.nproc_per_node == 1:
            self._warm = self._spawn()
        with self._warm_stop_signals(), self._watching(), contextlib.closing(self):
            while self.stop_reason is None:
                self.claim()
                self.act_on_controls()
                job = None if self.paused else jobs.next_queued(self.db)
                if job is None:
                    if drain and not self.paused:
                        break
                    self.idle()
                    continue
                if not self.reload_config() or not self.enough_disk(job):
                    self.idle(seconds=5.0)
                    continue
                ok = self.train(job) and ok
        return ok

    def claim(self) -> None:
        if self._inbox is None:
            return
        for result in self._inbox.scan():
            for text in result.messages:
                self.say("warning", text)
            state = "rejected" if result.job.state == JobState.REJECTED else "queued"
            self.say("info" if state == "queued" else "error",
                     f"inbox: claimed {result.job.file} as job {result.job.id} ({state})")

    def act_on_controls(self) -> None:
        """Controls that arrive while no job is training."""
        for req in controls.pending(self.db):
            if req.action == controls.Action.PAUSE:
                self.paused = True
                controls.ack(self.db, req.id, "paused between jobs; no job starts until `conveyor resume`")
            elif req.action == controls.Action.RESUME:
                controls.ack(self.db, req.id, "resumed" if self.paused else "not paused")
                self.paused = False
            elif req.action == controls.Action.STOP:
                self.stop_reason = f"stop requested by {req.who}"
                controls.ack(self.db, req.id, "daemon stopped between jobs; queued jobs start on the next run")
            elif req.action == controls.Action.SKIP:
                controls.ack(self.db, req.id, "no job is training; nothing to skip (use `conveyor queue remove`)")

    def idle(self, seconds: float | None = None) -> None:
        """Wait for an inbox event, a control or a timeout; a settling file shortens the wait."""
        if seconds is None:
            settling = self._inbox is not None and self._inbox.settling()
            seconds = 0.1 if settling else (self.config.inbox.poll_seconds if self.config else 0.5)
        if self._inbox is not None:
            self._inbox.changed.wait(seconds)
        else:
            time.sleep(seconds)

    def reload_config(self) -> bool:
        """Re-read conveyor.toml between jobs; if it is invalid, keep the last valid settings and say why."""
        try:
            self.config = self.ws.config()
            self._said.discard("config")
        except ConveyorError as e:
            if self.config is None:
                raise
            self.say_once("config", "warning", f"{e}\nkeeping the last valid settings until this is fixed")
        return self.config is not None

    def enough_disk(self, job) -> bool:
        """Pause (not fail) when the next job's checkpoints would not fit; say the numbers."""
        run = runs.active(self.db)
        run_dir = self.ws.run_dir(run.id) if run else None
        per = ck.estimate_size(run_dir) if run_dir else 1 << 20
        need = ck.space_needed(run_dir, self.config.training.keep_checkpoints, self.config.daemon.min_free_mb * 10**6)
        free = self.ws.free_bytes()
        if free >= need:
            self._said.discard("disk")
            return True
        self.say_once("disk", "error", f"waiting: {free / 1e6:.0f} MB free, job {job.id} needs about "
                      f"{need / 1e6:.0f} MB (checkpoints {per / 1e6:.1f} MB each, keep "
                      f"{self.config.training.keep_checkpoints}, reserve {self.config.daemon.min_free_mb} MB); "
                      "free space or lower daemon.min_free_mb; training starts by itself")
        return False

    def train(self, job) -> bool:
        """Train one job, here or in a worker process; False if it failed."""
        if not self.isolate and self.config.distributed.nproc_per_node == 1:
            self.training = Training(self.ws, self.reporter, self.config)
            self.training.stop_reason = self.stop_reason
            ok = self.training.train_next()
            self.stop_reason = self.stop_reason or self.training.stop_reason
            self._after(job.id)
            return ok
        return self._train_in_worker(job)

    # Worker processes ----------------------------------------------------------------------------
    def _train_in_worker(self, job) -> bool:
        """Run the job in a worker process; the job's state in the database says what happened to it."""
        code = self._run_worker(job)
        state = jobs.get(self.db, job.id).state
        if state in (JobState.DONE, JobState.SKIPPED):
            self._after(job.id)
            return True
        if state in (JobState.FAILED, JobState.REJECTED) or code == FAILED:
            return False
        if code == DISK:
            self.paused = True
            self.say("error", "paused: a checkpoint could not be written (see above); `conveyor resume` retries")
            return False
        if code == STOPPED or self.stop_reason:
            self.stop_reason = self.stop_reason or "stop requested"
            return True  # the job stays queued and resumes from its checkpoint on the next start
        return self._crashed(job, code)

    def _run_worker(self, job) -> int:
        """Hand the job to the warm worker (imports done) and wait for it, claiming inbox files meanwhile.

        Returns the worker's outcome (training.DONE, ...), as it logged it, else its exit code."""
        nproc = self.config.distributed.nproc_per_node
        worker = self._handoff(job) if nproc == 1 else self._spawn_distributed(job, nproc)
        self.worker = worker
        since = self.db.execute("SELECT COALESCE(MAX(id), 0) FROM events").fetchone()[0]
        log_event(self.db, "info", "worker", f"worker pid {worker.pid} trains job {job.id}", job.id)
        started = time.monotonic()
        while worker.poll() is None:
            self.claim()  # files keep queueing while a job trains
            # The next warm worker starts once this one is under way, not competing with its setup.
            if nproc == 1 and self._warm is None and (time.monotonic() - started > 5 or self._stepped(job)):
                self._warm = self._spawn()
            self.idle()
        self.worker = None
        row = self.db.execute("SELECT message FROM events WHERE kind = 'outcome' AND id > ? ORDER BY id DESC"
                              " LIMIT 1", (since,)).fetchone()
        return int(row["message"]) if row and worker.returncode in (0, int(row["message"])) else worker.returncode

    def _handoff(self, job) -> subprocess.Popen:
        worker = self._warm if self._warm is not None and self._warm.poll() is None else self._spawn()
        self._warm = None
        try:
            worker.stdin.write(json.dumps({"job": job.id, "config": self.config.model_dump()}) + "\n")
            worker.stdin.close()
        except BrokenPipeError:
            pass  # it died while waiting; its exit code says so
        return worker

    def _stepped(self, job) -> bool:
        return bool(self.db.execute("SELECT 1 FROM audit WHERE job_id = ? LIMIT 1", (job.id,)).fetchone())

    def _spawn_distributed(self, job, nproc: int) -> subprocess.Popen:
        """torchrun starts nproc worker processes for the job (data parallel); conveyor does not reimplement it."""
        self._close_warm()
        env = {**os.environ, "CONVEYOR_CONFIG_JSON": json.dumps(self.config.model_dump())}
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                "-m", "conveyor", "-w", str(self.ws.root), "worker", "--job", str(job.id)]
        return subprocess.Popen(argv, env=env, preexec_fn=_die_with_parent)

    def _spawn(self) -> subprocess.Popen:
        argv = [sys.executable, "-m", "conveyor", "-w", str(self.ws.root), "worker"]
        return subprocess.Popen(argv, stdin=subprocess.PIPE, text=True, preexec_fn=_die_with_parent)

    def _close_warm(self) -> None:
        if self._warm is not None and self._warm.poll() is None:
            self._warm.stdin.close()  # EOF: it exits without training
            try:
                self._warm.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._warm.kill()
        self._warm = None

    def _crashed(self, job, code: int) -> bool:
        job = jobs.get(self.db, job.id)
        attempts = job.attempts + 1
        jobs.update(self.db, job.id, attempts=attempts)
        how = f"signal {-code}" if code < 0 else f"exit code {code}"
        if attempts >= self.config.daemon.max_attempts:
            reason = f"its worker died {attempts} time(s) (last: {how}); see `conveyor logs`"
            jobs.transition(self.db, job, JobState.FAILED, error=reason)
            self.say("error", f"job {job.id} failed: {reason}")
            return False
        wait = self.config.daemon.retry_backoff_seconds * 2 ** (attempts - 1)
        self.say("warning", f"job {job.id}: worker died ({how}); attempt {attempts + 1} of "
                 f"{self.config.daemon.max_attempts} in {wait:.0f} s, from its last checkpoint")
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and self.stop_reason is None:
            self.claim()
            self.idle(seconds=min(0.5, max(deadline - time.monotonic(), 0.01)))
        return True

    def _after(self, job_id: int) -> None:
        job = jobs.get(self.db, job_id)
        if job.state in (JobState.DONE, JobState.SKIPPED):
            file_finished(self.ws, job)

    def close(self) -> None:
        self._close_warm()

    # Messages ------------------------------------------------------------------------------------
    def say(self, level: str, text: str, job_id: int | None = None) -> None:
        log_event(self.db, level, "message", text, job_id)
        self.reporter.message(level, text)

    def say_once(self, key: str, level: str, text: str) -> None:
        if key not in self._said:
            self._said.add(key)
            self.say(level, text)

    # Signals and the inbox watcher ---------------------------------------------------------------
    @contextlib.contextmanager
    def _watching(self):
        if not self.watch:
            yield
            return
        self.reload_config()
        self._inbox = Inbox(self.ws, self.config.inbox.settle_seconds, self.say)
        self._inbox.start()
        try:
            yield
        finally:
            self._inbox.stop()

    @contextlib.contextmanager
    def _warm_stop_signals(self):
        def on_signal(signum, frame):
            self._signals += 1
            if self._signals > 1:  # second signal: stop at once
                if self.worker is not None:
                    self.worker.kill()
                raise SystemExit(130)
            self.stop_reason = signal.Signals(signum).name
            if self.training is not None:
                self.training.stop_reason = self.stop_reason
            if self.worker is not None:
                self.worker.send_signal(signal.SIGTERM)
            self.reporter.message("warning", f"{self.stop_reason}: finishing this step, then checkpointing "
                                  "(send again to stop at once)")

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def _die_with_parent() -> None:
    """In the worker: get SIGKILL if the daemon dies, so a killed daemon never leaves a worker training."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    os.setpgrp()  # a Ctrl-C in the terminal reaches the daemon, which forwards a warm stop


class Lock:
    """One daemon per workspace: an flock on daemon.lock holding the PID; the OS frees it if the process dies."""

    def __init__(self, ws: Workspace):
        self.path = ws.root / LOCK_FILE
        self.fd: int | None = None

    def __enter__(self) -> "Lock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConveyorError(f"another conveyor daemon (pid {holder}) is running in this workspace; "
                                "stop it with `conveyor stop`, or use another workspace") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)
