"""The Hugging Face Trainer glue: trains one planned job segment (PEFT LoRA or full) from its exact position.

The Trainer is the engine; conveyor owns step numbers, data order, positions and checkpoints. The callback
only forwards the Trainer's events to small parts with one concern each: step accounting (what was fed, the
position, the audit), metrics, checkpoints (weights, optimizer, scheduler, RNG, manifest) and controls.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import inspect
import math
import os
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import Dataset

from .. import testhooks
from ..config import Config
from ..data.chat import load_tokenizer
from ..data.formats import IGNORE, PAIR, TokenizedFile
from ..data.holdout import EVAL_FILE
from ..data.models import quiet_libraries
from ..data.plan import JobOrder, Position, examples_per_step
from ..data.probe import RETENTION
from ..data.replay import Layout
from ..errors import NonFiniteError, PlanError
from ..store import checkpoints as ck
from ..store import manifest as mf
from . import distributed, memory, packing, precision, sharding
from . import preference as pref
from . import reference as refs
from .evaluation import Evaluator, add_retention
from .precision import build_model
from .training_state import (
    pruned_moments,
    restore_optimizer,
    restore_rng,
    rng_state,
    save_checkpoint,
    save_sharded_checkpoint,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@dataclass
class JobSpec:
    """Everything the Trainer glue needs about one job segment."""
    run_id: str
    run_dir: Path
    data: TokenizedFile
    start: Position  # the job's position at the start of this segment (begin_segment already applied)
    identity: dict
    resume: ck.Checkpoint | None  # None: the run starts from the base model
    open_jobs: list[Position]  # the run's other jobs stopped mid-way: every checkpoint records them
    # Named evaluation sets (eval.file's, each job's held-out set), tokenized and masked like training data.
    eval_sets: dict = field(default_factory=dict)
    pool: object | None = None  # replay.Pool: earlier jobs' examples this job replays (start.replay_count of them)
    probe: object | None = None  # probe.Probe: what the base model knew (its answers None until recorded)
    format: str | None = None  # the job file's format: pairs and feedback train with a preference loss
    data_key: str = ""  # what the job's tokenized examples depend on (jobdata.data_key): keys the reference cache
    reference: dict | None = None  # a preference job's reference as recorded when its first step started
    method: str | None = None  # a preference job's method as it began (a job keeps it; None: from the settings)

    @property
    def job_id(self) -> int:
        return self.start.job_id


@dataclass
class Hooks:
    """Callbacks from the training loop to the caller (progress display, control, database)."""
    progress: Callable[[int, int, float | None, float], None] | None = None  # (steps_done, planned, loss, ex/s)
    flush: Callable[..., None] | None = None  # (audit, metrics, evals, samples, position)
    # Between steps (rank 0), given the global step: "pause", a reason to stop now, or None to go on.
    peek: Callable[[int], str | None] | None = None
    # After a pause's checkpoint: blocks until resumed (returns None) or stopped/skipped (returns why).
    hold: Callable[[Path], str | None] | None = None
    checkpointed: Callable[[Position], None] | None = None  # a checkpoint of this position verified
    say: Callable[[str, str], None] | None = None  # (level, text)
    warn: Callable[[str], None] | None = None  # a warning about the job, kept with it (status shows it)
    reference: Callable[[dict], None] | None = None  # a preference job's reference, made as its first step starts


@dataclass
class Trained:
    """What a segment did: where the job stands now, and why it stopped early (None: it reached its end)."""
    position: Position
    stopped: str | None = None
    checkpoint: Path | None = None
    method: str = pref.SFT
    reference: dict | None = None


class PlanDataset(Dataset):
    """The job's examples in planned order (its own and replayed ones, replay.Layout), starting at a position:
    item i is plan position start + i (O(1)). Each item names its source as (job, file line).

    With several processes the last step is padded with fully masked one-token fillers (zero loss, zero
    gradient) up to a multiple of batch × processes, so no rank runs dry and no example is repeated (the
    usual even_batches remedy would train the first examples twice).
    """

    def __init__(self, layout, start: int, pad_to: int = 1, pad_id: int = 0):
        self.layout, self.start, self.pad_id = layout, start, pad_id
        real = len(layout) - start
        self.length = -(-real // pad_to) * pad_to if real else 0

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        if self.start + i >= len(self.layout):
            return {"input_ids": [self.pad_id], "labels": [IGNORE], "line": 0}
        item = self.layout[self.start + i]
        ex = item.example
        return {"input_ids": ex.input_ids, "labels": ex.labels, "line": (item.job_id, ex.line)}


class PreferenceDataset(PlanDataset):
    """A preference or feedback job's examples in planned order: each pair with both answers, each feedback answer
    with its label and KTO's KL row (preference.kl_partner), and the cached reference log-probabilities if any."""

    def __init__(self, layout, start: int, kind: str, max_length: int, cache=None, pad_to: int = 1, pad_id: int = 0):
        super().__init__(layout, start, pad_to, pad_id)
        self.kind, self.max_length, self.cache = kind, max_length, cache

    def __getitem__(self, i: int) -> dict:
        position = self.start + i
        if position >= len(self.layout):  # a filler (distributed padding): it weighs nothing
            filler = {"input_ids": [self.pad_id], "labels": [IGNORE], "line": 0}
            return {**filler, pref.REFERENCE_KEY: (0.0, 0.0)} if self.cache is not None else filler
        order, data = self.layout.order, self.layout.data
        epoch, index = order[position]  # preference jobs replay nothing: a position is the job's own
        ex = data.examples[index]
        out = {"input_ids": ex.input_ids, "labels": ex.labels, "line": (self.layout.start.job_id, ex.line),
               "kind": self.kind}
        if self.kind == PAIR:
            out.update(rejected_ids=ex.rejected_ids, rejected_labels=ex.rejected_labels)
        else:
            out.update(label=ex.label, kl=pref.kl_row(ex, data.examples[pref.kl_partner(order, position)],
                                                      self.max_length))
        if self.cache is not None:
            out[pref.REFERENCE_KEY] = self.cache.lookup(epoch, index)
        return out


