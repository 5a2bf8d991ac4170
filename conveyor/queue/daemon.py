"""The daemon: the one owner of the queue. `Daemon.work(drain=False)` reads top to bottom: claim inbox files,
act on controls, reconcile with the checkpoints, claim the next job (compare-and-set), train it (in a worker
process, or in this process), settle its outcome, repeat.

The first SIGTERM/SIGINT is a warm stop (the worker finishes its step, checkpoints, exits); a second one
stops at once. Run it with `conveyor run` (a long-running service) or `conveyor run --drain`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
import traceback
import uuid

from .. import faults
from ..config import Config
from ..data import models
from ..errors import ConveyorError
from ..store import checkpoints as ck
from ..store import controls, jobs, runs
from ..store.controls import Context, Effect
from ..store.database import DB_FILE, log_event
from ..store.jobs import Job, JobState
from ..store.reconcile import place
from ..store.workspace import Workspace
from ..train.report import Outcome, Reporter
from ..train.worker import GATE, Worker
from . import launch, process
from .attempt import clear_attempts
from .inbox import Inbox, file_finished
from .notify import Notifier, close_wait


class Daemon:
    def __init__(self, ws: Workspace, reporter: Reporter | None = None, isolate: bool = False, watch: bool = False):
        self.ws = ws
        self.db = ws.db
        self.reporter = reporter or Reporter()
        self.isolate = isolate  # one worker process per job (frees memory, survives worker crashes)
        self.watch = watch  # claim files dropped into inbox/
        self.stop_reason: str | None = None
        self.drain = False
        self.config: Config | None = None  # the last valid settings
        self.worker: Worker | None = None  # the job training in this process
        self.process: process.WorkerProcess | launch.Launch | None = None  # the job training in other processes
        self._failed_hosts: set[int] = set()  # hosts (places in distributed.hosts) whose agent could not start
        self._warm: process.WorkerProcess | None = None
        self._signals = 0
        self._exit = "an exception"  # how the last worker ended, for messages
        self._inbox: Inbox | None = None
        self._said: set[str] = set()
        self._room = 0  # after a write failed for lack of space: the free bytes to wait for before training again

    # The work loop -----------------------------------------------------------------------------
    def work(self, drain: bool = False) -> bool:
        """Train queued jobs in order; False if any failed. drain=True returns once nothing is waiting."""
        ok = True
        self.drain = drain
        self.reload_config()
        self._startup()
        if drain and self.paused:  # nobody may be watching a drain: say why, and end (a pause outlives a stop)
            self.say("error", "nothing trained: " + (
                "the queue is paused by eval.gate (see `conveyor versions`); `conveyor resume` accepts the gated "
                "version, `conveyor rollback VERSION` undoes it" if controls.held_by(self.db) == GATE
                else controls.pause_text(self.db)))
            return False
        with self._notifying(), self._warm_stop_signals(), self._watching(), contextlib.closing(self):
            while self.stop_reason is None:
                try:
                    turned = self.turn()
                except Exception as e:  # a full disk is a state, wherever the write was: wait for room
                    if not faults.is_disk_full(e):
                        raise
                    self.wait_for_room(f"disk full: a write failed ({e})")
                    continue
                if turned is None:
                    break
                ok = turned and ok
        return ok

    def turn(self) -> bool | None:
        """One round: claim inbox files, act on controls, then train the next job if one may start. False if it
        failed; None once a drain has nothing left to train."""
        self.claim_files()
        self.act_on_controls()
        waiting = not self.paused and jobs.waiting(self.db)
        if not waiting:
            if self.drain and not self.paused:
                return None
            if self.paused:  # said once per pause, wherever it was taken (here, in a job, by the gate)
                self.say_once("paused", "warning", controls.pause_text(self.db) or "paused")
            self.idle()
            return True
        self._said.discard("paused")
        if not self.reload_config() or not self.enough_disk(waiting[0]):
            self.idle(seconds=5.0)
            return True
        self.reconcile()
        job = jobs.claim_next(self.db, claim=uuid.uuid4().hex)
        if job is None:
            return True
        held_before = controls.held_by(self.db)
        return self.settle(job, self.train(job), held_before)

    def _startup(self) -> None:
        """Requests taken by a process that died are answered; a job left running by one is placed again."""
        if controls.orphaned(self.db, "not acted on: the process that took it ended first; ask again"):
            self.say("warning", "answered control requests left by a process that ended before acting on them")
        clear_attempts(self.ws.root)  # an earlier daemon's attempts are over (their ranks elsewhere end themselves)
        if self.isolate and self.config and not launch.uses_agents(self.config.distributed):
            self._warm = process.spawn_warm(str(self.ws.root))
        if self.config and jobs.running(self.db):
            self.reconcile()

    def claim_files(self) -> None:
        if self._inbox is None:
            return
        for result in self._inbox.scan():
            for text in result.messages:
                self.say("warning", text)
            if not result.new:
                continue  # the same dataset as a job that carries on; its messages said so
            state = "rejected" if result.job.state == JobState.REJECTED else "queued"
            self.say("info" if state == "queued" else "error",
                     f"inbox: claimed {result.job.file} as job {result.job.id} ({state})")

    def act_on_controls(self) -> None:
        """Controls that arrive while no job is training (a training worker takes its own)."""
        while self.stop_reason is None and (req := controls.take(self.db, f"daemon (pid {os.getpid()})")):
            where = Context.PAUSED_BETWEEN_JOBS if self.paused else Context.BETWEEN_JOBS
            effect = req.effect(where)
            if effect == Effect.HOLD:
                controls.answer(self.db, req.id, "paused between jobs; no job starts until `conveyor resume`", effect)
            elif effect == Effect.GO_ON:
                controls.answer(self.db, req.id, "resumed", effect)
            elif req.action == controls.Action.RESUME and self._room:  # waiting for disk space: try again now
                self._room = 0
                self._said.discard("disk")
                controls.answer(self.db, req.id, "trying again now (the daemon was waiting for disk space)", effect)
            elif effect == Effect.STOP:
                self.stop_reason = f"stop requested by {req.who}"
                controls.answer(self.db, req.id, "daemon stopped between jobs; waiting jobs start on the next run",
                                effect)
            else:
                controls.answer(self.db, req.id, req.why_nothing(where))

    def reconcile(self) -> None:
        """Make the database agree with the newest verified checkpoint (and the settings' run identity)."""
        place(self.ws, self.config, self.ws.model_path(self.config.model.name), self.say,
              launch.world_size(self.config.distributed))

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
            config = self.ws.config()
            if problem := launch.hosts_problem(config.distributed):  # the host, not the file: checked here
                raise ConveyorError(problem)
            models.check(config.model.name)  # a model that cannot be had never starts a run
            self.config = config
            self._said.discard("config")
        except ConveyorError as e:
            if self.config is None:
                raise
            self.say_once("config", "warning", f"{e}\nkeeping the last valid settings until this is fixed")
        return self.config is not None

    def enough_disk(self, job: Job) -> bool:
        """Pause (not fail) when the next job's checkpoints would not fit; say the numbers."""
        run = runs.active(self.db)
        run_dir = self.ws.run_dir(run.id) if run else None
        per = ck.estimate_size(run_dir) if run_dir else 1 << 20
        t = self.config.training
        need = ck.space_needed(run_dir, t.keep_checkpoints, t.keep_job_ends, self.config.daemon.min_free_mb * 10**6)
        free = self.ws.free_bytes()
        need = max(need, self._room)
        if free >= need:
            if self._room:
                self.say("info", f"disk: {free / 1e6:.0f} MB free again; training goes on", kind="disk")
            self._room = 0
            self._said.discard("disk")
            return True
        self.say_once("disk", "error", f"waiting: {free / 1e6:.0f} MB free, job {job.id} needs about "
                      f"{need / 1e6:.0f} MB (checkpoints {per / 1e6:.1f} MB each, keep {t.keep_checkpoints} + "
                      f"{t.keep_job_ends} job ends, reserve {self.config.daemon.min_free_mb} MB); "
                      "free space or lower daemon.min_free_mb; training starts by itself", job.id, kind="disk")
        return False

    # Training one job --------------------------------------------------------------------------
    def train(self, job: Job) -> Outcome | None:
        """Train the claimed job here or in a worker process; its Outcome, or None if the worker died."""
        if self.isolate or launch.uses_agents(self.config.distributed):
            return self._train_in_worker_process(job)
        self.worker = Worker(self.ws, self.config, job.id, job.claim, self.reporter)
        self.worker.stop_reason = self.stop_reason
        try:
            return self.worker.run()
        except Exception:  # a bug or the machine (out of memory, ...): handled as a worker death, never fatal
            log_event(self.db, "error", "crash", traceback.format_exc(), job.id)
            return None
        finally:
            self.stop_reason = self.stop_reason or (self.worker.stop_reason if self.worker else None)
            self.worker = None

    def _train_in_worker_process(self, job: Job) -> Outcome | None:
        """Hand the job to the warm worker, or start its attempt on every host (launch.py: torchrun agents), and
        wait for it, claiming inbox files meanwhile."""
        config = self.config.model_dump()
        agents = launch.uses_agents(self.config.distributed)
        if agents:
            self._close_warm()
            self.process = launch.start(self.ws.root, job.id, job.claim, config, self.config.distributed,
                                        self._failed_hosts, lambda: self._progress(job),
                                        lambda level, text: self.say(level, text, job.id))
        else:
            self.process = self._warm if self._warm is not None and self._warm.poll() is None else \
                process.spawn_warm(str(self.ws.root))
            self._warm = None
            self.process.hand(job.id, job.claim, config)
        log_event(self.db, "info", "worker", f"worker pid {self.process.pid} trains job {job.id}", job.id)
        started = time.monotonic()
        while self.process.poll() is None:  # an attempt's poll also watches its hosts (launch.Launch)
            self.claim_files()  # files keep queueing while a job trains
            # The next warm worker starts once this one is under way, not competing with its setup.
            if not agents and self._warm is None and (time.monotonic() - started > 5 or self._stepped(job)):
                self._warm = process.spawn_warm(str(self.ws.root))
            self.idle()
        ended, self.process = self.process, None
        code = ended.returncode
        if agents:  # how it ended, in words; hosts that could not start sit out the next attempt
            self._exit, self._failed_hosts = ended.ended, ended.failed_to_start
        else:
            self._exit = f"signal {-code}" if code < 0 else f"exit code {code}"
        if self.stop_reason and (code == -signal.SIGTERM or (agents and Outcome.from_code(code) is None)):
            # Our own warm stop reached it before it could act on it (still starting up, or already exiting):
            # a stop, not a death; reconciliation puts the job where its checkpoints say.
            self.reconcile()
            return Outcome.DONE if jobs.get(self.db, job.id).state == JobState.DONE else Outcome.STOPPED
        return Outcome.from_code(code)

    def _progress(self, job: Job) -> tuple[int, bool]:
        """For an attempt's watchdog: the job's steps so far (rank 0 records them), and whether the queue is paused."""
        row = self.db.execute("SELECT steps_done FROM jobs WHERE id = ?", (job.id,)).fetchone()
        return (row["steps_done"] if row else 0), self.paused

    def _stepped(self, job: Job) -> bool:
        return bool(self.db.execute("SELECT 1 FROM audit WHERE job_id = ? AND step > ? LIMIT 1",
                                    (job.id, (job.segment_start or 1) - 1)).fetchone())

    def settle(self, job: Job, outcome: Outcome | None, held_before: str | None = None) -> bool:
        """Act on how the job's training ended; False if the job failed."""
        if outcome in (Outcome.DONE, Outcome.SKIPPED):
            file_finished(self.ws, jobs.get(self.db, job.id))
            if held_before != GATE and controls.held_by(self.db) == GATE:  # this job's version is gated
                return self._hold("eval.gate holds the queue; `conveyor resume` accepts the version", record=False)
            return True
        if outcome == Outcome.FAILED:
            return False
        if outcome == Outcome.STOPPED:
            self.stop_reason = self.stop_reason or "stop requested"
            return True
        if outcome == Outcome.DISK_FULL:  # the worker said so; the job goes back to its newest checkpoint
            self.wait_for_room(None)
            self.reconcile()
            return True
        if outcome == Outcome.CHECKPOINT_ERROR:  # the disk, not the job: the job keeps its place
            return self._hold("a checkpoint could not be written (see above)")
        if outcome in (Outcome.OUT_OF_MEMORY, Outcome.NOT_FINITE):  # the settings: the same step would fail again
            self.reconcile()  # back to its newest checkpoint, as after a death, but with no retry
            now = jobs.get(self.db, job.id)
            where = (f"interrupted at its step {now.steps_done} of {now.planned_steps}" if now.steps_done
                     else "queued, before its first step")
            what = "ran out of memory" if outcome == Outcome.OUT_OF_MEMORY else "trained to inf or nan"
            return self._hold(f"job {job.id} {what} (see above); it stays {where}")
        if outcome == Outcome.NOT_MINE:
            return True
        return self._died(job)

    @property
    def paused(self) -> bool:
        """The queue's pause is the database's (controls.paused): one truth for the daemon, its workers, `status`,
        `resume` and the next daemon, whoever took it (a person between jobs or in a job, the gate, this daemon)."""
        return controls.paused(self.db)

    def _hold(self, why: str, record: bool = True) -> bool:
        """A problem a retry would repeat: stop (drain) or pause until `conveyor resume`; the job keeps its place."""
        if self.drain:
            self.stop_reason = why
            self.say("error", f"stopped: {why}; run again to resume")
            return False
        if record:  # a pause like a person's: kept in the database, shown by status, lifted by `conveyor resume`
            controls.hold(self.db, f"daemon (pid {os.getpid()})", why)
        self._said.add("paused")  # said here, with the reason
        self.say("error", f"paused: {why}; `conveyor resume` retries")
        return False

    def wait_for_room(self, text: str | None) -> None:
        """A write failed for lack of space (in this process or the worker): no job starts until the disk has
        more room than when it failed (enough_disk says how much and resumes by itself), or `conveyor resume`.
        A drain (`conveyor train`, `run --drain`) ends instead, exit 1, so a script is never left hanging; the job
        keeps its place. Said where it can be: the database itself may be what is full."""
        run = runs.active(self.db)
        per = ck.estimate_size(self.ws.run_dir(run.id)) if run else 1 << 20
        reserve = (self.config.daemon.min_free_mb if self.config else 0) * 10**6
        free = self.ws.free_bytes()
        self._room = free + 2 * per + max(reserve, 16 * 10**6)
        then = ("free that much and run again: the job resumes from its newest checkpoint" if self.drain else
                "then training goes on by itself (`conveyor resume` tries at once)")
        if "disk" not in self._said:
            said = (f"{text}. " if text else "") + (
                f"No job starts until {self._room / 1e6:.0f} MB are free in {self.ws.root} (now {free / 1e6:.1f} MB: "
                f"{(self._room - free) / 1e6:.0f} MB more); {then}")
            with contextlib.suppress(Exception):  # stdout may be a file on the full disk
                self.reporter.message("error", said)
            with contextlib.suppress(Exception):
                log_event(self.db, "error", "disk", said)
        self._said.add("disk")
        if self.drain:
            self.stop_reason = "disk full"
            return
        self.idle(seconds=5.0)

    def _died(self, job: Job) -> bool:
        """A worker died. The checkpoints say where its job stands; a death counts against daemon.max_attempts
        only when the job made no checkpointed progress since it was claimed."""
        if self.stop_reason and self._signals > 1:
            return True
        self.reconcile()
        now = jobs.get(self.db, job.id)
        if now.state == JobState.DONE:  # it had finished; only its exit was cut short
            file_finished(self.ws, now)
            return True
        log_event(self.db, "warning", "death", f"worker of job {job.id} died ({self._exit})", job.id)
        progressed = now.steps_done > job.steps_done
        attempts = 0 if progressed else now.attempts + 1
        jobs.update(self.db, job.id, attempts=attempts, deaths=now.deaths + 1)
        d = self.config.daemon
        if attempts >= d.max_attempts:
            reason = (f"its worker died {attempts} time(s) in a row without a new checkpoint ({now.deaths + 1} "
                      "death(s) in all); see `conveyor logs`")
            jobs.transition(self.db, job.id, JobState.FAILED, expect=now.state, error=reason)
            self.say("error", f"job {job.id} failed: {reason}", job.id, kind="failed")
            return False
        wait = min(d.retry_backoff_seconds * 2 ** max(attempts - 1, 0), d.max_backoff_seconds)
        gained = f"it had reached its step {now.steps_done}" if progressed else "no new checkpoint since its start"
        self.say("warning", f"job {job.id}: worker died (({self._exit}), {gained}); "
                 + (f"attempt {attempts + 1} of {d.max_attempts}" if attempts else "progress resets the attempts")
                 + f"; resumes in {wait:.0f} s from its last checkpoint", job.id)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and self.stop_reason is None:
            self.claim_files()
            self.idle(seconds=min(0.5, max(deadline - time.monotonic(), 0.01)))
        return True

    def _close_warm(self) -> None:
        if self._warm is not None:
            self._warm.close()
        self._warm = None

    def close(self) -> None:
        self._close_warm()

    # Messages ------------------------------------------------------------------------------------
    def say(self, level: str, text: str, job_id: int | None = None, kind: str = "message") -> None:
        log_event(self.db, level, kind, text, job_id)
        self.reporter.message(level, text)

    def say_once(self, key: str, level: str, text: str, job_id: int | None = None, kind: str = "message") -> None:
        if key not in self._said:
            self._said.add(key)
            self.say(level, text, job_id, kind)

    # Notifications, signals and the inbox watcher -----------------------------------------------
    @contextlib.contextmanager
    def _notifying(self):
        """notify.webhook / notify.command hear of events while the loop runs (settings read at its start); the
        loop's end is the event `stopped`, delivered within a bounded wait (barely any after a second signal)."""
        n = self.config.notify
        notifier = Notifier(self.ws.root / DB_FILE, n, str(self.ws.root)).start() if n.webhook or n.command else None
        crash = None
        try:
            yield
        except Exception as e:
            crash = f"{type(e).__name__}: {e}"
            raise
        finally:
            why = self.stop_reason or crash or "drained: nothing left to train"
            with contextlib.suppress(Exception):  # a full disk must not turn a stop into a crash
                log_event(self.db, "error" if crash else "info", "stopped", f"daemon stopped ({why})")
            if notifier is not None:
                notifier.close(min(close_wait(n), 1.0) if self._signals > 1 else close_wait(n))

    @contextlib.contextmanager
    def _watching(self):
        if not self.watch:
            yield
            return
        self._inbox = Inbox(self.ws, self.config.inbox.settle_seconds, self.say,
                            epochs=lambda: self.config.training.epochs)
        self._inbox.start()
        try:
            yield
        finally:
            self._inbox.stop()

    @contextlib.contextmanager
    def _warm_stop_signals(self):
        def on_signal(signum, frame):
            self._signals += 1
            if self._signals > 1:  # second signal: stop at once, the worker's whole process group too
                if self.process is not None:
                    self.process.kill()
                raise SystemExit(130)
            self.stop_reason = signal.Signals(signum).name
            if self.worker is not None:
                self.worker.stop_reason = self.stop_reason
            if self.process is not None:
                self.process.warm_stop()
            self.reporter.message("warning", f"{self.stop_reason}: finishing this step, then checkpointing "
                                  "(send again to stop at once)")

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
