"""Evaluation loss on a fixed validation file, with exactly the training loss's masking, and sample
generations from fixed prompts, so a person can see whether the model is learning and what it says now."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..data import probe as probes
from ..data.chat import stop_ids
from ..data.formats import IGNORE
from ..data.scoring import Scores, score


@dataclass
class EvalResult:
    loss: float
    examples: int
    tokens: int  # trainable tokens the loss averages over




def good_answers(examples) -> list:
    """The examples whose answer is one to learn: all but feedback answers labelled false (a pair's is its chosen)."""
    return [e for e in examples if e.label is not False]


class Evaluator:
    """Token-weighted mean loss over each named set's trainable tokens, as the Trainer computes it."""

    def __init__(self, sets: dict, collator, batch_size: int, prompts: list[str], max_new_tokens: int, tokenizer,
                 answer_examples: int = 0):
        self.sets, self.collator, self.batch_size = sets, collator, batch_size
        self.prompts, self.max_new_tokens, self.tokenizer = prompts, max_new_tokens, tokenizer
        self.answer_examples = answer_examples

    def losses(self, trainer, model) -> dict[str, EvalResult]:
        """Every set's loss, in the order the sets were given."""
        return {name: self.loss(trainer, model, examples) for name, examples in self.sets.items()}

    @torch.no_grad()
    def loss(self, trainer, model, examples) -> EvalResult:
        examples = good_answers(examples)
        was_training = model.training
        model.eval()  # no dropout: the same weights give the same number
        total, tokens = 0.0, 0
        try:
            for start in range(0, len(examples), self.batch_size):
                chunk = examples[start:start + self.batch_size]
                batch = self.collator.pad([{"input_ids": e.input_ids, "labels": e.labels} for e in chunk])
                n = int((batch["labels"][:, 1:] != IGNORE).sum())
                batch = {k: v.to(trainer.args.device) for k, v in batch.items()}
                # The Trainer's own loss with num_items_in_batch: the sum over trainable tokens / n.
                loss = trainer.compute_loss(model, batch, num_items_in_batch=torch.tensor(n))
                total += float(loss) * n
                tokens += n
        finally:
            model.train(was_training)
        return EvalResult(total / max(tokens, 1), len(examples), tokens)

    def answer_tokens(self, names) -> int:
        """The most tokens scoring these sets' answers generates: what `eval.answer_budget` bounds."""
        return sum(min(len(self.sets[n]), self.answer_examples) for n in names) * self.max_new_tokens

    @torch.no_grad()
    def answers(self, model, examples, every: bool = False) -> Scores | None:
        """The greedy answers to the first `answer_examples` examples (`every`: all) that have a prompt (prompt/completion and chat:
        everything before the first trained token), each scored against what the example trains there (its first
        reply, without the end marker); None when none has a prompt (text)."""
        examples = good_answers(examples)
        chosen = examples if every else examples[:self.answer_examples]  # every: the probe's
        asked = [a for a in (split_reply(e, self.tokenizer) for e in chosen) if a]
        if not asked:
            return None
        was_training = model.training
        model.eval()
        try:
            pairs = [(self._generate(model, prompt), reference) for prompt, reference in asked]
        finally:
            model.train(was_training)
        return score(pairs)

    def _generate(self, model, ids: list[int]) -> str:
        device = next(model.parameters()).device
        generated = model.generate(input_ids=torch.tensor([ids], device=device),
                                   attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
                                   max_new_tokens=self.max_new_tokens, do_sample=False,
                                   pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self._ends(model))
        return self.tokenizer.decode(generated[0][len(ids):], skip_special_tokens=True)

    @torch.no_grad()
    def samples(self, model) -> list[tuple[str, str]]:
        """Greedy answers to the configured prompts (chat template when the tokenizer has one)."""
        if not self.prompts:
            return []
        was_training = model.training
        model.eval()
        out = []
        try:
            for prompt in self.prompts:
                out.append((prompt, self._generate(model, self._prompt_ids(prompt))))
        finally:
            model.train(was_training)
        return out

    def _prompt_ids(self, prompt: str) -> list[int]:
        return prompt_ids(self.tokenizer, prompt, bool(self.tokenizer.chat_template))

    def _ends(self, model) -> list[int]:
        """Where a sample ends, as `conveyor generate` ends an answer: end of text, or the chat template's turn end."""
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        return stop_ids(self.tokenizer, eos, bool(self.tokenizer.chat_template))


def prompt_ids(tokenizer, prompt: str, chat: bool) -> list[int]:
    """A prompt as the model is asked it: a user turn through the chat template, or plain text after BOS."""
    if chat and tokenizer.chat_template:
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True,
                                             add_generation_prompt=True, return_dict=False)
    return ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + \
        tokenizer.encode(prompt, add_special_tokens=False)