class AuditingCollator:
    """Makes a micro-batch, padding-free (packing.py) or padded (Hugging Face's DataCollatorForSeq2Seq; pairs and
    feedback: preference.collate), and remembers which lines it fed, in order."""

    def __init__(self, tokenizer, padding_free: bool = False, hidden: int | None = None, varlen: bool = False,
                 preference: str | None = None):
        from transformers import DataCollatorForSeq2Seq

        self.preference, self.pad_id = preference, tokenizer.pad_token_id
        self.pad = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE)
        self.flat = packing.flattening_collator() if padding_free else None
        self.hidden, self.varlen = hidden, varlen  # for packing.worth_it (hidden None: always pack)
        self.fed: deque = deque()  # (job, file line) of each example (0: a filler), in the order they were fed

    def __call__(self, features: list[dict]) -> dict:
        self.fed.extend(f["line"] for f in features)
        if self.preference:
            return pref.collate(features, self.pad_id, self.preference)
        rows = [{"input_ids": f["input_ids"], "labels": f["labels"]} for f in features]
        # Decided by the lengths alone: the same micro-batch gets the same layout on every run and resume.
        if self.flat and packing.worth_it([len(r["input_ids"]) for r in rows], self.hidden, self.varlen):
            return self.flat(rows)
        return self.pad(rows)

    def take(self, n: int) -> list:
        return [self.fed.popleft() for _ in range(n)]


def labelled_only(inputs: dict) -> dict:
    """The micro-batch with its logits asked for only at positions whose next token carries loss: the output layer
    (vocabulary × hidden, a fifth of SmolLM2-135M's weights) and the cross-entropy skip the positions of prompts,
    system and user turns, which carry no loss. On one CPU thread those cost ~1.2 ms a position for SmolLM2-135M, a
    sixth of a LoRA step; leaving out a quarter to three quarters of them saved 6-7% of a step's CPU time. The loss
    is the same sum over the same tokens with the same normalization: the model takes the shifted labels of the kept
    positions (`shift_labels`) in place of shifting `labels` itself, and it leaves out only positions the loss
    ignored anyway (tests/train/test_trainer.py compares losses, gradients and trained weights)."""
    labels = inputs.get("labels")
    if labels is None:
        return inputs
    shifted = torch.nn.functional.pad(labels, (0, 1), value=IGNORE)[..., 1:]
    keep = shifted != IGNORE
    if not bool(keep.any()):  # nothing to learn (a filler's step): the plain forward, the same zero gradients
        return inputs
    return {**inputs, "logits_to_keep": keep, "shift_labels": shifted[keep]}


