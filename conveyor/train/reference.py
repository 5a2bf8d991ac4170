"""A preference job's reference: the model as the job found it (the previous version), kept for the whole job.

With LoRA: a frozen copy of the adapter, saved once when the job starts (runs/<run>/references/job-<id>/) and loaded
beside the adapter that trains under the name preference.REFERENCE: no second base in memory. With a full fine-tune:
the reference's log-probabilities of every answer, computed once when the job starts and kept in data/reference/
(keyed by the job's tokenized data and the reference's weights), so no second model is held while training.

The record (kind, the global step and weights it copies, the sha256 of what is kept) is written on the job when its
first step starts and in every checkpoint's manifest; a resume loads what the record names and verifies it: a
cache that no longer matches is rebuilt from the reference's weights (the checkpoint of that step, or the base),
never used; an adapter copy that no longer matches, with no checkpoint left to copy again, stops the job with a
message, because training on against another reference would be another job.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import PlanError
from ..fingerprint import fingerprint
from ..store import checkpoints as ck
from ..store import manifest as mf
from . import preference as pref

ADAPTER_FILE = "adapter_model.safetensors"
LOGPS, META = "logps.bin", "meta.json"
VERSION = 1


def copy_folder(run_dir: Path, job_id: int) -> Path:
    return run_dir / "references" / f"job-{job_id:05d}"


def weights_id(resume: ck.Checkpoint | None, model_path: str) -> str:
    """What the reference's weights are: a checkpoint's weight files by their sha256, or the base model."""
    if resume is None:
        return f"base:{model_path}"
    files = resume.manifest.files
    weights = sorted((name, digest) for name, digest in files.items() if name.endswith(".safetensors"))
    return f"{resume.path.name}:" + hashlib.sha256(json.dumps(weights).encode()).hexdigest()[:32]


# LoRA: the adapter copy --------------------------------------------------------------------------------------------

def keep_adapter(model, folder: Path) -> str:
    """Save the adapter as it is now (the reference) into `folder`, atomically; its sha256."""
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp, selected_adapters=["default"])
    if (tmp / "default").is_dir():  # peft writes a non-default selection into a subfolder
        tmp = tmp / "default"
    digest = fingerprint(tmp / ADAPTER_FILE)
    shutil.rmtree(folder, ignore_errors=True)
    os.rename(tmp, folder)
    return digest


def load_adapter(model, folder: Path, record: dict, job_id: int) -> None:
    """Load the kept copy as the frozen reference adapter, after verifying it; PlanError if it cannot be."""
    path = folder / ADAPTER_FILE
    found = fingerprint(path) if path.is_file() else None
    if found != record["sha256"]:
        what = "is missing" if found is None else f"no longer matches its sha256 ({found[:12]} instead of " \
            f"{record['sha256'][:12]})"
        raise PlanError(f"job {job_id}'s reference (the adapter as the job found it, at global step "
                        f"{record['step']}) {folder}/{ADAPTER_FILE} {what}: training on against another reference "
                        "would make it another job. Roll back to the version before the job (`conveyor versions`, "
                        "`conveyor rollback`), which trains it again from its start, or remove the job")
    model.load_adapter(str(folder), adapter_name=pref.REFERENCE, is_trainable=False)


# Full fine-tune: cached log-probabilities --------------------------------------------------------------------------

def cache_folder(data_dir: Path, key: str) -> Path:
    return data_dir / "reference" / hashlib.sha256(f"{VERSION}:{key}".encode()).hexdigest()[:32]


def cache_key(data_key: str, weights: str, method: str, epochs: int, seed: int, precision: str) -> str:
    kind = "feedback" if method == pref.KTO else "pairs"
    return f"{data_key}|{weights}|{kind}|{epochs}|{seed}|{precision}"


class Cache:
    """The reference log-probabilities of a job's examples: pairs (chosen, rejected) per example; feedback the
    answer's, then per epoch the KL row's (the prompt with the answer before it in that epoch's order)."""

    def __init__(self, values: np.ndarray, feedback: bool, sha256: str):
        self.values, self.feedback, self.sha256 = values, feedback, sha256

    def lookup(self, epoch: int, index: int) -> tuple[float, float]:
        row = self.values[index]
        return (float(row[0]), float(row[1 + epoch])) if self.feedback else (float(row[0]), float(row[1]))


def load_cache(folder: Path) -> tuple[Cache | None, str | None]:
    """The cache if its array matches the size and sha256 written with it; else None and what is wrong (None, None:
    never written)."""
    try:
        meta = json.loads((folder / META).read_text(encoding="utf-8"))
        path = folder / LOGPS
        size = path.stat().st_size
        if size != meta["size"]:
            return None, f"{LOGPS} has {size} bytes instead of {meta['size']}"
        digest = fingerprint(path)
        if digest != meta["sha256"]:
            return None, f"{LOGPS} no longer matches its sha256 ({digest[:12]} instead of {meta['sha256'][:12]})"
        values = np.fromfile(path, dtype=np.float64).reshape(meta["shape"])
        return Cache(values, meta["feedback"], digest), None
    except FileNotFoundError:
        return None, (f"{META} or {LOGPS} is missing" if folder.exists() else None)
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"{META} is unreadable ({type(e).__name__}: {e})"


@torch.no_grad()
def compute_cache(model, examples, order, method: str, batch_size: int, pad_id: int, max_length: int) -> np.ndarray:
    """The reference's log-probabilities (the model as given, without dropout) of every example's answers."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    n = len(examples)
    feedback = method == pref.KTO
    width = 1 + order.epochs if feedback else 2
    values = np.zeros((n, width), dtype=np.float64)
    rows: list[tuple[int, int, tuple]] = []  # (example index, column, (ids, labels))
    for index in range(n):
        example = examples[index]
        rows.append((index, 0, (example.input_ids, example.labels)))
        if not feedback:
            rows.append((index, 1, (example.rejected_ids, example.rejected_labels)))
    if feedback:
        for position in range(len(order)):
            epoch, index = order[position]
            partner = examples[pref.kl_partner(order, position)]
            rows.append((index, 1 + epoch, pref.kl_row(examples[index], partner, max_length)))
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            batch = {k: v.to(device) for k, v in pref.pad_rows([r[2] for r in chunk], pad_id).items()}
            logps = pref.sequence_logps(model, batch)[0].double().cpu().numpy()
            for (index, column, _), value in zip(chunk, logps):
                values[index, column] = value
    finally:
        model.train(was_training)
    return values


def write_cache(folder: Path, values: np.ndarray, feedback: bool, key: str) -> str:
    """Keep the values with their size and sha256 (a temporary folder, renamed); the sha256."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    data = np.ascontiguousarray(values, dtype=np.float64).tobytes()
    (tmp / LOGPS).write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    meta = {"version": VERSION, "key": key, "shape": list(values.shape), "feedback": feedback, "size": len(data),
            "sha256": digest}
    (tmp / META).write_text(json.dumps(meta), encoding="utf-8")
    shutil.rmtree(folder, ignore_errors=True)
    os.rename(tmp, folder)
    return digest


def reference_weights(run_dir: Path, record: dict) -> Path | None:
    """The checkpoint folder of the reference's weights (None: the base model), if it still holds them; else
    PlanError."""
    if record["weights"].startswith("base:"):
        return None
    folder = ck.checkpoints_dir(run_dir) / ck.folder_name(record["step"])
    try:
        manifest = mf.verify(folder)
        if weights_id(ck.Checkpoint(folder, record["step"], manifest), "") == record["weights"]:
            return folder
    except (OSError, ValueError):
        pass
    raise PlanError(f"the reference of this job (global step {record['step']}) must be computed again, but "
                    f"{folder.name} no longer holds its weights; roll back to the version before the job "
                    "(`conveyor rollback`) to train it again from its start")


def cached_logps(folder: Path, record: dict | None, compute: Callable[[], np.ndarray], feedback: bool, key: str,
                 warn: Callable[[str], None] | None) -> tuple[Cache, str]:
    """The job's cached reference log-probabilities, verified against the record's sha256 (computed and kept when
    the record is None or the cache does not verify: the damaged one is said, then replaced)."""
    cache, problem = load_cache(folder)
    if cache is not None and (record is None or record.get("sha256") == cache.sha256):
        return cache, cache.sha256
    if cache is not None:
        problem = "holds other values than the job recorded"
    if problem and warn:
        warn(f"data/reference/{folder.name}: {problem}; the reference log-probabilities are derived data: never "
             "used as they are, computed again from the reference's weights")
    values = compute()
    digest = write_cache(folder, values, feedback, key)
    if record is not None and record.get("sha256") not in (None, digest) and warn:
        warn(f"data/reference/{folder.name}: computed again, its values differ from the first computation "
             f"(sha256 {digest[:12]} instead of {record['sha256'][:12]}); the job goes on with these")
    return Cache(values, feedback, digest), digest
