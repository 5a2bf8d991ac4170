"""Training one job end to end, in whichever process runs it: reconcile with the checkpoints, prepare the
data, plan the steps, run the worker, act on controls between steps, record the outcome."""

from __future__ import annotations

import time
from pathlib import Path

from . import controls, distributed, jobs, ledger, runs
from . import manifest as mf
from .config import Config
from .errors import CheckpointError, DataError, PlanError
from .fingerprint import short
from .formats import TokenizedFile, parse_file, tokenize_cached, tokenize_file
from .jobs import Job, JobState
from .plan import examples_per_step, planned_steps, require_steps
from .reconcile import Placement, place
from .store import log_event
from .workspace import Workspace

# How a training process ends, as its exit code when it runs as a worker process.
DONE, FAILED, DISK, STOPPED = 0, 3, 4, 5


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


class Training:
    """Trains the next job of the queue; `stop_reason` (set by a signal handler) makes it stop warm."""

    def __init__(self, ws: Workspace, reporter: Reporter | None = None, config: Config | None = None):
        self.ws = ws
        self.db = ws.db
        self.reporter = reporter or Reporter()
        self.config = config  # None: read conveyor.toml
        self.world_size = 1  # set per job from the process group (torchrun decides)
        self.stop_reason: str | None = None
        self.ended = DONE
        self.released = False  # whether the other ranks were told to train

    def train_next(self, job_id: int | None = None) -> bool:
        """Reconcile with the checkpoints, then train the next job to its planned end; False if it failed."""
        self.released = False
        try:
            return self._train_next(job_id)
        finally:
            if not self.released:
                distributed.broadcast(None)  # nothing to train: the other ranks (if any) exit
            log_event(self.db, "info", "outcome", str(self.ended))

    def _train_next(self, job_id: int | None) -> bool:
        config = self.config or self.ws.config()
        self.world_size = distributed.world()  # torchrun decides; planning and the manifest follow it
        model_path = self.ws.model_path(config.model.name)
        placement = place(self.ws, config, model_path, self.say, self.world_size)
        job = jobs.next_queued(self.db)
        if job is None or (job_id is not None and job.id != job_id and job.state != JobState.RUNNING):
            return True
        try:
            data = self.prepare(job, config, model_path)
            job = self.plan(job, config, placement, data)
            if job.state == JobState.SKIPPED:
                return True
            outcome = self._run_worker(job, config, model_path, placement, data)
        except (DataError, PlanError) as e:
            self._fail(job, str(e))
            self.ended = FAILED
            return False
        except CheckpointError as e:
            # The disk or the checkpoint folder, not the job, is at fault: keep the job, stop, say why.
            self.say("error", f"job {job.id} stopped: {e}", job.id)
            self.stop_reason = "checkpoint error"
            self.ended = DISK
            return False
        self._finish(job, placement.run, outcome, data)
        return True

    def prepare(self, job: Job, config: Config, model_path: str) -> TokenizedFile:
        """Parse and tokenize the stored copy; apply the too-long policy; report exclusions."""
        data = job_data(self.ws, job, config, model_path)
        if data.truncated_lines:
            shown = ", ".join(map(str, data.truncated_lines[:20]))
            more = f" and {len(data.truncated_lines) - 20} more" if len(data.truncated_lines) > 20 else ""
            text = (f"{len(data.truncated_lines)} example(s) longer than training.max_length="
                    f"{config.training.max_length} tokens (lines {shown}{more})")
            if config.data.too_long == "reject":
                raise DataError(f"{job.file}: {text}; data.too_long = \"reject\". Shorten them or raise max_length")
            self._warn(job, f"{text} were truncated")
        if data.excluded_lines:
            shown = ", ".join(map(str, data.excluded_lines[:20]))
            self._warn(job, f"{len(data.excluded_lines)} example(s) lost their whole trainable part to truncation "
                       f"and are not trained (lines {shown}); raise training.max_length to keep them")
        return data

    def plan(self, job: Job, config: Config, placement: Placement, data: TokenizedFile) -> Job:
        """Fix the job's step range (law 1) and apply the duplicate policy (law 7)."""
        t = config.training
        epochs = job.epochs or t.epochs
        total = len(data.examples) * epochs
        eps = examples_per_step(t.batch_size, t.grad_accum, self.world_size)
        steps_done, position = placement.position_of(job)
        steps = require_steps(planned_steps(total, eps, steps_done, position), len(data.examples), epochs, job.file)
        if steps_done == 0 and self._duplicate(job, placement.run, config):
            return jobs.get(self.db, job.id)
        if steps_done:
            info = placement.resume.manifest[mf.K_JOB]
            self.say("info", f"job {job.id} resumes at global step {placement.resume.step + 1} from "
                     f"{placement.resume.path.name} (epoch {info[mf.J_EPOCH] + 1}, example {info[mf.J_EPOCH_POSITION]}"
                     " of that epoch's order)", job.id)
        start = placement.run.global_step + 1 if steps_done == 0 else \
            placement.resume.manifest[mf.K_JOB][mf.J_START_STEP]
        job = jobs.transition(self.db, job, JobState.RUNNING, run_id=placement.run.id, epochs=epochs,
                              examples=len(data.examples), tokens=data.tokens, truncated=len(data.truncated_lines),
                              excluded=data.excluded_lines, planned_steps=steps, start_step=start,
                              end_step=start + steps - 1, steps_done=steps_done)
        log_event(self.db, "info", "planned", f"job {job.id}: {len(data.examples)} examples × {epochs} epoch(s) = "
                  f"{steps} steps, global steps {start}–{start + steps - 1}", job.id)
        return job

    def _duplicate(self, job: Job, run: runs.Run, config: Config) -> bool:
        row = self.db.execute(
            "SELECT id, file, start_step, end_step FROM jobs WHERE run_id = ? AND fingerprint = ? AND state = 'done'"
            " AND id != ? ORDER BY id LIMIT 1", (run.id, job.fingerprint, job.id)).fetchone()
        if row is None:
            return False
        earlier = (f"same bytes ({short(job.fingerprint)}) as job {row['id']} ({row['file']}), "
                   f"trained at steps {row['start_step']}–{row['end_step']} of {run.id}")
        if config.data.skip_duplicates:
            reason = f"skipped: {earlier}; data.skip_duplicates = true"
            jobs.transition(self.db, job, JobState.SKIPPED, run_id=run.id, error=reason)
            self.say("warning", f"job {job.id} ({job.file}) {reason}")
            return True
        self._warn(job, f"trained again: {earlier} (set data.skip_duplicates = true to skip repeats)")
        return False

    def _run_worker(self, job: Job, config: Config, model_path: str, placement: Placement, data: TokenizedFile):
        from .worker import Hooks, JobSpec, train_job

        steps_done, position = placement.position_of(job)
        spec = JobSpec(run_id=placement.run.id, run_dir=self.ws.run_dir(placement.run.id), job_id=job.id,
                       fingerprint=job.fingerprint, data=data, epochs=job.epochs, planned_steps=job.planned_steps,
                       start_step=job.start_step, steps_done=steps_done, position=position,
                       identity=placement.run.identity, resume=placement.resume,
                       eval_data=self._eval_data(config, model_path))
        self.reporter.job_started(job)

        def flush(audit, metrics, evals, samples, done, position):
            ledger.write_steps(self.db, spec.run_id, audit, metrics, evals, samples)
            jobs.update(self.db, job.id, steps_done=done)
            runs.set_step(self.db, spec.run_id, spec.start_step + done - 1)

        hooks = Hooks(progress=lambda d, p, loss, rate: self.reporter.progress(job, d, p, loss, rate),
                      flush=flush, peek=self._peek, hold=lambda checkpoint: self._hold(job, checkpoint))
        distributed.broadcast({"job": job.id})  # the other ranks (if any) set up the same job and start
        self.released = True
        return train_job(config, model_path, spec, hooks, self.world_size)

    def _finish(self, job: Job, run: runs.Run, outcome, data: TokenizedFile) -> None:
        if outcome.stopped and self.skip_request is not None:
            return self._skipped(job, run, outcome, data)
        if outcome.stopped:
            jobs.transition(self.db, job, JobState.QUEUED, steps_done=outcome.steps_done)
            text = (f"stopped ({outcome.stopped}) after global step {outcome.end_step}; job {job.id} "
                    f"resumes at step {outcome.end_step + 1} from {outcome.checkpoint.name} on the next start")
            self.say("info", text)
            if self.stop_request is not None:
                controls.ack(self.db, self.stop_request.id, text)
            self.ended = STOPPED
            return
        ledger.record(self.db, run_id=run.id, job_id=job.id, start_step=job.start_step, end_step=outcome.end_step,
                      examples=len(data.examples), epochs=job.epochs, tokens=data.tokens * job.epochs, outcome="done")
        runs.set_step(self.db, run.id, outcome.end_step)
        job = jobs.transition(self.db, job, JobState.DONE, steps_done=outcome.steps_done)
        log_event(self.db, "info", "done", f"job {job.id}: steps {job.start_step}–{job.end_step}", job.id)
        self.reporter.job_finished(job)

    # Messages ------------------------------------------------------------------------------------
    def say(self, level: str, text: str, job_id: int | None = None) -> None:
        log_event(self.db, level, "message", text, job_id)
        self.reporter.message(level, text)

    def _warn(self, job: Job, text: str) -> None:
        jobs.add_warning(self.db, job, text)
        self.say("warning", f"job {job.id} ({job.file}): {text}", job.id)

    def _fail(self, job: Job, reason: str) -> None:
        if job.state not in (JobState.QUEUED, JobState.RUNNING):
            job = jobs.get(self.db, job.id)
        jobs.transition(self.db, job, JobState.FAILED, error=reason)
        self.say("error", f"job {job.id} failed: {reason}", job.id)


    def _eval_data(self, config: Config, model_path: str) -> TokenizedFile | None:
        """The validation set, tokenized and masked exactly like training data; None if not configured."""
        from .worker import load_tokenizer

        if not config.eval.file:
            return None
        path = Path(config.eval.file)
        path = path if path.is_absolute() else self.ws.root / path
        try:
            data = tokenize_file(parse_file(path, f"eval.file {path.name}"), load_tokenizer(model_path),
                                 config.training.max_length)
        except (DataError, OSError) as e:
            self.say("warning", f"no evaluation loss: {e}")
            return None
        data.examples = data.examples[: config.eval.max_examples]
        return data

    # Controls between optimizer steps ------------------------------------------------------------
    stop_request: controls.Request | None = None
    skip_request: controls.Request | None = None
    pause_request: controls.Request | None = None

    def _peek(self) -> str | None:
        """Between steps: "pause", a reason to stop now (stop, skip, a signal), or None to go on."""
        if self.stop_reason:
            return self.stop_reason
        for req in controls.pending(self.db):
            if req.action == controls.Action.PAUSE:
                self.pause_request = req
                return "pause"
            if req.action == controls.Action.RESUME:
                controls.ack(self.db, req.id, "not paused")
            elif reason := self._stop_or_skip(req):
                return reason
        return None

    def _stop_or_skip(self, req: controls.Request) -> str | None:
        """Take a stop or skip request (acknowledged once the checkpoint is written); its reason."""
        if req.action == controls.Action.STOP:
            self.stop_request = req
        elif req.action == controls.Action.SKIP:
            self.skip_request = req
        else:
            return None
        return f"{req.action.value} requested by {req.who}"

    def _hold(self, job: Job, checkpoint: Path) -> str | None:
        """Paused after `checkpoint`: wait for resume (None), stop or skip (the reason)."""
        step = _step_of(checkpoint)
        controls.ack(self.db, self.pause_request.id, f"paused job {job.id} at global step {step} "
                     f"(checkpoint {checkpoint.name}); `conveyor resume` continues")
        self.say("info", f"paused by {self.pause_request.who} at step {step}", job.id)
        while self.stop_reason is None:
            for req in controls.pending(self.db):
                if req.action == controls.Action.PAUSE:
                    controls.ack(self.db, req.id, "already paused")
                elif req.action == controls.Action.RESUME:
                    text = f"resumed job {job.id} at step {step + 1}"
                    controls.ack(self.db, req.id, text)
                    self.say("info", f"{text} ({req.who})", job.id)
                    return None
                elif reason := self._stop_or_skip(req):
                    return reason
            time.sleep(0.1)
        return self.stop_reason

    def _skipped(self, job: Job, run: runs.Run, outcome, data: TokenizedFile) -> None:
        req = self.skip_request
        why = f"skipped by {req.who}" + (f": {req.reason}" if req.reason else "") + \
            f" after {outcome.steps_done} of {job.planned_steps} steps (global {job.start_step}–{outcome.end_step})"
        if outcome.steps_done:
            ledger.record(self.db, run_id=run.id, job_id=job.id, start_step=job.start_step,
                          end_step=outcome.end_step, examples=len(data.examples), epochs=job.epochs,
                          tokens=outcome.tokens, outcome="skipped")
        runs.set_step(self.db, run.id, outcome.end_step)
        jobs.transition(self.db, job, JobState.SKIPPED, steps_done=outcome.steps_done, end_step=outcome.end_step,
                        error=why)
        controls.ack(self.db, req.id, f"job {job.id} {why}")
        self.say("warning", f"job {job.id} {why}", job.id)