def computes_labelled_only(model) -> bool:
    """Whether `labelled_only` fits the model: its forward slices hidden states by a boolean `logits_to_keep`
    (transformers' shared slice_logits_to_keep, which a family's own slicing may not do) and takes the standard
    causal-LM loss, which reads `shift_labels`. Any other model computes every position's logits, as before."""
    from transformers.loss.loss_utils import LOSS_MAPPING  # here: this module imports without transformers

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    module = sys.modules.get(getattr(base.forward, "__module__", ""))
    return ("logits_to_keep" in inspect.signature(base.forward).parameters
            and getattr(module, "slice_logits_to_keep", None) is not None
            and getattr(base, "loss_function", None) is LOSS_MAPPING.get("ForCausalLM"))


def _trainer(model, loss: pref.Loss | None = None, **kw):
    """The Hugging Face Trainer, computing logits only where labels are (`labelled_only`) when the model can; with
    `loss`, a preference or feedback job's batches take that loss (evaluation sets keep the token loss)."""
    from transformers import Trainer  # seconds to import: only when a job trains

    only_labelled = computes_labelled_only(model)

    class ConveyorTrainer(Trainer):
        # A preference loss is already the mean over the optimizer step's examples (preference.Loss).
        loss_is_scaled_for_ga = True if loss is not None else None

        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            if loss is not None and pref.is_preference(inputs):
                value = loss(model, inputs)
                return (value, None) if return_outputs else value
            if only_labelled and self.label_smoother is None and self.compute_loss_func is None:
                inputs = labelled_only(inputs)  # the label smoother and a loss function would read all the logits
            return super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)

        def log(self, logs: dict, *a, **kwargs):
            # A preference step's margin and accuracy, under TRL's names, for the callback and every report_to
            # integration (they all read these logs).
            if loss is not None and "loss" in logs:
                logs.update({METRIC_KEYS[key]: value for key, value in loss.tally.take().items()})
            return super().log(logs, *a, **kwargs)

    return ConveyorTrainer(model=model, **kw)


METRIC_KEYS = {"margin": "rewards/margins", "accuracy": "rewards/accuracies"}  # TRL's names in the Trainer's logs


def libraries() -> dict:
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


