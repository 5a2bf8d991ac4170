"""The probe: what the base model knew, kept and measured (retention).

A run's probe is a list of prompts: `eval.probe`'s JSONL file (`{"prompt": ...}` a line), or the built-in general
set (a few dozen everyday questions, conveyor/assets/probe_general.jsonl). The base model's greedy answers to them
are recorded once, before the run's first step (or, with LoRA, at any time: the base is the model with its adapter
off), and kept in data/probe/<key>.json with their sha256, keyed by the prompts, the base model's identity and the
answer length. Each evaluation scores the version against them as a set named "retention": the loss of the base's
answers under the version, and how its own greedy answers agree with the base's (exact match, token F1). A kept
file changed since it was written is never used: it is named, and recorded again where the base is at hand.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConveyorError
from ..fingerprint import fsync_dir
from .formats import CHAT, PROMPT, Example, Tokenized, tokenize_example

RETENTION = "retention"  # the probe's set name in evaluations, the matrix and the dashboard
GENERAL, AUTO = "general", "auto"
BUILT_IN = Path(__file__).resolve().parent.parent / "assets" / "probe_general.jsonl"
RANDOM_MODELS = ("tiny", "small")  # built-in models with random weights: they know nothing to keep


class AlteredProbe(Exception):
    """A kept probe file whose answers no longer match their sha256 (or cannot be read)."""


@dataclass
class Probe:
    prompts: list[str]
    source: str  # where the prompts come from, in words ("the built-in general set", "probe.jsonl")
    key: str  # names the kept answers: prompts, base identity, answer length
    folder: Path  # data/probe
    answers: list[str] | None = None  # the base model's, once recorded
    fresh: bool = False  # recorded for this job (its base row, step 0, is scored with it)

    @property
    def path(self) -> Path:
        return self.folder / f"{self.key}.json"


def choose(setting: str, root: Path, model_name: str, chat: bool) -> tuple[list[str], str] | None:
    """The probe's prompts and their source for `eval.probe`: "auto" is the built-in general set for a model with a
    chat template (not the random-weight built-ins); "general" that set always; "" none; else a JSONL file."""
    if not setting or (setting == AUTO and (model_name in RANDOM_MODELS or not chat)):
        return None
    if setting in (AUTO, GENERAL):
        return read(BUILT_IN), "the built-in general set"
    path = Path(setting).expanduser()
    path = path if path.is_absolute() else root / path
    return read(path), setting


def read(path: Path) -> list[str]:
    """The prompts of a probe file; ConveyorError names the file, the line and what to write instead."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConveyorError(f"eval.probe: cannot read {path}: {e}; give a JSONL file of {{\"prompt\": ...}} lines, "
                            "\"general\" for the built-in set, or \"\" for none") from None
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            raise ConveyorError(f"eval.probe: {path}, line {number}: not JSON ({e}); each line is "
                                "{\"prompt\": \"...\"}") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
            raise ConveyorError(f"eval.probe: {path}, line {number}: needs a non-empty \"prompt\" string; each line "
                                "is {\"prompt\": \"...\"}")
        prompts.append(record["prompt"])
    if not prompts:
        raise ConveyorError(f"eval.probe: {path} holds no prompts; each line is {{\"prompt\": \"...\"}}")
    return prompts


def key(prompts: list[str], identity: dict, max_new_tokens: int) -> str:
    """The kept answers' name: the prompts, the base model's identity (model.* fields) and the answer length."""
    base = {k: v for k, v in sorted(identity.items()) if k.startswith("model.")}
    text = json.dumps({"prompts": prompts, "base": base, "max_new_tokens": max_new_tokens}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load(probe: Probe) -> list[str] | None:
    """The kept base answers, verified; None if none are kept. Raises AlteredProbe when the file was changed."""
    if not probe.path.exists():
        return None
    try:
        data = json.loads(probe.path.read_text(encoding="utf-8"))
        answers = data["answers"]
        intact = data["sha256"] == _digest(data["prompts"], answers) and data["prompts"] == probe.prompts
    except (OSError, ValueError, KeyError, TypeError):
        intact = False
    if not intact:
        raise AlteredProbe(f"{probe.path.name} no longer holds the answers written there (its sha256 or prompts "
                           "differ)")
    return answers


def save(probe: Probe, answers: list[str]) -> None:
    """Keep the base answers: written to a temporary file, flushed and renamed."""
    probe.folder.mkdir(parents=True, exist_ok=True)
    tmp = probe.path.with_suffix(".tmp")
    payload = {"prompts": probe.prompts, "answers": answers, "sha256": _digest(probe.prompts, answers),
               "source": probe.source}
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(payload, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(probe.path)
    fsync_dir(probe.folder)
    probe.answers = answers


def examples(tokenizer, prompts: list[str], answers: list[str], max_length: int) -> list[Tokenized]:
    """Each prompt with the base's answer as one example, as it would train: a user turn and the reply through
    the chat template when the tokenizer has one, else prompt and completion."""
    out = []
    for number, (prompt, answer) in enumerate(zip(prompts, answers), 1):
        if tokenizer.chat_template:
            record, fmt = {"messages": [{"role": "user", "content": prompt},
                                        {"role": "assistant", "content": answer}]}, CHAT
        else:
            record, fmt = {"prompt": prompt, "completion": " " + answer}, PROMPT
        out.append(tokenize_example(tokenizer, Example(number, record), fmt, max_length))
    return out


def _digest(prompts: list[str], answers: list[str]) -> str:
    return hashlib.sha256(json.dumps([prompts, answers]).encode()).hexdigest()
