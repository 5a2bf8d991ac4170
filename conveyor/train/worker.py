"""The worker: trains exactly one claimed job, as a recipe: setup → train → checkpoint → record.

The daemon claims a job (compare-and-set) and hands its id and claim to a Worker, which runs the same way in
the daemon's process (`conveyor train`, `run --drain`) and in a worker process (`conveyor run`, torchrun).
How it ended is one Outcome (report.py), which is also the process's exit code.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

from .. import faults, overrides, testhooks
from ..config import Config
from ..data import holdout, replay
from ..data import probe as probes
from ..data.chat import load_tokenizer
from ..data.formats import PAIR, PREFERENCE_FORMATS, TokenizedFile, parse_file, tokenize_file
from ..data.plan import Position, examples_per_step, fresh, require_steps
from ..data.tokenized import prune as prune_tokenized
from ..data.tokenized import tokens_of
from ..errors import CheckpointError, ConveyorError, DataError, NonFiniteError, PlanError
from ..fingerprint import short
from ..store import checkpoints as ck
from ..store import controls, jobs, ledger, runs, series, versions
from ..store.controls import Context, Effect
from ..store.database import log_event, transaction
from ..store.jobs import Conflict, Job, JobState
from ..store.workspace import Workspace
from . import distributed, memory
from .jobdata import data_key, held_out_jobs, job_data, replay_pool, replay_sources
from .report import Outcome, Reporter

GATE = "eval.gate"  # who holds the queue after a regression (the daemon reads it)


@dataclass
class Setup:
    job: Job
    run: runs.Run
    resume: ck.Checkpoint | None
    data: TokenizedFile
    start: Position
    open_jobs: list[Position]
    pool: object | None = None  # replay.Pool of the earlier jobs' examples this job replays
    method: str | None = None  # a preference job's method as it began (Worker._method), None: from the settings


def follow_order(setup: Setup, db) -> dict:
    """What rank 0 tells the other ranks: the same segment, from the same checkpoint, with the database rows they
    need (the job, the jobs it replays, the run's identity), so that they never open the database."""
    start = setup.start
    return {"job": setup.job, "run": setup.run.id, "identity": setup.run.identity, "start": start.to_json(),
            "open": [p.to_json() for p in setup.open_jobs],
            "resume": str(setup.resume.path) if setup.resume else None,
            "replayed": [jobs.get(db, j) for j in dict.fromkeys(start.replay_sources) if j != replay.PROBE]
            if start.replay_count else [],
            # The probe's base answers, tokenized, where the job rehearses them: the other ranks cannot record them.
            "probe": next((part for source, part in setup.pool.parts if source == replay.PROBE), None)
            if setup.pool is not None else None,
            "method": setup.method, "reference": recorded_reference(setup)}


def recorded_reference(setup: Setup) -> dict | None:
    """A preference job's reference as recorded on the job, or in its checkpoint's manifest when the job row has lost
    it (a database rebuilt by `doctor --repair`)."""
    if setup.job.reference or setup.resume is None or setup.resume.manifest.job.job_id != setup.job.id:
        return setup.job.reference
    return setup.resume.manifest.hyperparameters.get("reference")


class Worker:
    """Trains one claimed job; `stop_reason` (set by a signal handler) makes it stop warm after the step."""

    def __init__(self, ws: Workspace, config: Config, job_id: int, claim: str, reporter: Reporter | None = None):
        self.ws, self.db, self.config = ws, ws.db, config
        self.job_id, self.claim = job_id, claim
        self.reporter = reporter or Reporter()
        self.world_size = 1
        self.stop_reason: str | None = None
        self.request: controls.Request | None = None  # the stop or skip being acted on
        self.model_path = ws.model_path(config.model.name)
        self._planned_pool: tuple[tuple[int, ...], object] | None = None  # (sources, pool) _replay_plan built
        self._probe_found: tuple[int, object] | None = None  # (job id, its probe): looked up and said once

    @cached_property
    def tokenizer(self):
        """The model's tokenizer with data.chat_template applied: loaded once for the job's data, its held-out
        sets, the earlier jobs it replays and eval.file."""
        return load_tokenizer(self.model_path, self.config.data.chat_template, self.ws.root)

    def run(self) -> Outcome:
        """Train the job to its planned end or a requested stop, record what happened; never raises for the job."""
        self.world_size = distributed.world()  # torchrun decides; planning and the manifest follow it
        released = False
        try:
            setup = self.setup()
            if isinstance(setup, Outcome):
                return setup
            distributed.broadcast(follow_order(setup, self.db))  # the other ranks (if any) set up the same segment
            released = True
            return self.record(setup, self.train(setup))
        except (DataError, PlanError) as e:
            return self._fail(str(e))
        except CheckpointError as e:
            if faults.is_disk_full(e):
                return self._disk_full(e)
            self.say("error", f"job {self.job_id} stopped: {e}", self.job_id)
            return Outcome.CHECKPOINT_ERROR
        except Conflict as e:
            self.say("warning", f"worker for job {self.job_id}: {e}", self.job_id)
            return Outcome.NOT_MINE
        except NonFiniteError as e:  # the settings, not the job: the job stays as the database has it, as for OOM
            self.say("error", str(e), self.job_id)
            return Outcome.NOT_FINITE
        except Exception as e:
            if faults.is_disk_full(e):  # a tokenized array, the database, the log: wherever the write was
                return self._disk_full(e)
            if not memory.is_oom(e):
                raise
            text = memory.oom_message(self.config, self.job_id, e)
        finally:
            if not released:
                distributed.broadcast(None)  # nothing to train: the other ranks (if any) exit
        # Out of memory. Outside the except block the failed step's frames (model, activations) are unreferenced.
        # The job stays as the database has it (running, under this claim); the daemon puts it back at its
        # newest checkpoint, as after a death, but does not retry it.
        memory.release()
        self.say("error", text, self.job_id)
        return Outcome.OUT_OF_MEMORY

    def _disk_full(self, e: BaseException) -> Outcome:
        """The disk filled up: the job stays as the database has it (running, under this claim) and the daemon
        puts it back at its newest checkpoint once there is room. Said where it can be (the database may be full)."""
        text = f"job {self.job_id} stopped: " + (str(e) if isinstance(e, CheckpointError) else
                                                  faults.disk_full_message(self.ws.root, f"a write ({e})"))
        self.reporter.message("error", text)
        with contextlib.suppress(Exception):
            log_event(self.db, "error", "disk", text, self.job_id)
        return Outcome.DISK_FULL

    # setup ---------------------------------------------------------------------------------------
    def setup(self) -> Setup | Outcome:
        job = jobs.get(self.db, self.job_id)
        if job.state != JobState.RUNNING or job.claim != self.claim:
            raise Conflict(f"job {job.id} is {job.state.value}, not running under this worker's claim")
        if job.overrides:  # `conveyor add --set`: this job's own settings, kept with it (a resume keeps them)
            self.say("info", f"job {job.id} trains with {overrides.describe(job.overrides)} (set for this job; "
                     "conveyor.toml's for the others)", job.id)
        preferring = job.format in PREFERENCE_FORMATS
        self.config = overrides.for_job(self.config, job.overrides, preferring)
        if preferring and "training.learning_rate" not in (job.overrides or {}):
            self.say("info", f"job {job.id} is a {job.format} file: it trains at training.preference_learning_rate "
                     f"= {self.config.training.learning_rate:g} (`--set training.learning_rate=…` for this job "
                     "alone)", job.id)
        run = runs.active(self.db)
        resume, _ = ck.newest_verified(self.ws.run_dir(run.id))  # the daemon set unusable ones aside
        if resume is not None and resume.step != run.global_step:
            raise Conflict(f"{run.id} is at step {run.global_step} but its newest checkpoint is {resume.path.name}; "
                           "the daemon reconciles before the next claim")
        if job.format in PREFERENCE_FORMATS and self.config.distributed.strategy == "fsdp":
            raise PlanError(f"job {job.id} is a {job.format} file, and preference and feedback jobs do not train "
                            "under distributed.strategy = \"fsdp\" yet (their reference would be computed across "
                            "shards); train it under \"ddp\" (the checkpoints convert), or remove the job")
        data = self.held_out(job, run, resume, self.prepare(job))
        start = self.position(job, run, resume, data)
        if start.steps_done == 0 and self._duplicate(job, run):
            return Outcome.SKIPPED
        # A job failed mid-way (e.g. its stored copy no longer verified) keeps its position too: adding its file
        # again puts it back, and it resumes there (law 2).
        open_jobs = [p for p in (resume.manifest.under_way() if resume else []) if p.job_id != job.id
                     and jobs.get(self.db, p.job_id).state in (JobState.INTERRUPTED, JobState.FAILED)]
        for p in open_jobs:  # a job stopped by a crash, overtaken now: its segment ends here in the ledger
            ledger.close_overtaken(self.db, run.id, p)
        job = self.plan(job, run, start, data)
        setup = Setup(job, run, resume, data, start, open_jobs, self.pool(start, job, run))
        setup.method = self._method(setup)
        return setup

    def prepare(self, job: Job) -> TokenizedFile:
        """Parse and tokenize the stored copy; apply the too-long policy; report exclusions."""
        config = self.config
        data = job_data(self.ws, job, config, self.model_path, self.tokenizer)
        if data.truncated:
            text = (f"{data.truncated} example(s) longer than training.max_length="
                    f"{config.training.max_length} tokens (lines {_lines(data.truncated_lines, data.truncated)})")
            if config.data.too_long == "reject":
                raise DataError(f"{job.file}: {text}; data.too_long = \"reject\". Shorten them or raise max_length")
            self._warn(job, f"{text} were truncated")
        if data.excluded_lines:
            self._warn(job, f"{len(data.excluded_lines)} example(s) lost their whole trainable part to truncation "
                       f"and are not trained (lines {_lines(data.excluded_lines)}); raise training.max_length "
                       "to keep them")
        return data

    def held_out(self, job: Job, run: runs.Run, resume: ck.Checkpoint | None, data: TokenizedFile) -> TokenizedFile:
        """The job's trained examples: all but its held-out set, chosen at its first plan and kept with the job.

        A job already under way when it has no recorded set keeps training all its examples (moving examples out
        of a job in progress would change what its positions mean)."""
        lines = job.holdout
        if lines is None:
            under_way = resume is not None and resume.manifest.position_of(job.id) is not None
            k = 0 if under_way else holdout.count(self.config.eval.holdout, len(data.examples))
            lines = holdout.choose(self.config.training.seed, job.fingerprint, data, k)
            jobs.update(self.db, job.id, expect=JobState.RUNNING, owner=self.claim, holdout=lines)
            job.holdout = lines
            if lines:
                self.say("info", f"job {job.id}: {len(lines)} example(s) held out, never trained, scored at every "
                         f"evaluation as set \"{holdout.set_name(job.id)}\" (lines {_lines(lines)})", job.id)
        parts = holdout.split(data, lines)
        if lines:
            holdout.save(self.ws.data / "holdout", job.id,
                         data_key(self.ws, job, self.config, self.model_path, self.tokenizer), parts.held)
        return parts.trained

    def position(self, job: Job, run: runs.Run, resume: ck.Checkpoint | None, data: TokenizedFile) -> Position:
        """Where the job continues (law 2): its own position in the newest checkpoint's manifest, whatever ran
        since it stopped; a job the manifest does not know has not trained a step."""
        t = self.config.training
        eps = examples_per_step(t.batch_size, t.grad_accum, self.world_size)
        epochs = job.epochs or t.epochs
        known = resume.manifest.position_of(job.id) if resume else None
        if known is None:
            sources, count = self._replay_plan(job, run, len(data.examples) * epochs)
            start = fresh(job.id, job.fingerprint, len(data.examples), epochs, sources, count).begin_segment(
                run.global_step, eps)
        else:
            if known.fingerprint != job.fingerprint or known.examples not in (0, len(data.examples)):
                raise PlanError(f"job {job.id}: {resume.path.name} places it in data {short(known.fingerprint)} "
                                f"with {known.examples} examples, but its file is {short(job.fingerprint)} with "
                                f"{len(data.examples)}; remove the job and add the file again")
            known = replace(known, examples=len(data.examples), epochs=known.epochs or epochs)
            resumed_here = resume.manifest.job.job_id == job.id
            if resumed_here and not ledger.segment_closed(self.db, run.id, job.id, resume.step):
                start = known.replan(eps)  # the same segment goes on
            else:
                start = known.begin_segment(run.global_step, eps)
            self.say("info", f"job {job.id} resumes at global step {run.global_step + 1} from {resume.path.name} "
                     f"(its step {known.steps_done + 1}; epoch {known.epoch + 1}, example {known.position_in_epoch} "
                     "of that epoch's order)", job.id)
        require_steps(start.planned_steps - start.steps_done, len(data.examples), epochs, job.file)
        return start

    def _replay_plan(self, job: Job, run: runs.Run, own_total: int) -> tuple[tuple[int, ...], int]:
        """replay.fraction and replay.rehearsal for a job's first plan: the earlier jobs it draws from (and the
        probe, replay.PROBE, as many times as its share needs) and how many examples it replays."""
        fraction, rehearsal = self.config.replay.fraction, self.config.replay.rehearsal
        if fraction <= 0 and rehearsal <= 0:
            return (), 0
        if job.format in PREFERENCE_FORMATS:
            self.say("info", f"job {job.id} replays nothing: it is a {job.format} file, trained with a preference "
                     "loss over whole answers, which supervised examples cannot join (replay.fraction and "
                     "replay.rehearsal apply to supervised jobs)", job.id)
            return (), 0
        earlier = tuple(replay_sources(self.db, run.id, job.id)) if fraction > 0 else ()
        probe = self._rehearsed(job, run) if rehearsal > 0 else None
        pool = replay_pool(self.ws, self.config, self.model_path, earlier, job.fingerprint, self.tokenizer) \
            if earlier else None
        copies = replay.probe_copies(rehearsal, fraction, pool.size if pool else 0,
                                     len(probe.examples) if probe else 0)
        sources = earlier + (replay.PROBE,) * copies
        if copies:
            pool = replay_pool(self.ws, self.config, self.model_path, sources, job.fingerprint, self.tokenizer,
                               probe=probe)
        self._planned_pool = (sources, pool)
        share = (fraction if earlier and pool else 0) + (rehearsal if copies else 0)
        count = replay.count(share, own_total, pool.size if pool else 0)
        if count:
            drawn = [f"job(s) {', '.join(map(str, earlier))}"] if earlier else []
            drawn += ["the probe's base answers (self-rehearsal, shown as job 0)"] if copies else []
            self.say("info", f"job {job.id} replays {count} example(s) from {' and '.join(drawn)} ({pool.size} in "
                     f"the pool) between its own {own_total} (replay.fraction = {fraction}, replay.rehearsal = "
                     f"{rehearsal})", job.id)
        else:
            self.say("info", f"job {job.id}: nothing to replay yet (no earlier job of {run.id} is done)", job.id)
        return (sources, count) if count else ((), 0)

    def pool(self, start: Position, job: Job, run: runs.Run):
        """The pool the job replays from: the one its first plan just built, or rebuilt from its position's sources."""
        if not start.replay_count:
            return None
        if self._planned_pool and self._planned_pool[0] == start.replay_sources:
            return self._planned_pool[1]
        probe = self._rehearsed(job, run) if replay.PROBE in start.replay_sources else None
        return replay_pool(self.ws, self.config, self.model_path, start.replay_sources, start.fingerprint,
                           self.tokenizer, probe=probe)

    def _rehearsed(self, job: Job, run: runs.Run) -> TokenizedFile | None:
        """The probe's prompts answered by the base model, as examples (self-rehearsal); the answers are recorded
        here, from the base model's folder, if none are kept yet. None (said on the job) without a probe."""
        probe = self._probe(job, run)
        if probe is None:
            self._warn(job, "replay.rehearsal needs a probe to rehearse (eval.probe; \"auto\" gives none for the "
                       "random-weight tiny and small, or for a model without a chat template): nothing is rehearsed; "
                       "set eval.probe = \"general\" or a file")
            return None
        if probe.answers is None:
            from .evaluation import Evaluator, base_answers, load_base  # torch: only when answers are recorded here
            from .precision import DTYPES  # as above

            self.say("info", f"job {job.id}: recording the base model's answers to the probe ({probe.source}), once "
                     "for the run", job.id)
            evaluator = Evaluator({}, None, 1, [], self.config.eval.max_new_tokens, self.tokenizer)
            dtype = DTYPES[self.config.model.precision]
            probes.save(probe, base_answers(evaluator, lambda: load_base(self.model_path, dtype), probe.prompts))
        examples = probes.examples(self.tokenizer, probe.prompts, probe.answers, self.config.training.max_length)
        return TokenizedFile(examples)

    def plan(self, job: Job, run: runs.Run, start: Position, data: TokenizedFile) -> Job:
        """Record the job's step range (law 1) under this worker's claim."""
        jobs.update(self.db, job.id, expect=JobState.RUNNING, owner=self.claim, run_id=run.id, epochs=start.epochs,
                    examples=start.examples, planned_steps=start.planned_steps, start_step=start.start_step,
                    end_step=start.end_step, steps_done=start.steps_done, position=start.position,
                    segment_start=start.segment_start, tokens=data.tokens, truncated=data.truncated,
                    excluded=data.excluded_lines)
        replayed = f" + {start.replay_count} replayed" if start.replay_count else ""
        log_event(self.db, "info", "planned", f"job {job.id}: {start.examples} examples × {start.epochs} epoch(s)"
                  f"{replayed} = "
                  f"{start.planned_steps} steps; steps {start.steps_done + 1}–{start.planned_steps} at global steps "
                  f"{start.last_step + 1}–{start.end_step}", job.id)
        return jobs.get(self.db, job.id)

    def _duplicate(self, job: Job, run: runs.Run) -> bool:
        row = self.db.execute(
            "SELECT id, file, start_step, end_step FROM jobs WHERE run_id = ? AND fingerprint = ? AND state = 'done'"
            " AND id != ? ORDER BY id LIMIT 1", (run.id, job.fingerprint, job.id)).fetchone()
        if row is None:
            return False
        earlier = (f"same bytes ({short(job.fingerprint)}) as job {row['id']} ({row['file']}), "
                   f"trained at steps {row['start_step']}–{row['end_step']} of {run.id}")
        if self.config.data.skip_duplicates:
            reason = f"skipped: {earlier}; data.skip_duplicates = true"
            jobs.transition(self.db, job.id, JobState.SKIPPED, expect=JobState.RUNNING, owner=self.claim,
                            run_id=run.id, error=reason, claim=None)
            self.say("warning", f"job {job.id} ({job.file}) {reason}", job.id)
            return True
        self._warn(job, f"trained again: {earlier} (set data.skip_duplicates = true to skip repeats)")
        return False

    # train ---------------------------------------------------------------------------------------
    def train(self, setup: Setup):
        from .trainer import Hooks, JobSpec, train_segment  # transformers and peft: when a job trains, not before

        spec = JobSpec(run_id=setup.run.id, run_dir=self.ws.run_dir(setup.run.id), data=setup.data,
                       start=setup.start, identity=setup.run.identity, resume=setup.resume,
                       open_jobs=setup.open_jobs, eval_sets=self._eval_sets(setup.run), pool=setup.pool,
                       probe=self._probe(setup.job, setup.run), format=setup.job.format,
                       data_key=data_key(self.ws, setup.job, self.config, self.model_path, self.tokenizer),
                       reference=recorded_reference(setup), method=setup.method)
        job = setup.job
        self.reporter.job_started(job)
        if self.stop_reason:  # a warm stop that came during setup: no step is started
            from .trainer import Trained  # as above

            return Trained(setup.start, self.stop_reason)
        hooks = Hooks(progress=lambda d, p, loss, rate: self.reporter.progress(job, d, p, loss, rate),
                      flush=lambda *rows: self._flush(setup, *rows), peek=self._peek,
                      hold=lambda checkpoint: self._hold(job, checkpoint), say=self.say,
                      warn=lambda text: self._warn(job, text),
                      reference=lambda record: self._reference(job, record))
        return train_segment(self.config, self.model_path, spec, hooks, self.world_size)

    def _method(self, setup: Setup) -> str | None:
        """The method a preference job began with, which it keeps to its end (its reference and its steps were made
        for it); a training.preference changed meanwhile applies to later files, said. None: not begun, or SFT."""
        job, start, resume = setup.job, setup.start, setup.resume
        if job.format not in PREFERENCE_FORMATS or start.steps_done == 0:
            return None
        if resume is not None and resume.manifest.job.job_id == job.id:
            began = resume.manifest.hyperparameters.get("method")
        else:
            began = next((row["method"] for row in reversed(ledger.rows(self.db, setup.run.id))
                          if row["job"] == job.id), None)
        configured = self.config.training.preference if job.format == PAIR else "kto"
        if began in (None, "preference") or began == configured:
            return None
        self._warn(job, f"training.preference is {configured} now, but job {job.id} began as {began}: a job keeps "
                   f"its method to its end (its reference and its {start.steps_done} steps were made for it); "
                   f"{configured} applies to the next preference files")
        return began

    def _reference(self, job: Job, record: dict) -> None:
        """A preference job's reference, made as its first step starts: kept on the job (a resume loads it)."""
        jobs.update(self.db, job.id, expect=JobState.RUNNING, owner=self.claim, reference=record)
        what = "a frozen copy of the adapter" if record["kind"] == "adapter" else \
            "the reference's log-probabilities of every answer, cached"
        self.say("info", f"job {job.id}: its reference is the model at global step {record['step']} ({what}, "
                 f"{record['path']}, sha256 {record['sha256'][:12]})", job.id)

    def _flush(self, setup: Setup, audit, metrics, evals, samples, pos: Position) -> None:
        testhooks.fill_disk("db", pos.last_step, self.ws.root / "conveyor.db")
        ledger.write_steps(self.db, setup.run.id, audit, metrics, evals, samples)
        jobs.update(self.db, setup.job.id, expect=JobState.RUNNING, owner=self.claim, steps_done=pos.steps_done,
                    position=pos.position)
        runs.set_step(self.db, setup.run.id, pos.last_step)

    # record --------------------------------------------------------------------------------------
    def record(self, setup: Setup, trained) -> Outcome:
        """One transaction: the segment's ledger row, the run's step and the job's new state; then answer."""
        pos, job, run = trained.position, setup.job, setup.run
        tokens = tokens_of(setup.data, ledger.segment_counts(self.db, run.id, job.id, pos.segment_start,
                                                            pos.last_step)[1])
        skip = self.request is not None and self.request.action == controls.Action.SKIP
        if pos.finished:
            state, outcome = JobState.DONE, Outcome.DONE
        elif skip:
            state, outcome = JobState.SKIPPED, Outcome.SKIPPED
        else:
            state, outcome = (JobState.INTERRUPTED if pos.steps_done else JobState.QUEUED), Outcome.STOPPED
        extra = {"error": self._skip_reason(job, pos)} if state == JobState.SKIPPED else {}
        if state == JobState.QUEUED:  # stopped before its first step: nothing to record
            jobs.transition(self.db, job.id, state, expect=JobState.RUNNING, owner=self.claim, claim=None,
                            steps_done=0, position=0, start_step=None, end_step=None, segment_start=None)
        else:
            ledger.close_segment(self.db, run.id, job.id, state, pos, expect=JobState.RUNNING, owner=self.claim,
                                 tokens=tokens, method=trained.method, reference=trained.reference, **extra)
        self._announce(jobs.get(self.db, job.id), pos, trained, extra.get("error"))
        if state == JobState.DONE:
            self._gate(job, run, pos.last_step)
        if state in (JobState.DONE, JobState.SKIPPED):
            self._prune_tokenized()
        return outcome

    def _gate(self, job: Job, run: runs.Run, step: int) -> None:
        """eval.gate and its kin: if the job raised an earlier held-out set's loss by more than eval.gate, lowered
        its answers' F1 by more than eval.gate_answers, or left the version's retention (its probe answers' F1
        against the base's) below eval.gate_retention, the version is marked gated and the queue held (nothing is
        deleted)."""
        e = self.config.eval
        version = versions.at_step(self.db, run.id, step)
        if version is None or not (e.gate > 0 or e.gate_answers > 0 or e.gate_retention > 0):
            return
        rises = versions.rises(self.db, version, exclude=holdout.set_name(job.id))
        name = versions.name(version)
        reasons = []
        over = [r for r in rises if r["change"] > e.gate] if e.gate > 0 else []
        if over:
            reasons.append("raised the held-out loss of " + "; ".join(
                f"{r['set']} ({r['file']}) {r['before']:.4f} → {r['after']:.4f} ({r['change']:+.1%})" for r in over) +
                f", more than eval.gate = {e.gate:.0%}")
        dropped = [r for r in rises if "f1_after" in r and r["f1_before"] - r["f1_after"] > e.gate_answers] \
            if e.gate_answers > 0 else []
        if dropped:
            reasons.append("lowered the held-out answers' F1 of " + "; ".join(
                f"{r['set']} ({r['file']}) {r['f1_before']:.2f} → {r['f1_after']:.2f}" for r in dropped) +
                f", by more than eval.gate_answers = {e.gate_answers:.2f}")
        kept = versions.retention(self.db, version) if e.gate_retention > 0 else None
        if e.gate_retention > 0 and kept is None:
            self._warn(job, f"eval.gate_retention = {e.gate_retention:.0%} could not judge {name}: its retention was "
                       f"not measured (eval.probe = {e.probe!r}; \"auto\" measures chat models other than tiny and "
                       "small, so set eval.probe = \"general\" or a file)")
        if kept is not None and kept["f1"] < e.gate_retention:
            reasons.append(f"kept {kept['f1']:.0%} of the base model's answers to the probe (F1), below "
                           f"eval.gate_retention = {e.gate_retention:.0%}")
        if not reasons:
            return
        earlier = (over or dropped or rises or [{}])[0].get("before_version")
        undo = (f"; `conveyor rollback {versions.name(earlier)}` undoes job {job.id} (add --requeue to train it "
                "again later)") if earlier else ""
        text = (f"eval.gate: {name} (job {job.id}, {job.file}) " + "; and ".join(reasons) + f". The queue is "
                f"paused and {name} marked gated; nothing is deleted. `conveyor resume` accepts {name} and goes on"
                + undo)
        with transaction(self.db):
            versions.set_gated(self.db, version, text)
            controls.hold(self.db, GATE, text)
        log_event(self.db, "warning", "gate", text, job.id)
        self.reporter.message("warning", text)

    def _prune_tokenized(self) -> None:
        """Tokenized data of jobs that will not train again goes (it is derived; the stored JSONL stays)."""
        waiting = (JobState.QUEUED, JobState.RUNNING, JobState.INTERRUPTED)
        # With replay on, done jobs' examples are drawn again by later jobs: their tokenized data stays.
        kept = (JobState.DONE,) if self.config.replay.fraction > 0 else ()
        needed = {j.fingerprint for j in jobs.all_jobs(self.db) if j.state in waiting + kept}
        removed = prune_tokenized(self.ws.data / "tokenized", needed)
        if removed:
            log_event(self.db, "info", "message", f"removed tokenized data of {len(removed)} finished job(s)")

    def _announce(self, job: Job, pos: Position, trained, skip_reason: str | None) -> None:
        if job.state == JobState.DONE:
            log_event(self.db, "info", "done", f"job {job.id}: steps {job.start_step}–{job.end_step}", job.id)
            self.reporter.job_finished(job)
            if trained.method != "sft":
                self._preference_summary(job, trained.method)
            return
        if job.state == JobState.SKIPPED:
            text = f"job {job.id} {skip_reason}"
            level = "warning"
        elif pos.steps_done:
            where = f" from {trained.checkpoint.name}" if trained.checkpoint else ""
            text = (f"stopped ({trained.stopped}) after global step {pos.last_step}; job {job.id} resumes at step "
                    f"{pos.last_step + 1} (its step {pos.steps_done + 1} of {pos.planned_steps}){where} on the next "
                    "start, before other jobs of its priority (a higher-priority job may go first; it then resumes "
                    "from its own position after that)")
            level = "info"
        else:
            text = f"stopped ({trained.stopped}) before job {job.id} trained a step; it stays queued"
            level = "info"
        self.say(level, text, job.id)
        if self.request is not None:
            controls.answer(self.db, self.request.id, text, Effect(self.request.action.value))

    def _preference_summary(self, job: Job, method: str) -> None:
        """What a finished preference or feedback job did, in one line: its method and reference, its last step's
        reward margin and accuracy, and its held-out pairs preferred."""
        found = series.preference_job(self.db, job.run_id)
        if found is None or found["id"] != job.id or found["margin"] is None:
            return
        reference = found["reference"]
        against = f" against the model at global step {reference['step']}" if reference else ""
        held = found["held_out"]
        pairs = f"; held-out pairs preferred: {held['preference']:.0%} of {held['examples']}" if held else ""
        self.say("info", f"job {job.id} ({method.upper()}{against}): last step's reward margin {found['margin']:+.3f}, "
                 f"accuracy {found['accuracy']:.0%}{pairs}", job.id)

    def _skip_reason(self, job: Job, pos: Position) -> str:
        req = self.request
        return (f"skipped by {req.who}" + (f": {req.reason}" if req.reason else "")
                + f" after {pos.steps_done} of {pos.planned_steps} steps (global {job.start_step}–{pos.last_step})")

    # controls between optimizer steps ------------------------------------------------------------
    def _peek(self, step: int) -> str | None:
        """Between steps: "pause", a reason to stop now (stop, skip, a signal), or None to go on."""
        for action in testhooks.requests_due(step):
            controls.ask(self.db, controls.Action(action), who=f"test hook at step {step}")
        while self.stop_reason is None:
            req = controls.take(self.db, f"worker of job {self.job_id}")
            if req is None:
                return None
            effect = req.effect(Context.BETWEEN_STEPS)
            if effect == Effect.HOLD:
                self.request = req
                return "pause"
            if effect == Effect.NOTHING:
                controls.answer(self.db, req.id, req.why_nothing(Context.BETWEEN_STEPS))
                continue
            self.request = req
            return f"{req.action.value} requested by {req.who}"
        return self.stop_reason

    def _hold(self, job: Job, checkpoint: Path) -> str | None:
        """Paused after `checkpoint`: wait for resume (None), stop or skip (the reason)."""
        step = ck.step_of(checkpoint)
        pause, self.request = self.request, None
        controls.answer(self.db, pause.id, f"paused job {job.id} at global step {step} (checkpoint "
                        f"{checkpoint.name}); `conveyor resume` continues", Effect.HOLD)
        self.say("info", f"paused by {pause.who} at step {step}", job.id)
        while self.stop_reason is None:
            req = controls.take(self.db, f"worker of job {self.job_id}")
            if req is None:
                time.sleep(0.1)
                continue
            effect = req.effect(Context.PAUSED_IN_JOB)
            if effect == Effect.NOTHING:
                controls.answer(self.db, req.id, req.why_nothing(Context.PAUSED_IN_JOB))
            elif effect == Effect.GO_ON:
                text = f"resumed job {job.id} at step {step + 1}"
                controls.answer(self.db, req.id, text, Effect.GO_ON)
                self.say("info", f"{text} ({req.who})", job.id)
                return None
            else:
                self.request = req
                return f"{req.action.value} requested by {req.who}"
        return self.stop_reason

    # messages ------------------------------------------------------------------------------------
    def say(self, level: str, text: str, job_id: int | None = None, kind: str = "message") -> None:
        log_event(self.db, level, kind, text, job_id)
        self.reporter.message(level, text)

    def _warn(self, job: Job, text: str) -> None:
        jobs.add_warning(self.db, job, text)
        self.say("warning", f"job {job.id} ({job.file}): {text}", job.id)

    def _fail(self, reason: str) -> Outcome:
        jobs.transition(self.db, self.job_id, JobState.FAILED, expect=JobState.RUNNING, owner=self.claim,
                        error=reason, claim=None)
        self.say("error", f"job {self.job_id} failed: {reason}", self.job_id, kind="failed")
        return Outcome.FAILED

    def _eval_sets(self, run: runs.Run) -> dict:
        """The sets scored at each evaluation: eval.file's (if set), then every held-out set of the run's jobs
        that have started, in the order they started; each cut to eval.max_examples."""
        limit = self.config.eval.max_examples
        sets = {}
        validation = self._eval_file()
        if validation is not None:
            sets[holdout.EVAL_FILE] = validation.examples[:limit]
        for job in held_out_jobs(self.db, run.id):
            key = data_key(self.ws, job, self.config, self.model_path, self.tokenizer)
            try:
                held = holdout.load(self.ws.data / "holdout", job.id, key)
            except holdout.AlteredHoldout as e:
                self.say("warning", f"job {job.id}'s held-out set: data/holdout/{e}; it is rebuilt from the job's "
                         "stored copy, so its scores stay those of the examples held out", job.id)
                held = None
            if held is None:  # kept examples missing or changed: rebuilt from the stored file
                held = holdout.split(job_data(self.ws, job, self.config, self.model_path, self.tokenizer),
                                     job.holdout).held
                holdout.save(self.ws.data / "holdout", job.id, key, held)
            sets[holdout.set_name(job.id)] = held[:limit]
        return sets

    def _probe(self, job: Job, run: runs.Run) -> probes.Probe | None:
        """The run's probe (eval.probe) with its kept base answers, verified; a probe the setting cannot give, or
        kept answers that were changed, is said on the job (changed answers are recorded again where possible).
        Looked up once per job (rehearsal and retention share it)."""
        if self._probe_found is None or self._probe_found[0] != job.id:
            self._probe_found = (job.id, self._find_probe(job, run))
        return self._probe_found[1]

    def _find_probe(self, job: Job, run: runs.Run) -> probes.Probe | None:
        config = self.config
        try:
            chosen = probes.choose(config.eval.probe, self.ws.root, config.model.name,
                                   bool(self.tokenizer.chat_template))
        except ConveyorError as e:
            self._warn(job, f"retention not measured: {e}")
            return None
        if chosen is None:
            return None
        prompts, source = chosen
        probe = probes.Probe(prompts, source, probes.key(prompts, run.identity, config.eval.max_new_tokens),
                             self.ws.data / "probe")
        try:
            probe.answers = probes.load(probe)
        except probes.AlteredProbe as e:
            self._warn(job, f"the probe's kept base answers, data/probe/{e}; they are not used, and are "
                       "recorded again from the base model where it is at hand")
        return probe

    def _eval_file(self) -> TokenizedFile | None:
        """The validation set, tokenized and masked exactly like training data; None if not configured."""
        config = self.config
        if not config.eval.file:
            return None
        path = Path(config.eval.file)
        path = path if path.is_absolute() else self.ws.root / path
        try:
            return tokenize_file(parse_file(path, f"eval.file {path.name}"), self.tokenizer, config.training.max_length,
                                 f"eval.file {path.name}")
        except (DataError, OSError) as e:
            self.say("warning", f"no evaluation loss: {e}")
            return None


def _lines(lines: list[int], total: int | None = None) -> str:
    total = len(lines) if total is None else total
    more = f" and {total - 20} more" if total > 20 else ""
    return ", ".join(map(str, lines[:20])) + more