class _JobCallback:
    """Hooks into the Trainer's loop: step accounting and audit, metrics, checkpoints, RNG restore, controls."""

    def __init__(self, spec: JobSpec, config: Config, collator: AuditingCollator, world_size: int, layout,
                 padded_len: int, hooks: Hooks):
        self.spec, self.config, self.collator, self.layout, self.hooks = spec, config, collator, layout, hooks
        self.main = distributed.is_main()
        self.sharded = sharding.sharded_checkpoints(config)  # every rank writes its shards of each checkpoint
        self.padded_len = padded_len  # items in the data set including fillers
        self.consumed = 0
        self.eps = examples_per_step(config.training.batch_size, config.training.grad_accum, world_size)
        self.world_size = world_size
        self.pos = spec.start
        self.audit: list = []
        self.metrics: list = []
        self.evals: list = []
        self.samples: list = []
        self.evaluator = None  # set by train_segment when a validation set is configured
        self.loss: pref.Loss | None = None  # a preference or feedback job's loss (train_segment)
        self.preference: dict = {}  # the job's method, beta and reference, recorded in every manifest
        self.said_over_budget = False  # answer scoring skipped for its budget: said once per segment
        self.trainer = None
        self.pending: dict = {}
        self.stopped: str | None = None
        self.last_checkpoint: Path | None = None
        self.non_finite: str | None = None  # what the last logged step showed that is inf or nan (on_log)
        # Mid-job: continue the RNG stream the checkpoint saved (dropout, etc.), as an uninterrupted run would.
        self.restore_rng = spec.resume is not None and spec.start.steps_done > 0
        self.t_step = time.perf_counter()
        self.t_flush = float("-inf")  # a segment's first step is written at once (status shows it training)

    # Trainer callback protocol -------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kw):
        self.t_step = time.perf_counter()  # the first step's time starts with the loop, not the Trainer's setup

    def on_step_begin(self, args, state, control, **kw):
        if self.loss is not None:
            self.loss.step_examples = self.pos.next_step_examples(self.eps)
        if self.restore_rng:
            restore_rng(self.spec.resume.path, distributed.rank(), self.world_size, self.hooks.say)
            self.restore_rng = False

    def on_step_end(self, args, state, control, **kw):
        n = self.pos.next_step_examples(self.eps)
        fed, lines, replayed, tokens = self._planned(n)
        self._check_fed(fed)
        self.pos = self.pos.after_step(self.eps)
        step = self.pos.last_step
        self.audit.append((step, self.spec.job_id, lines, replayed))
        now = time.perf_counter()
        self.pending = {"step": step, "job_id": self.spec.job_id, "tokens": tokens, "examples": n,
                        "step_time": now - self.t_step}
        self.t_step = now
        if self.main:
            testhooks.after_step(step)
        last = self.pos.finished
        every = self.config.eval.every_steps
        # Rank 0's alone, but under fsdp on every rank (each forward gathers the shards of all; train_segment).
        if self.evaluator is not None and (last or (every and step % every == 0)):
            self._evaluate(step, kw["model"])
        # Decided on rank 0, the same on every rank: what a person asked for, then whether to checkpoint.
        action = distributed.broadcast(None if last or not self.hooks.peek else self.hooks.peek(step))
        checkpoint = bool(action or last or step % self.config.training.save_every == 0)
        self._refuse_non_finite(step, kw["model"] if checkpoint else None)
        if checkpoint:
            self._checkpoint_everywhere(step, kw, last)
        if action == "pause":
            action = distributed.broadcast(self.hooks.hold(self.last_checkpoint) if self.hooks.hold else None)
        if action:
            self.stopped = action
            control.should_training_stop = True
        return control

    def _refuse_non_finite(self, step: int, model) -> None:
        """Stop before anything non-finite is kept: a step whose logged loss or gradient norm was inf or nan (the
        one before this, logged after its step ended), or, before a checkpoint (`model` given), a trainable weight
        that is. Every rank raises alike (a sharded model's weights are checked on every rank)."""
        problem = self.non_finite
        if problem is None and model is not None:
            local = non_finite_weights(model)
            seen = distributed.gather(local)
            problem = distributed.broadcast(next((p for p in seen if p), None) if self.main else None)
        if problem is None:
            return
        kept = self.last_checkpoint or (self.spec.resume.path if self.spec.resume else None)
        raise NonFiniteError(
            f"job {self.spec.job_id} stopped at global step {step}: {problem}. Training on would only spread nan "
            f"through the weights, so nothing after {'checkpoint ' + kept.name if kept else 'the start'} is kept "
            f"and the job resumes from there. Settings to look at: training.learning_rate "
            f"({self.config.training.learning_rate:g}), training.weight_decay ({self.config.training.weight_decay:g}),"
            f" training.max_grad_norm ({self.config.training.max_grad_norm:g}), training.mixed_precision "
            f"({self.config.training.mixed_precision}); change them (`conveyor add --set` or conveyor.toml), then "
            "`conveyor resume` (a running daemon) or `conveyor run --drain` / `conveyor train`", step)

    def _check_fed(self, lines: list[tuple[int, int]]) -> None:
        """What the ranks' data loaders really fed this step must be exactly the planned (job, line)s (law 2)."""
        per_rank = min(self.eps, self.padded_len - self.consumed) // self.world_size  # fillers included
        self.consumed += per_rank * self.world_size
        fed = self.collator.take(per_rank)
        everyone = distributed.gather([line for line in fed if line])  # 0 marks a filler
        if self.main:
            got = [line for rank_lines in everyone for line in rank_lines]
            if sorted(got) != sorted(lines) or (self.world_size == 1 and got != lines):
                raise RuntimeError(f"the Trainer fed lines {got} where conveyor planned {lines}; this is a bug")

    def _planned(self, n: int) -> tuple[list[tuple[int, int]], list[int], list[list[int]], int]:
        """What this optimizer step trains on all ranks, from the next n plan positions: every (job, line) in
        order, the job's own lines, the replayed [job, line]s, and the tokens."""
        at = self.pos.position
        items = [self.layout[p] for p in range(at, at + n)]
        return ([(i.job_id, i.example.line) for i in items], [i.example.line for i in items if not i.replayed],
                [[i.job_id, i.example.line] for i in items if i.replayed],
                sum(i.example.tokens for i in items))

    def _checkpoint_everywhere(self, step: int, kw: dict, last: bool) -> None:
        states = distributed.gather(rng_state())  # each rank's RNG, so a resume continues every stream
        manifest = None
        if self.main:
            self._flush()
            manifest = mf.Manifest(run_id=self.spec.run_id, global_step=step, job=self.pos, job_end=last,
                                   identity=self.spec.identity, open_jobs=self.spec.open_jobs,
                                   hyperparameters={**mf.hyperparameters(self.config, self.world_size),
                                                    **self.preference},
                                   libraries=libraries(),
                                   sharded=sharding.layout(self.world_size) if self.sharded else None)
        if self.sharded:  # every rank writes its shards; rank 0 seals
            path = save_sharded_checkpoint(self.spec.run_dir, step, manifest, kw["model"], kw["optimizer"],
                                           kw["lr_scheduler"], states, self.config.training)
        elif self.main:
            path = save_checkpoint(self.spec.run_dir, manifest, kw["model"], kw["optimizer"], kw["lr_scheduler"],
                                   states, self.config.training)
        if self.main:
            self.last_checkpoint = path
            if self.hooks.checkpointed:
                self.hooks.checkpointed(self.pos)

    def on_log(self, args, state, control, logs=None, **kw):
        if not self.pending or not logs or "loss" not in logs:
            return
        row = {**self.pending, "loss": logs.get("loss"), "learning_rate": logs.get("learning_rate"),
               "grad_norm": logs.get("grad_norm"),
               **{column: logs.get(key) for column, key in METRIC_KEYS.items()}}
        bad = [f"its {name} was {row[key]}" for key, name in (("loss", "loss"), ("grad_norm", "gradient norm"))
               if isinstance(row[key], float) and not math.isfinite(row[key])]
        if bad and self.non_finite is None:
            self.non_finite = f"step {row['step']}: " + " and ".join(bad)
        self.pending = {}
        self.metrics.append(row)
        if self.hooks.progress:
            self.hooks.progress(self.pos.steps_done, self.pos.planned_steps, row["loss"],
                                row["examples"] / max(row["step_time"], 1e-9))
        if time.perf_counter() - self.t_flush > 2.0:
            self._flush()

    def _evaluate(self, step: int, model) -> None:
        held = [name for name in self.evaluator.sets if name != EVAL_FILE]
        needed = self.evaluator.answer_tokens([n for n in held if n != RETENTION]) + \
            len(self.evaluator.sets.get(RETENTION, ())) * self.config.eval.max_new_tokens
        answering = needed <= self.config.eval.answer_budget
        if not answering and not self.said_over_budget and self.hooks.say:
            self.said_over_budget = True
            self.hooks.say("warning", f"answers not scored: {len(held)} held-out set(s) × eval.answers = "
                           f"{self.config.eval.answers} × eval.max_new_tokens = {self.config.eval.max_new_tokens} "
                           f"could generate {needed} tokens per evaluation, above eval.answer_budget = "
                           f"{self.config.eval.answer_budget}; losses are scored. Lower eval.answers or raise "
                           "eval.answer_budget")
        for name, result in self.evaluator.losses(self.trainer, model).items():
            row = {"step": step, "job_id": self.spec.job_id, "examples": result.examples}
            if name == EVAL_FILE:
                self.evals.append({**row, "eval_loss": result.loss})
                continue
            if not result.examples:  # a feedback set of bad answers only: nothing to score the loss on
                continue
            scores = self.evaluator.answers(model, self.evaluator.sets[name], every=name == RETENTION) \
                if answering else None
            examples = self.evaluator.sets[name]
            if examples and examples[0].rejected_ids is not None:  # held-out pairs: which answer is more likely
                row["preference"] = pref.preference_accuracy(model, examples, self.config.eval.batch_size,
                                                             self.collator.pad_id)[0]
            self.evals.append({**row, "name": name, "loss": result.loss, "tokens": result.tokens,
                               **(scores.record() if scores else {})})
        self.samples += [{"step": step, "prompt": p, "output": o} for p, o in self.evaluator.samples(model)]

    def _flush(self) -> None:
        if self.hooks.flush:
            self.hooks.flush(self.audit, self.metrics, self.evals, self.samples, self.pos)
        self.audit, self.metrics, self.evals, self.samples = [], [], [], []
        self.t_flush = time.perf_counter()


