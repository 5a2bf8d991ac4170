"""Preference pairs (DPO, IPO, ORPO) and feedback (KTO) trained in conveyor's own loop: the same plan, order,
positions, checkpoints and audit as supervised jobs, with a loss over whole answers instead of tokens.

TRL's DPOTrainer and KTOTrainer each own a dataset, its tokenization, its order and a step counter that starts at 0,
and their losses are written inside their `compute_loss` (fused with a patched output layer), not as functions one
can call. So conveyor computes the losses here, as TRL defines them (DPO's sigmoid loss, IPO's squared loss on
length-normalized log-ratios, ORPO's odds ratio beside the chosen answer's NLL, KTO's desirable/undesirable losses
against a KL estimate), with TRL's defaults (beta 0.1, KTO weights 1.0); benchmarks/preference.py trains the same
file with TRL's DPOTrainer beside conveyor.

A pair is one example (law 2). A batch of B pairs is one forward of 2B rows: the chosen answers, then the rejected
ones, each after its prompt, right-padded. The reference is the model as the job found it (the previous version):
with LoRA a frozen copy of the adapter, kept in the run folder and applied per row by name (no second base in
memory); with a full fine-tune the reference's log-probabilities, computed once per job and kept in data/reference/
(reference_cache.py), so no second model is held. KTO's KL estimate pairs each prompt with the answer of the example
before it in the epoch's fixed order: part of the order, the same on every run and resume, at any world size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..data.formats import FEEDBACK, IGNORE, PAIR, Tokenized
from . import distributed

SFT, DPO, IPO, ORPO, KTO = "sft", "dpo", "ipo", "orpo", "kto"
REFERENCE = "reference"  # the frozen adapter copy's name inside the PeftModel
NO_ADAPTER = "__base__"  # peft: a row of `adapter_names` that takes no adapter
REFERENCE_KEY = "reference_logps"  # a batch's cached reference log-probabilities (full fine-tune)


def method_of(fmt: str | None, training) -> str:
    """How a job of this format trains: sft, training.preference for pairs, kto for feedback."""
    if fmt == PAIR:
        return training.preference
    if fmt == FEEDBACK:
        return KTO
    return SFT


def uses_reference(method: str) -> bool:
    return method in (DPO, IPO, KTO)


def disable_dropout(model) -> None:
    """No dropout in a preference job, as TRL's DPO and KTO trainers do by default (disable_dropout): the policy's
    log-probabilities then compare with the reference's, computed without it, and a pair's loss starts at ln 2."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


# Batches -------------------------------------------------------------------------------------------------------

def answer_start(labels: list[int]) -> int:
    """Where the answer begins: the first token that carries loss (everything before it is the prompt)."""
    return next((k for k, label in enumerate(labels) if label != IGNORE), len(labels))


def kl_row(example: Tokenized, partner: Tokenized, max_length: int) -> tuple[list[int], list[int]]:
    """KTO's mismatched row: this example's prompt, then the partner's answer (loss positions of that answer), cut
    to max_length as every example is."""
    a, b = answer_start(example.labels), answer_start(partner.labels)
    ids, labels = example.input_ids[:a] + partner.input_ids[b:], [IGNORE] * a + partner.labels[b:]
    return ids[:max_length], labels[:max_length]


def kl_partner(order, position: int) -> int:
    """The example whose answer KTO's KL row puts after the prompt at `position`: the one before it in its
    epoch's order (the epoch's last for its first), so the pairing is fixed with the order."""
    epoch, offset = divmod(position, order.n)
    return order[epoch * order.n + (offset - 1) % order.n][1]


