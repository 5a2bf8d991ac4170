"""Memory: what a job is estimated to need before it starts on a GPU, and what to say when it runs out.

Running out of memory is a property of the settings on this machine, not of the job's data: retrying the same
step with the same settings fails the same way. So the worker stops the job at its last checkpoint and names
the settings that need less memory, with the peak it saw; the daemon waits for a person instead of retrying.
"""

from __future__ import annotations

import gc
import resource
import sys
from dataclasses import dataclass

from ..config import Config


def is_oom(error: BaseException) -> bool:
    """An accelerator out-of-memory error (torch.OutOfMemoryError) or the host's MemoryError."""
    if isinstance(error, MemoryError):
        return True
    torch = sys.modules.get("torch")  # an accelerator OOM can only come from an imported torch
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)
    return oom is not None and isinstance(error, oom)


def peak() -> str:
    """The peak memory this process saw: allocated on the GPU(s) with CUDA, else the host's peak RSS."""
    import torch

    if torch.cuda.is_available():
        used = max(torch.cuda.max_memory_allocated(d) for d in range(torch.cuda.device_count()))
        return f"{_gb(used)} allocated on the GPU at most (torch.cuda.max_memory_allocated)"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return f"{_gb(rss)} peak resident memory of the training process (getrusage ru_maxrss)"


def release() -> None:
    """Give back what the failed step held (call once no frame of it is referenced any more)."""
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def levers(config: Config) -> list[str]:
    """The settings that lower the memory a step needs, as they stand now."""
    t, m = config.training, config.model
    out = [f"training.batch_size (now {t.batch_size}; halve it and double training.grad_accum, now "
           f"{t.grad_accum}, to keep each step's examples)",
           f"training.max_length (now {t.max_length} tokens)"]
    if not t.gradient_checkpointing:
        out.append("training.gradient_checkpointing = true (recomputes activations: slower, same weights)")
    if config.adapter.method == "lora" and m.quantization == "none":
        out.append("model.quantization = \"nf4\" (QLoRA on a 4-bit base; starts a new run)")
    if t.mixed_precision == "no" and m.precision == "float32":
        out.append("training.mixed_precision = \"bf16\" (autocast: smaller activations)")
    return out


def oom_message(config: Config, job_id: int, error: BaseException) -> str:
    what = "host" if isinstance(error, MemoryError) else "accelerator"
    detail = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
    return (f"job {job_id} ran out of {what} memory ({type(error).__name__}: {detail}); peak memory: {peak()}. "
            "It stops at its last checkpoint and is not retried with the same settings. To need less memory, "
            "change: " + "; ".join(levers(config)) + ". Then `conveyor resume` (a running daemon) or "
            "`conveyor run --drain` / `conveyor train` retries from that checkpoint.")


# The estimate ------------------------------------------------------------------------------------

@dataclass
class Estimate:
    """Bytes a training step is expected to need on the accelerator, by part."""
    weights: int
    training_state: int  # gradients and optimizer moments of the trainable parameters
    activations: int

    @property
    def total(self) -> int:
        return int((self.weights + self.training_state + self.activations) * 1.2)  # allocator slack

    def text(self) -> str:
        return (f"about {_gb(self.total)} (weights {_gb(self.weights)}, gradients and optimizer "
                f"{_gb(self.training_state)}, activations {_gb(self.activations)}, plus 20% slack)")


def estimate(config: Config, model) -> Estimate:
    """A rough peak for one micro-batch of training.max_length tokens, from the loaded model and the settings.

    Activations follow the usual per-layer count (about 34 values per hidden unit and token at 16 bits,
    attention scores excluded as sdpa and flash attention do not keep them); gradient checkpointing keeps one
    value per hidden unit and token per layer, plus one layer in full. Logits and their gradient are fp32.
    """
    t = config.training
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) + \
        sum(b.numel() * b.element_size() for b in model.buffers())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    moments = 2 if t.optimizer == "adamw_8bit" else 8
    state = trainable * (4 + moments)
    cfg = model.config
    hidden, layers = getattr(cfg, "hidden_size", 0), getattr(cfg, "num_hidden_layers", 0)
    vocab = getattr(cfg, "vocab_size", 0)
    value = 2 if (t.mixed_precision != "no" or config.model.precision != "float32") else 4
    tokens = t.batch_size * t.max_length
    per_layer = tokens * hidden * 17 * value
    kept = tokens * hidden * value * layers + per_layer if t.gradient_checkpointing else per_layer * layers
    logits = tokens * vocab * 4 * 2
    return Estimate(weights, state, kept + logits)


def check_fits(config: Config, model, job_id: int, say, free: int | None = None) -> Estimate | None:
    """On a GPU, before the first step: compare the estimate with free memory and warn when it does not fit.

    Returns the estimate (None without CUDA, where there is nothing to compare: the host's memory is shared).
    """
    import torch

    if free is None:
        if not torch.cuda.is_available():
            return None
        free = torch.cuda.mem_get_info()[0]
    need = estimate(config, model)
    if say is None:
        return need
    if need.total > free:
        say("warning", f"job {job_id} may not fit in GPU memory: it needs {need.text()} and {_gb(free)} is free. "
            "If it runs out of memory it stops at its last checkpoint; to need less, change: "
            + "; ".join(levers(config)))
    else:
        say("info", f"job {job_id} memory estimate: {need.text()}; {_gb(free)} free on the GPU")
    return need


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.0f} MB"