def non_finite_weights(model) -> str | None:
    """The first trainable weight holding inf or nan, in words (None: all finite). Trainable only: a frozen base
    does not change."""
    for name, param in model.named_parameters():
        local = param.to_local() if hasattr(param, "to_local") else param  # a DTensor: this rank's shard
        if param.requires_grad and not bool(torch.isfinite(local.detach()).all()):
            return f"the weight {name} holds inf or nan after the step"
    return None


def _trainer_callback(inner: _JobCallback):
    from transformers import TrainerCallback

    class Adapter(TrainerCallback):
        # Only forwards the events conveyor uses; keeps the Trainer import out of module import time.
        def on_train_begin(self, *a, **kw):
            return inner.on_train_begin(*a, **kw)

        def on_step_begin(self, *a, **kw):
            return inner.on_step_begin(*a, **kw)

        def on_step_end(self, *a, **kw):
            return inner.on_step_end(*a, **kw)

        def on_log(self, *a, **kw):
            return inner.on_log(*a, **kw)

    return Adapter()


def training_arguments(config: Config, output_dir: Path, max_steps: int, run_dir: Path | None = None,
                       job_id: int = 0):
    from transformers import TrainingArguments

    t = config.training
    if "tensorboard" in config.report.report_to:  # transformers 5 reads the folder from the environment
        # One TensorBoard run per job: the integrations count the Trainer's job-local steps, not global ones.
        os.environ["TENSORBOARD_LOGGING_DIR"] = str((run_dir or output_dir) / "tensorboard" / f"job-{job_id:05d}")
    # Without use_cpu accelerate does not shard data across CPU processes: each would train everything.
    cpu_ranks = {"use_cpu": True, "ddp_backend": "gloo"} if distributed.active() and not torch.cuda.is_available() \
        else {}
    return TrainingArguments(
        **{**precision.trainer_arguments(config, TrainingArguments), **cpu_ranks},
        output_dir=str(output_dir), per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum, learning_rate=t.learning_rate, weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm, warmup_steps=t.warmup_steps, max_steps=max_steps, num_train_epochs=1,
        train_sampling_strategy="sequential",  # conveyor already laid out the order; the Trainer must not reshuffle
        ddp_timeout=int(distributed.TIMEOUT.total_seconds()), ddp_find_unused_parameters=False,
        save_strategy="no", logging_steps=1, report_to=list(config.report.report_to) or "none", seed=t.seed,
        disable_tqdm=True,
        remove_unused_columns=False, dataloader_pin_memory=False, logging_nan_inf_filter=False,
    )