def pad_rows(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict:
    """Right-padded ids, attention mask and labels (IGNORE in the padding)."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for k, (row_ids, row_labels) in enumerate(rows):
        ids[k, :len(row_ids)] = torch.tensor(row_ids, dtype=torch.long)
        labels[k, :len(row_labels)] = torch.tensor(row_labels, dtype=torch.long)
        mask[k, :len(row_ids)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collate(features: list[dict], pad_id: int, kind: str) -> dict:
    """One micro-batch of a `kind` of job: pairs (chosen rows, then rejected rows) or feedback (answers, then KL
    rows). A filler (distributed padding: no "kind"; a rank's last micro-batch may hold nothing else) weighs
    nothing."""
    filler = ([pad_id], [IGNORE])
    if kind == PAIR:
        chosen = [(f["input_ids"], f["labels"]) if f.get("kind") else filler for f in features]
        rejected = [(f["rejected_ids"], f["rejected_labels"]) if f.get("kind") else filler for f in features]
        batch = pad_rows(chosen + rejected, pad_id)
        batch["pairs"] = torch.tensor([1.0 if f.get("kind") else 0.0 for f in features])
    else:
        answers = [(f["input_ids"], f["labels"]) if f.get("kind") else filler for f in features]
        kl = [f["kl"] if f.get("kind") else filler for f in features]
        batch = pad_rows(answers + kl, pad_id)
        batch["kto_label"] = torch.tensor([float(f["label"]) if f.get("kind") else -1.0 for f in features])
    if any(REFERENCE_KEY in f for f in features):  # a cached reference: every item has its values (fillers 0)
        ref = [f[REFERENCE_KEY] for f in features]
        batch[REFERENCE_KEY] = torch.tensor([r[0] for r in ref] + [r[1] for r in ref], dtype=torch.float64)
    return batch


def is_preference(batch: dict) -> bool:
    return "pairs" in batch or "kto_label" in batch


# Log-probabilities ---------------------------------------------------------------------------------------------

def sequence_logps(model, batch: dict, **forward) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the sum of the log-probabilities of the tokens that carry loss, and how many there are."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False, **forward)
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE
    logits = out.logits[:, :-1].float()
    per_token = -F.cross_entropy(logits.transpose(1, 2), labels.masked_fill(~mask, 0), reduction="none")
    return (per_token * mask).sum(-1), mask.sum(-1)


def reference_logps(model, batch: dict) -> torch.Tensor:
    """The reference's log-probabilities of the batch's rows: cached ones (full fine-tune), or the frozen adapter
    copy's, computed without gradients and without dropout."""
    if REFERENCE_KEY in batch:
        return batch[REFERENCE_KEY].to(batch["input_ids"].device, torch.float32)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            rows = batch["input_ids"].shape[0]
            return sequence_logps(model, batch, adapter_names=[REFERENCE] * rows)[0]
    finally:
        model.train(was_training)


# Losses --------------------------------------------------------------------------------------------------------

@dataclass
class Step:
    """Per-example losses and rewards of a micro-batch, and which examples are real (weight 1) or fillers (0)."""
    losses: torch.Tensor
    weights: torch.Tensor
    chosen: torch.Tensor  # rewards of chosen answers (pairs) or of every answer (feedback)
    rejected: torch.Tensor | None = None  # rewards of rejected answers (pairs)
    labels: torch.Tensor | None = None  # feedback: 1 good, 0 bad, -1 filler


def pair_step(method: str, beta: float, policy: torch.Tensor, tokens: torch.Tensor, reference: torch.Tensor | None,
              weights: torch.Tensor) -> Step:
    """DPO, IPO or ORPO over B pairs; `policy`, `tokens` and `reference` hold 2B rows (chosen, then rejected)."""
    chosen, rejected = policy.chunk(2)
    n_chosen, n_rejected = tokens.clamp(min=1).chunk(2)
    if method == ORPO:
        # Mean log-probability per answer token; the odds ratio of chosen over rejected beside the chosen NLL.
        mean_c, mean_r = chosen / n_chosen, rejected / n_rejected
        log_odds = (mean_c - mean_r) - (torch.log1p(-torch.exp(mean_c).clamp(max=1 - 1e-7))
                                        - torch.log1p(-torch.exp(mean_r).clamp(max=1 - 1e-7)))
        losses = -mean_c - beta * F.logsigmoid(log_odds)
        return Step(losses, weights, beta * mean_c.detach(), beta * mean_r.detach())
    ref_chosen, ref_rejected = reference.chunk(2)
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    if method == IPO:
        delta = chosen_ratio / n_chosen - rejected_ratio / n_rejected
        losses = (delta - 1 / (2 * beta)) ** 2
    else:
        losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    return Step(losses, weights, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


def kto_step(beta: float, desirable: float, undesirable: float, policy: torch.Tensor, reference: torch.Tensor,
             labels: torch.Tensor) -> Step:
    """KTO over B answers; `policy` and `reference` hold 2B rows (the answers, then the KL rows)."""
    answers, kl_rows = policy.chunk(2)
    ref_answers, ref_kl = reference.chunk(2)
    real = labels >= 0
    ratio = answers - ref_answers
    # The KL estimate: no gradient, never below 0, over the micro-batch's real rows.
    kl = ((kl_rows - ref_kl)[real].mean() if bool(real.any()) else torch.zeros(())).detach().clamp(min=0)
    good = 1 - torch.sigmoid(beta * (ratio - kl))
    bad = 1 - torch.sigmoid(beta * (kl - ratio))
    losses = torch.where(labels > 0, desirable * good, undesirable * bad)
    return Step(losses, real.to(losses.dtype), beta * ratio.detach(), labels=labels)


def step_of(method: str, training, model, batch: dict) -> Step:
    """The micro-batch's per-example losses and rewards."""
    policy, tokens = sequence_logps(model, {k: batch[k] for k in ("input_ids", "attention_mask", "labels")})
    if method == KTO:
        return kto_step(training.beta, training.desirable_weight, training.undesirable_weight, policy,
                        reference_logps(model, batch), batch["kto_label"].to(policy.device))
    reference = reference_logps(model, batch) if uses_reference(method) else None
    return pair_step(method, training.beta, policy, tokens, reference, batch["pairs"].to(policy.device))


@dataclass
class Tally:
    """A step's preference metrics, summed over its micro-batches and ranks: the mean margin (chosen reward minus
    rejected; feedback: mean reward of good answers minus bad ones) and accuracy (chosen above rejected; feedback: a
    reward whose sign is the label's)."""
    margin: float = 0.0
    right: float = 0.0
    count: float = 0.0
    good: list = field(default_factory=list)
    bad: list = field(default_factory=list)

    def add(self, step: Step) -> None:
        real = step.weights > 0
        if step.rejected is not None:
            self.margin += float(((step.chosen - step.rejected) * step.weights).sum())
            self.right += float(((step.chosen > step.rejected).to(step.weights.dtype) * step.weights).sum())
        else:
            good = real & (step.labels > 0)
            bad = real & (step.labels == 0)
            self.good += step.chosen[good].tolist()
            self.bad += step.chosen[bad].tolist()
            self.right += float((step.chosen[good] > 0).sum() + (step.chosen[bad] < 0).sum())
        self.count += float(real.sum())

    def take(self) -> dict:
        """The step's margin and accuracy over every rank's micro-batches (on rank 0; {} elsewhere), then reset.
        Collective: every rank calls it once a step (the Trainer logs on every rank)."""
        parts = distributed.gather((self.margin, self.right, self.count, self.good, self.bad))
        self.margin = self.right = self.count = 0.0
        self.good, self.bad = [], []
        if not parts:
            return {}
        margin, right, count = (sum(part[k] for part in parts) for k in range(3))
        good, bad = [x for part in parts for x in part[3]], [x for part in parts for x in part[4]]
        if not count:
            return {}
        if good or bad:
            return {"margin": _mean(good) - _mean(bad), "accuracy": right / count}
        return {"margin": margin / count, "accuracy": right / count}


def _mean(values: list) -> float:
    return sum(values) / len(values) if values else 0.0


class Loss:
    """The preference loss of a job, for the Trainer's compute_loss: each micro-batch's per-example losses summed
    and divided by the examples of the whole optimizer step (all micro-batches and ranks), so a step's gradient is
    the mean over its examples, however they are split."""

    def __init__(self, method: str, training, world_size: int):
        self.method, self.training, self.world_size = method, training, world_size
        self.step_examples = 1  # set before each optimizer step (the plan knows how many it trains)
        self.tally = Tally()

    def __call__(self, model, batch: dict) -> torch.Tensor:
        step = step_of(self.method, self.training, model, batch)
        if model.training:
            self.tally.add(step)
        return (step.losses * step.weights).sum() * self.world_size / self.step_examples


# Held-out pairs ------------------------------------------------------------------------------------------------

@torch.no_grad()
def preference_accuracy(model, examples: list[Tokenized], batch_size: int, pad_id: int) -> tuple[float, float]:
    """Of held-out pairs: the share to which the model gives the chosen answer a higher log-probability than the
    rejected one, and the mean difference (nats). Needs no reference, so versions compare with one another."""
    was_training = model.training
    model.eval()
    right, margin = 0, 0.0
    try:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            rows = [(e.input_ids, e.labels) for e in chunk] + [(e.rejected_ids, e.rejected_labels) for e in chunk]
            batch = {k: v.to(next(model.parameters()).device) for k, v in pad_rows(rows, pad_id).items()}
            chosen, rejected = sequence_logps(model, batch)[0].chunk(2)
            right += int((chosen > rejected).sum())
            margin += float((chosen - rejected).sum())
    finally:
        model.train(was_training)
    return right / max(len(examples), 1), margin / max(len(examples), 1)