def split_reply(example, tokenizer) -> tuple[list[int], str] | None:
    """An example as a question and its answer: the tokens before its first trained one, and the text of that first
    trained span (special tokens such as the end marker left out). None when nothing precedes the trained tokens but
    special ones (a text example trains from its start) or the span holds no text."""
    labels, ids = list(example.labels), list(example.input_ids)
    start = next((i for i, label in enumerate(labels) if label != IGNORE), None)
    if not start:
        return None
    end = next((i for i in range(start, len(labels)) if labels[i] == IGNORE), len(labels))
    if not tokenizer.decode(ids[:start], skip_special_tokens=True).strip():
        return None
    reference = tokenizer.decode(ids[start:end], skip_special_tokens=True).strip()
    return (ids[:start], reference) if reference else None


def add_retention(evaluator: Evaluator, trainer, model, spec, max_length: int, model_path: str, say) -> dict | None:
    """Make the probe a set the evaluator scores ("retention": the base's answers as references). Its base answers
    are recorded first if none are kept: by the model as it is before a run's first step, or with LoRA by the model
    with its adapter off; a full fine-tune that has trained loads the base from its folder for it. Returns the
    base's own row (step 0) when they were recorded for this job and the base is at hand to score them."""
    probe = spec.probe
    base = _as_base(model, spec)
    if probe.answers is None:
        if base is None:
            if say:
                say("info", f"job {spec.job_id}: recording the base model's answers to the probe ({probe.source}) "
                    f"from {model_path}, once for the run")
            answers = base_answers(evaluator, lambda: load_base(model_path, next(model.parameters()).dtype), probe.prompts)
        else:
            with base:
                answers = base_answers(evaluator, lambda: model, probe.prompts)
            base = _as_base(model, spec)  # a context is used once
        probes.save(probe, answers)
        probe.fresh = True
    examples = probes.examples(evaluator.tokenizer, probe.prompts, probe.answers, max_length)
    evaluator.sets[probes.RETENTION] = examples
    if not probe.fresh or base is None:
        return None
    with base:
        result = evaluator.loss(trainer, model, examples)
    asked = sum(split_reply(e, evaluator.tokenizer) is not None for e in examples)
    return {"step": 0, "job_id": spec.job_id, "name": probes.RETENTION, "loss": result.loss,
            "examples": result.examples, "tokens": result.tokens, "exact": 1.0, "f1": 1.0, "answered": asked}


@torch.no_grad()
def base_answers(evaluator: Evaluator, load, prompts: list[str]) -> list[str]:
    """The greedy answers of the model `load()` gives to the prompts, asked as `generate` asks (through the chat
    template where there is one), each up to eval.max_new_tokens."""
    model = load()
    was_training = model.training
    model.eval()
    try:
        chat = bool(evaluator.tokenizer.chat_template)
        return [evaluator._generate(model, prompt_ids(evaluator.tokenizer, p, chat)).strip() for p in prompts]
    finally:
        model.train(was_training)


def load_base(model_path: str, dtype):
    """The base model from its folder, on the CPU, to record its answers (once per run)."""
    from transformers import AutoModelForCausalLM  # loaded already by the caller's process; imported where used

    return AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)


def _as_base(model, spec):
    """A context in which `model` is the base model, or None where that cannot be had (a full fine-tune that has
    trained): LoRA's adapter off, or the untrained model before a run's first step."""
    if hasattr(model, "disable_adapter"):
        return model.disable_adapter()
    if spec.resume is None:  # no checkpoint to start from: the model loaded is the base
        return contextlib.nullcontext()
    return None