def train_segment(config: Config, model_path: str, spec: JobSpec, hooks: Hooks | None = None,
                  world_size: int = 1) -> Trained:
    """Train one job from spec.start to its planned end (or a requested stop); returns where it stands."""
    from transformers import PrinterCallback

    quiet_libraries()
    hooks = hooks or Hooks()
    # The one tokenizer, as the worker's: data.chat_template applied (relative to the workspace, whose runs/<id> is
    # spec.run_dir), so evaluation samples are asked as the data was rendered and as generate asks.
    tokenizer = load_tokenizer(model_path, config.data.chat_template, spec.run_dir.parent.parent)
    model = _model(config, model_path, spec, world_size)
    t = config.training
    start = spec.start
    order = JobOrder(t.seed, start.fingerprint, start.examples, start.epochs)
    layout = Layout(start, spec.data, order, spec.pool)
    method = spec.method or pref.method_of(spec.format, t)
    record, cache = _reference(config, model_path, spec, model, order, tokenizer, hooks, method) \
        if pref.uses_reference(method) else (None, None)
    pad_to = t.batch_size * world_size if world_size > 1 else 1
    if method == pref.SFT:
        dataset = PlanDataset(layout, start.position, pad_to=pad_to, pad_id=tokenizer.pad_token_id)
    else:  # answers are compared whole: padded rows, never packed
        dataset = PreferenceDataset(layout, start.position, spec.format, t.max_length, cache, pad_to=pad_to,
                                    pad_id=tokenizer.pad_token_id)
    packed = method == pref.SFT and _padding_free(config, model, spec, hooks)
    collator = AuditingCollator(tokenizer, padding_free=packed,
                                hidden=getattr(model.config, "hidden_size", None),
                                varlen=config.model.attn_implementation == "flash_attention_2",
                                preference=spec.format if method != pref.SFT else None)
    inner = _JobCallback(spec, config, collator, world_size, layout, len(dataset), hooks)
    if method != pref.SFT:
        pref.disable_dropout(model)
        inner.loss = pref.Loss(method, t, world_size)
        inner.preference = {"method": method, "beta": t.beta, **({"reference": record} if record else {})}
        if method == pref.KTO:
            inner.preference.update(desirable_weight=t.desirable_weight, undesirable_weight=t.undesirable_weight)
    remaining = start.planned_steps - start.steps_done
    trainer = _trainer(model, loss=inner.loss,
                       args=training_arguments(config, spec.run_dir / "trainer", remaining, spec.run_dir,
                                                      spec.job_id),
                       train_dataset=dataset, data_collator=collator, processing_class=tokenizer,
                       callbacks=[_trainer_callback(inner)])
    trainer.remove_callback(PrinterCallback)  # conveyor shows progress itself
    inner.trainer = trainer
    if sharding.sharded_training(config) and world_size > 1:  # every rank evaluates: a forward needs all shards
        spec.eval_sets = distributed.broadcast(spec.eval_sets if distributed.is_main() else None)
    if spec.probe is not None and sharding.sharded_training(config):
        if hooks.warn and distributed.is_main():
            hooks.warn("retention (eval.probe) is not measured with distributed.strategy = \"fsdp\": the base "
                       "answers and each version's would be generated across shards; measure it under ddp")
        spec.probe = None
    if spec.eval_sets or spec.probe is not None:
        e = config.eval
        inner.evaluator = Evaluator(spec.eval_sets, collator, e.batch_size, e.sample_prompts, e.max_new_tokens,
                                    tokenizer, e.answers)
        if spec.probe is not None and distributed.is_main():
            base_row = add_retention(inner.evaluator, trainer, model, spec, t.max_length, model_path, hooks.say)
            if base_row is not None:
                inner.evals.append(base_row)
    if distributed.is_main():
        memory.check_fits(config, model, spec.job_id, hooks.say)  # on a GPU only
        if sharding.sharded_checkpoints(config) and world_size == 1 and hooks.say:
            hooks.say("info", "distributed.strategy = \"fsdp\" with one process: nothing to shard across, so the "
                      "whole model trains here; its checkpoints are sharded (DCP) all the same, so the run goes on "
                      "at any number of processes")
        elif sharding.sharded_training(config) and world_size == 1 and hooks.say:
            hooks.say("info", "distributed.strategy = \"fsdp\" with one process: nothing to shard across, so the "
                      "whole base model is held here under the adapter")
    if sharding.sharded_training(config):
        sharding.reshard(model)  # the packing probe's forward left some modules gathered: the optimizer takes shards
        if world_size > 1 and not sharding.sharded_checkpoints(config) and distributed.is_main() and hooks.say:
            sharded, whole = sharding.held(model)
            hooks.say("info", f"job {spec.job_id}: the base model sharded across {world_size} ranks (FSDP2, "
                      f"{sharded} tensors), the adapter whole on every rank ({whole} tensors, its gradients "
                      "averaged); checkpoints hold the adapter as under ddp")
    trainer.create_optimizer()
    trainer.lr_scheduler = restore_optimizer(config, trainer.optimizer, spec.resume.path if spec.resume else None,
                                             spec.start, _same_optimizer(config, spec, hooks), trainer.model)
    with _collector_spared():
        trainer.train()
    inner._flush()  # the last step's metrics arrive after its checkpoint
    if inner.stopped is None and not inner.pos.finished:
        raise RuntimeError(f"the Trainer ran {inner.pos.steps_done - start.steps_done} steps where conveyor "
                           f"planned {remaining}; this is a bug")
    return Trained(inner.pos, inner.stopped, inner.last_checkpoint, method, record)


