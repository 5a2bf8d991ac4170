"""Held-out sets: examples of a job set aside and never trained, scored at every evaluation to show forgetting.

Which examples a job holds out is chosen once, from (run seed, job fingerprint), when the job is first planned,
and kept with the job (its file lines), so a later change of `eval.holdout` never moves examples between the
trained and the held-out part of a job under way. The job then trains the rest: its planned steps, its epoch
order and its audit cover only the trained examples (laws 1 and 2).

A held-out set is small and scored for as long as the run lives, long after the job's tokenized data was
pruned: its examples are kept in data/holdout/ as token ids and labels (JSON; only numbers are read back), with
their sha256: a kept set changed since it was written is never scored, but rebuilt from the job's stored copy
(verified itself) and said.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .formats import Tokenized, TokenizedFile
from .tokenized import TokenizedArrays


def count(setting: float, examples: int) -> int:
    """How many of a job's examples `eval.holdout` sets aside: a count, or a fraction (rounded); at least one
    example is always left to train."""
    if setting <= 0 or examples <= 1:
        return 0
    wanted = int(setting) if setting >= 1 else round(setting * examples)
    return min(wanted, examples - 1)


def choose(seed: int, fingerprint: str, data: TokenizedFile, k: int) -> list[int]:
    """The file lines of the k held-out examples, fixed by (seed, fingerprint), ascending."""
    if k <= 0:
        return []
    key = hashlib.sha256(f"{seed}:{fingerprint}:holdout".encode()).digest()
    rng = np.random.Generator(np.random.PCG64(int.from_bytes(key[:16], "little")))
    picked = rng.choice(len(data.examples), size=k, replace=False)
    return sorted(data.examples[int(i)].line for i in picked)


class Subset:
    """Some examples of a tokenized file, by index, read on demand (the file may be memory-mapped)."""

    def __init__(self, examples, indices: np.ndarray):
        self.base, self.indices = examples, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        return self.base[int(self.indices[i])]

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def tokens_of(self, lines: list[int]) -> int:
        if hasattr(self.base, "tokens_of"):
            return self.base.tokens_of(lines)
        length = {e.line: e.tokens for e in self.base}
        return sum(length[line] for line in lines)


@dataclass
class Split:
    trained: TokenizedFile
    held: list[Tokenized]  # in file order


def split(data: TokenizedFile, lines: list[int]) -> Split:
    """The job's data without its held-out lines, and the held-out examples."""
    if not lines:
        return Split(data, [])
    wanted = set(lines)
    all_lines = _lines(data)
    held_mask = np.isin(all_lines, np.asarray(sorted(wanted), dtype=np.int64))
    keep = np.flatnonzero(~held_mask)
    held = [data.examples[int(i)] for i in np.flatnonzero(held_mask)]
    trained = TokenizedFile(Subset(data.examples, keep), data.truncated_lines, data.excluded_lines,
                            data.tokens - sum(e.tokens for e in held), data.truncated_count)
    return Split(trained, held)


def _lines(data: TokenizedFile) -> np.ndarray:
    if isinstance(data.examples, TokenizedArrays):  # memory-mapped: the file lines are a column of the index
        return np.asarray(data.examples.index[:, 2], dtype=np.int64)
    return np.asarray([e.line for e in data.examples], dtype=np.int64)


# Kept held-out examples ----------------------------------------------------------------------------------------
def _path(folder: Path, job_id: int, key: str) -> Path:
    return folder / f"job-{job_id}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


class AlteredHoldout(ValueError):
    """A kept held-out file whose examples no longer match the sha256 written with them."""


def _digest(rows: list) -> str:
    return hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()


def save(folder: Path, job_id: int, key: str, held: list[Tokenized]) -> None:
    """Keep a job's held-out examples with their sha256 (written to a temporary file and renamed)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = _path(folder, job_id, key)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    rows = [_row(e) for e in held]
    tmp.write_text(json.dumps({"sha256": _digest(rows), "examples": rows}), encoding="utf-8")
    os.replace(tmp, path)


def _row(e: Tokenized) -> dict:
    row = {"line": e.line, "input_ids": list(map(int, e.input_ids)), "labels": list(map(int, e.labels))}
    if e.rejected_ids is not None:
        row["rejected_ids"], row["rejected_labels"] = list(map(int, e.rejected_ids)), list(map(int, e.rejected_labels))
    if e.label is not None:
        row["label"] = bool(e.label)
    return row


def _example(r: dict) -> Tokenized:
    """A kept row as an example; only numbers (and a feedback label) are read back."""
    out = Tokenized(int(r["line"]), [int(t) for t in r["input_ids"]], [int(t) for t in r["labels"]])
    if "rejected_ids" in r:
        out.rejected_ids = [int(t) for t in r["rejected_ids"]]
        out.rejected_labels = [int(t) for t in r["rejected_labels"]]
    if "label" in r:
        out.label = r["label"] is True
    return out


def _rows(path: Path) -> list:
    """The examples a kept file holds, verified against the sha256 written with them (AlteredHoldout if they do not
    match); a file from before the hashes (a bare list) as it is. OSError/ValueError if missing or unreadable."""
    kept = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(kept, list):
        return kept
    rows = kept["examples"]
    if _digest(rows) != kept["sha256"]:
        raise AlteredHoldout(f"{path.name} does not match the sha256 written with it (changed since)")
    return rows


def load(folder: Path, job_id: int, key: str) -> list[Tokenized] | None:
    """A job's kept held-out examples, or None if they are missing or unreadable (then rebuilt from its file);
    AlteredHoldout if they were changed since they were written (rebuilt too, and said)."""
    try:
        rows = _rows(_path(folder, job_id, key))
        return [_example(r) for r in rows]
    except AlteredHoldout:
        raise
    except (OSError, ValueError, KeyError, TypeError):
        return None


def kept_lines(folder: Path, job_id: int) -> list[int] | None:
    """The file lines of a job's kept held-out examples (any tokenization of it), None if none are readable."""
    for path in sorted(folder.glob(f"job-{job_id}-*.json")):
        try:
            return sorted(int(r["line"]) for r in _rows(path))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


EVAL_FILE = "eval.file"  # the name of the validation file's set; the others are jobs' held-out sets


def set_name(job_id: int) -> str:
    """The name of a job's held-out set in evaluations, the matrix and the dashboard."""
    return f"job {job_id}"


def job_of(name: str) -> int | None:
    """The job whose held-out set `name` is (set_name's inverse); None for another set (eval.file)."""
    prefix, _, number = name.partition(" ")
    return int(number) if prefix == "job" and number.isdigit() else None