def _step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.split("-")[1])


def follow(ws: Workspace, config: Config, world_size: int) -> None:
    """A rank other than 0: wait for rank 0 to place and plan a job, set up the same job, train in step."""
    from .checkpoints import newest_verified
    from .worker import Hooks, JobSpec, train_job

    order = distributed.broadcast(None)
    if order is None:
        return
    job = jobs.get(ws.db, order["job"])
    run = next(r for r in runs.all_runs(ws.db) if r.id == job.run_id)
    resume, _ = newest_verified(ws.run_dir(run.id))  # rank 0 already set unusable ones aside
    steps_done, position = Placement(run, resume).position_of(job)
    model_path = ws.model_path(config.model.name)
    data = job_data(ws, job, config, model_path)
    spec = JobSpec(run_id=run.id, run_dir=ws.run_dir(run.id), job_id=job.id, fingerprint=job.fingerprint, data=data,
                   epochs=job.epochs, planned_steps=job.planned_steps, start_step=job.start_step,
                   steps_done=steps_done, position=position, identity=run.identity, resume=resume)
    train_job(config, model_path, spec, Hooks(), world_size)


def job_data(ws: Workspace, job: Job, config: Config, model_path: str) -> TokenizedFile:
    """The job's stored file, parsed and tokenized, cached by content, tokenizer and max_length."""
    from .runs import tokenizer_hash
    from .worker import load_tokenizer

    key = f"{job.fingerprint}:{tokenizer_hash(model_path) or model_path}"  # a hub id stands for its tokenizer
    return tokenize_cached(Path(job.stored), job.file, load_tokenizer(model_path), config.training.max_length,
                           ws.data / "tokenized", key)