def _reference(config: Config, model_path: str, spec: JobSpec, model, order: JobOrder, tokenizer, hooks: Hooks,
               method: str) -> tuple[dict, object]:
    """A preference job's reference, the model as the job found it: (its record, the cached log-probabilities of a
    full fine-tune or None). Made when the job's first step starts (rank 0 writes, the others read), loaded and
    verified on every resume (reference.py)."""
    first = spec.start.steps_done == 0
    record = None if first else spec.reference
    if record is None and not first:
        raise PlanError(f"job {spec.job_id} has trained {spec.start.steps_done} steps but no reference is recorded "
                        "for it (a database from before preference jobs?); roll back to the version before it "
                        "(`conveyor rollback`) to train it again from its start")
    main = distributed.is_main()
    step = spec.resume.step if spec.resume is not None else 0
    weights = record["weights"] if record else refs.weights_id(spec.resume, model_path)
    if config.adapter.method != "full":
        folder = refs.copy_folder(spec.run_dir, spec.job_id)
        if first:
            record = distributed.broadcast(
                {"kind": "adapter", "step": step, "weights": weights, "path": f"references/{folder.name}",
                 "sha256": refs.keep_adapter(model, folder)} if main else None)
        refs.load_adapter(model, folder, record, spec.job_id)
        cache = None
    else:
        key = refs.cache_key(spec.data_key, weights, method, order.epochs, config.training.seed,
                             config.model.precision)
        folder = refs.cache_folder(spec.run_dir.parent.parent / "data", key)
        examples = spec.data.examples

        def compute():
            if first:  # the model as loaded is the reference
                return refs.compute_cache(model, examples, order, method, config.eval.batch_size,
                                          tokenizer.pad_token_id, config.training.max_length)
            reference_model = build_model(config, model_path, refs.reference_weights(spec.run_dir, record))
            try:
                return refs.compute_cache(reference_model, examples, order, method, config.eval.batch_size,
                                          tokenizer.pad_token_id, config.training.max_length)
            finally:
                del reference_model
                gc.collect()

        made = refs.cached_logps(folder, record, compute, method == pref.KTO, key, hooks.warn) if main else None
        digest = distributed.broadcast(made[1] if main else None)
        cache = made[0] if main else refs.load_cache(folder)[0]
        if first:
            record = {"kind": "logps", "step": step, "weights": weights, "path": f"data/reference/{folder.name}",
                      "sha256": digest}
        else:
            record = {**record, "sha256": digest}
    if first and main:
        testhooks.failpoint("reference-kept", step)  # kept, not yet recorded: the next start makes it again
        if hooks.reference:
            hooks.reference(record)
    return record, cache


