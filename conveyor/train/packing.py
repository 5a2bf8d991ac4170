"""Padding-free batches: the examples of a micro-batch laid end to end in one row, positions restarting at each
example, attention never crossing from one example into another; and the check that the loaded model honours that.

A padded micro-batch spends compute on pad tokens up to its longest example; on chat data with skewed lengths that
is most of it. transformers 5 builds a block-diagonal causal mask from position ids that restart (sdpa and eager,
through masking_utils) or runs variable-length kernels from them (flash_attention_2), when no attention mask is
given. Whether a given model does is not assumed: `check` runs the model on a probe and looks, once per run for the
same model, attention kernel, libraries and device (`verdict`): each job's worker is a fresh process, and on a busy
machine with several torch threads the probe's hundreds of tiny kernels took 4-7 s (benchmarks/peer.py).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from ..data.formats import IGNORE
from . import distributed

VERDICTS = "packing-check.json"  # in a run's folder: check()'s verdict per key (what the verdict depends on)


def worth_it(lengths: list[int], hidden: int | None, varlen: bool) -> bool:
    """Whether laying these examples end to end costs less than padding them to the longest.

    With variable-length kernels (flash_attention_2) a packed row's attention costs the sum of each example's
    length squared: never more than padding. sdpa and eager compute the whole row's scores under a
    block-diagonal mask instead, total length squared, which can cost more than padding when lengths are alike
    (benchmarks/packing.py: 0.3-0.5x on uniform lengths). Per token, a layer's matrix products cost about
    12·d² multiply-adds and attention about 2·d per key, so the estimate is tokens × (1 + keys / 6d), and a
    micro-batch is packed when that saves at least 20% (the estimate ignores the mask's own cost)."""
    if hidden is None or varlen:
        return True
    total, longest = sum(lengths), max(lengths)
    cost = lambda tokens, keys: tokens * (1 + keys / (6 * hidden))
    return cost(total, total) < 0.8 * cost(len(lengths) * longest, longest)


def flattening_collator():
    """Hugging Face's padding-free collator: input_ids, labels and position_ids of shape [1, total tokens]; the
    first label of each example is IGNORE, so no loss crosses from one example to the next."""
    from transformers import DataCollatorWithFlattening

    return DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE)


@torch.no_grad()
def check(model, vocab_size: int) -> str | None:
    """None if the model computes an example packed after another exactly as alone; else what went wrong.

    Two probes of one row each: example B after example A, and B after a different A'. B's logits must not depend
    on what came before it (no attention leaks across the boundary) and must equal B's logits alone (positions
    restart). Fixed token ids and eval mode: the probe consumes no random numbers, so it cannot change training.
    """
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        n = 6
        a, a_other, b = (torch.tensor([(7 * k + shift) % vocab_size for k in range(n)], device=device)
                         for shift in (3, 11, 5))
        positions = torch.arange(n, device=device)

        def logits(*parts):
            ids = torch.cat(parts)[None]
            pos = torch.cat([positions] * len(parts))[None]
            return model(input_ids=ids, position_ids=pos).logits[0, -n:].float()

        alone, after_a, after_other = logits(b), logits(a, b), logits(a_other, b)
    except Exception as e:  # a model whose forward cannot take position ids without a mask
        return f"the model's forward failed on a packed row ({type(e).__name__}: {e})"
    finally:
        model.train(was_training)
    scale = max(1.0, float(alone.abs().max()))
    tolerance = (1e-4 if alone.dtype == torch.float32 and _compute_dtype(model) == torch.float32 else 3e-2) * scale
    leak, shift = float((after_a - after_other).abs().max()), float((after_a - alone).abs().max())
    if leak > tolerance:
        return f"attention crosses example boundaries in a packed row (logits moved by {leak:.2e})"
    if shift > tolerance:
        return f"a packed example does not compute as it does alone (logits differ by {shift:.2e})"
    return None


def _compute_dtype(model) -> torch.dtype:
    floating = [p.dtype for p in model.parameters() if p.dtype.is_floating_point]
    return torch.float32 if not floating or all(d == torch.float32 for d in floating) else torch.bfloat16


def verdict(model, vocab_size: int, folder: Path, key: dict) -> tuple[str | None, bool]:
    """check()'s verdict for this model: the one kept in folder/VERDICTS for the same key, else checked now and kept
    there. Returns (what went wrong or None, whether the probe ran now).

    `key` holds what the verdict depends on (the model's identity, attention kernel, libraries, device, strategy);
    anything else that changes gets a probe of its own. Rank 0 decides for every rank: under FSDP the probe's forward
    needs all ranks, so they must all run it or all skip it."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    path = Path(folder) / VERDICTS
    kept = distributed.broadcast(_read(path).get(digest) if distributed.is_main() else None)
    if isinstance(kept, dict) and (kept.get("reason") is None or isinstance(kept.get("reason"), str)):
        return kept.get("reason"), False
    reason = check(model, vocab_size)
    if distributed.is_main():
        _keep(path, digest, {"reason": reason, "key": key})
    return reason, True


def _read(path: Path) -> dict:
    try:
        kept = json.loads(path.read_text(encoding="utf-8"))
        return kept if isinstance(kept, dict) else {}
    except (OSError, ValueError):  # none yet, or unreadable: derived data, so the probe just runs again
        return {}


def _keep(path: Path, digest: str, entry: dict) -> None:
    """Added to the file by an atomic rename; not flushed to disk, since a lost verdict only means one more probe."""
    kept = {**_read(path), digest: entry}
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(kept, indent=1, default=str), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:  # a full or read-only disk: the verdict stands for this job, the next one probes again
        tmp.unlink(missing_ok=True)