def _model(config: Config, model_path: str, spec: JobSpec, world_size: int):
    """The model as the checkpoint left it (or the base), held as distributed.strategy says; a checkpoint written
    under the other strategy is converted (sharding.build)."""
    if sharding.sharded_training(config) or (spec.resume is not None and spec.resume.manifest.sharded):
        return sharding.build(config, model_path, spec.resume, world_size)
    return build_model(config, model_path, spec.resume.path if spec.resume else None)


def _padding_free(config: Config, model, spec: JobSpec, hooks: Hooks) -> bool:
    """training.packing, if this model computes packed rows right (checked once per run and settings, not assumed;
    packing.verdict); a fallback is said."""
    if not config.training.packing:
        return False
    key = {"identity": spec.identity, "attn_implementation": config.model.attn_implementation,
           "strategy": config.distributed.strategy, "libraries": libraries(),
           "device": next(model.parameters()).device.type}
    reason, now = packing.verdict(model, model.get_input_embeddings().weight.shape[0], spec.run_dir, key)
    if reason is None and hooks.say and distributed.is_main():
        hooks.say("info", f"job {spec.job_id}: padding-free batches (training.packing), " + (
            "checked: the model computes packed examples exactly as alone" if now else
            f"as checked before for this run's model and settings ({packing.VERDICTS})"))
    if reason and distributed.is_main():
        text = (f"training.packing: padded batches instead of padding-free ones, because {reason}; set "
                f"training.packing = false to silence this")
        if hooks.warn:
            hooks.warn(text)
        elif hooks.say:
            hooks.say("warning", text)
    return reason is None


_EXIT_SPARED = False  # gc.freeze is registered to run at this process's exit


@contextlib.contextmanager
def _collector_spared():
    """While training, the cyclic garbage collector leaves alone what was alive when it began (torch, transformers
    and peft's millions of objects, the model, the data), and at the process's exit everything: accelerate's full
    collection at the end of train(), any during it and the interpreter's at exit walked them all, about 2 CPU seconds
    a job (benchmarks/peer.py). Reference counting still frees them, and after training any cycle among them is
    collected as before. A process whose collector someone else froze is left as it is."""
    global _EXIT_SPARED
    if gc.get_freeze_count():
        yield
        return
    if not _EXIT_SPARED:  # nothing runs after it: module teardown frees by reference count alone
        atexit.register(gc.freeze)
        _EXIT_SPARED = True
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _same_optimizer(config: Config, spec: JobSpec, hooks: Hooks) -> bool:
    """Whether the checkpoint's optimizer state is there and fits training.optimizer; if not, the moments restart,
    said: retention pruned it (a rollback to an older version), or training.optimizer changed."""
    if spec.resume is None:
        return True
    pruned = pruned_moments(spec.resume)
    if pruned is not None:
        if hooks.say and distributed.is_main():
            hooks.say("warning", pruned)
        return False
    before = spec.resume.manifest.hyperparameters.get("optimizer", "adamw_torch")  # older manifests: the default
    if before == config.training.optimizer:
        return True
    if hooks.say and distributed.is_main():
        hooks.say("warning", f"training.optimizer changed from {before} to {config.training.optimizer} since "
                  f"{spec.resume.path.name}: its moments cannot carry over, so they start from zero at step "
                  f"{spec.resume.step + 1}; weights, position and learning-rate schedule carry on")
    return False
