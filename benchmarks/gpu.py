"""LoRA and QLoRA on a 0.5B-class model on one GPU: conveyor vs a plain Hugging Face Trainer + PEFT script, same run.

The model is a Qwen2-0.5B-shaped config (24 layers, hidden 896, 14 heads / 2 KV heads, MLP 4864, vocabulary
151,936, tied embeddings: 494M parameters) with seeded random weights, written to a local folder (nothing is
downloaded), with the built-in `small` model's BPE tokenizer. Every example is exactly --seq-len tokens. Both sides
train the same examples in the same order with LoRA r=16 on every linear projection of attention and MLP, batch 1,
gradient accumulation 8, gradient checkpointing, the base in bf16 and bf16 autocast; QLoRA loads the base in nf4
(double quantization, bf16 compute). Printed per setting and side: optimizer steps, trained tokens/s over the
training phase (`Trainer.train()`), peak allocated CUDA memory, and MFU.

MFU counts model FLOPs per trained token as 2·N forward + 2·N backward through the activations (the frozen base
gets no weight gradients under LoRA; the adapter's own FLOPs are < 1% and left out) + the attention scores,
4·L·s·d forward and 8·L·s·d backward (causal halves both), against the GPU's dense bf16 peak: a table of known
GPUs, or --peak-tflops. Recomputation by gradient checkpointing is not counted (it is overhead, as MFU intends).

Without CUDA this prints what it would measure and exits 0; `--smoke` instead runs the same code on CPU with a
2-layer config and 128-token examples (fp32, no QLoRA unless bitsandbytes runs on CPU), to keep the script working
until a GPU is attached. Its numbers mean nothing.

    python benchmarks/gpu.py [--seq-len 2048] [--examples 64] [--only lora|qlora] [--peak-tflops T] [--smoke]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import torch  # noqa: E402
import transformers  # noqa: E402

# Qwen2-0.5B's shape. Only the shape matters for speed and memory; the weights are random.
QWEN2_05B = {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
             "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 32768,
             "tie_word_embeddings": True, "rope_theta": 1000000.0}
SMOKE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 4096, "max_position_embeddings": 512, "tie_word_embeddings": True}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R, ALPHA, BATCH, ACCUM, LR = 16, 32.0, 1, 8, 2e-4
# Dense bf16 tensor-core peaks (TFLOP/s, without sparsity) by a substring of torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 PCIe": 756.0, "H100": 756.0, "A100": 312.0,
                    "L40S": 362.0, "L40": 181.0, "L4": 121.0, "A10G": 70.0, "A10": 125.0, "RTX 4090": 165.0,
                    "RTX 3090": 71.0, "A6000": 155.0, "V100": 0.0, "T4": 0.0}  # V100/T4 have no bf16 cores
WORDS = "the a model file step token queue batch run ledger audit learns trains reads writes every one".split()

TRAIN_SECONDS: list[float] = []
_original_train = transformers.Trainer.train


def _timed_train(self, *args, **kwargs):
    start = time.perf_counter()
    try:
        return _original_train(self, *args, **kwargs)
    finally:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        TRAIN_SECONDS.append(time.perf_counter() - start)


transformers.Trainer.train = _timed_train  # both sides go through it


def make_model_folder(folder: Path, shape: dict, dtype: torch.dtype) -> Path:
    """A Qwen2-architecture folder with seeded random weights and the `small` BPE tokenizer (no download)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from conveyor.data.families import _SMALL, SMALL, make_tokenizer

    tokenizer = make_tokenizer(_SMALL)
    assert SMALL == _SMALL.name and len(tokenizer) <= shape["vocab_size"]
    config = Qwen2Config(**shape, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=None)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2ForCausalLM(config).to(dtype)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_data(path: Path, tokenizer, n: int, seq_len: int) -> None:
    """n lines of text that tokenize to at least seq_len tokens each (training truncates to exactly seq_len)."""
    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            words = [f"line {i}:"]
            while len(tokenizer.encode(" ".join(words), add_special_tokens=False)) < seq_len + 8:
                words += rng.choices(WORDS, k=max(16, seq_len // 4))
            f.write(json.dumps({"text": " ".join(words)}) + "\n")


def conveyor_side(root: Path, model_dir: Path, data: Path, seq_len: int, qlora: bool, smoke: bool) -> dict:
    from conveyor.config import parse_config
    from conveyor.queue.daemon import Daemon
    from conveyor.queue.inbox import enqueue
    from conveyor.store.workspace import Workspace

    bf16 = not smoke
    model = {"name": str(model_dir), "precision": "bfloat16" if bf16 else "float32"}
    if qlora:
        model["quantization"] = "nf4"
    config = parse_config({
        "model": model, "adapter": {"r": R, "alpha": ALPHA, "target_modules": TARGETS},
        "training": {"batch_size": BATCH, "grad_accum": ACCUM, "learning_rate": LR, "max_length": seq_len,
                     "save_every": 10**9, "mixed_precision": "bf16" if bf16 else "no",
                     "gradient_checkpointing": True},
        "daemon": {"min_free_mb": 0}}, "benchmark settings")
    ws = Workspace.create(root, config)
    enqueue(ws, data, epochs=1)
    _reset_peak()
    if not Daemon(ws).work(drain=True):
        raise SystemExit(f"conveyor's job failed: see {ws.logs}")
    tokens, steps = ws.db.execute("SELECT tokens, end_step - start_step + 1 FROM ledger").fetchone()
    ws.db.close()
    return {"steps": steps, "tokens": tokens, "seconds": TRAIN_SECONDS[-1], "peak_gb": _peak_gb()}


def plain_side(out: Path, model_dir: Path, data: Path, seq_len: int, qlora: bool, smoke: bool) -> dict:
    """The same training with nothing of conveyor: Trainer + PEFT as a tutorial would write it."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        BitsAndBytesConfig,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
    )

    dtype = torch.float32 if smoke else torch.bfloat16
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = []
    for line in data.read_text(encoding="utf-8").splitlines():
        ids = tokenizer.encode(json.loads(line)["text"] + tokenizer.eos_token, add_special_tokens=False)[:seq_len]
        rows.append({"input_ids": ids, "labels": list(ids)})
    kwargs = {"dtype": dtype}
    if qlora:
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    _reset_peak()
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    model.config.use_cache = False
    if qlora:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS, task_type="CAUSAL_LM"))
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=BATCH, gradient_accumulation_steps=ACCUM,
        learning_rate=LR, num_train_epochs=1, save_strategy="no", logging_steps=1, report_to="none", seed=42,
        disable_tqdm=True, bf16=not smoke, use_cpu=not torch.cuda.is_available(), gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False}, dataloader_pin_memory=False,
        train_sampling_strategy="sequential")
    trainer = Trainer(model=model, args=args, train_dataset=rows,
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        trainer.train()
    return {"steps": trainer.state.global_step, "tokens": sum(len(r["input_ids"]) for r in rows),
            "seconds": TRAIN_SECONDS[-1], "peak_gb": _peak_gb()}


def _reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gb() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def flops_per_token(shape: dict, seq_len: int) -> float:
    """Model FLOPs per trained token under LoRA (see the module docstring)."""
    d, layers, kv = shape["hidden_size"], shape["num_hidden_layers"], shape["num_key_value_heads"]
    head = d // shape["num_attention_heads"]
    per_layer = d * d * 2 + 2 * d * kv * head + 3 * d * shape["intermediate_size"]  # q, o; k, v; gate, up, down
    matmul_params = layers * per_layer + shape["vocab_size"] * d  # the head is a matmul too (tied or not)
    attention = 12 * layers * seq_len * d / 2  # QK^T and AV: 4·s·d forward + 8·s·d backward per layer, causal
    return 4 * matmul_params + attention


def peak_tflops(given: float | None) -> float | None:
    if given:
        return given
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((value or None for key, value in PEAK_BF16_TFLOPS.items() if key in name), None)


def report(results: list[tuple[str, str, dict]], shape: dict, seq_len: int, peak: float | None) -> None:
    from rich.console import Console
    from rich.table import Table

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (smoke run: numbers mean nothing)"
    table = Table(title=f"LoRA / QLoRA, seq {seq_len}, batch {BATCH} × accum {ACCUM}, on {device}")
    for col in ("setting", "side", "steps", "tokens/s", "peak GiB", "MFU"):
        table.add_column(col, justify="left" if col in ("setting", "side") else "right")
    fpt = flops_per_token(shape, seq_len)
    for setting, side, r in results:
        rate = r["tokens"] / r["seconds"]
        mfu = f"{rate * fpt / (peak * 1e12):.1%}" if peak else "n/a"
        table.add_row(setting, side, str(r["steps"]), f"{rate:,.0f}",
                      f"{r['peak_gb']:.2f}" if r["peak_gb"] is not None else "n/a", mfu)
    Console(width=110).print(table)
    for setting in dict.fromkeys(s for s, _, _ in results):
        pair = {side: r for s, side, r in results if s == setting}
        if len(pair) == 2:
            ratio = (pair["conveyor"]["tokens"] / pair["conveyor"]["seconds"]) / (
                pair["plain HF"]["tokens"] / pair["plain HF"]["seconds"])
            print(f"{setting}: conveyor tokens/s ÷ plain HF tokens/s = {ratio:.3f}")
    if peak is None:
        print("MFU: unknown GPU peak; pass --peak-tflops (dense bf16 TFLOP/s of this GPU)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--examples", type=int, default=64, help="examples per side and setting (8 per step)")
    parser.add_argument("--only", choices=["lora", "qlora"], action="append")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, if not in the table")
    parser.add_argument("--smoke", action="store_true", help="a tiny config on CPU: checks the script, not speed")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.smoke:
        print("No CUDA device: nothing measured. On a GPU this trains LoRA and QLoRA (nf4) on a 494M-parameter "
              f"Qwen2-0.5B-shaped model at {args.seq_len} tokens per example in bf16 with gradient checkpointing, "
              "through conveyor and through a plain Trainer + PEFT script, and prints tokens/s, peak CUDA memory "
              "and MFU against the GPU's bf16 peak. Run with --smoke to check the script on CPU.")
        return 0
    from conveyor.config import installed
    from conveyor.data.models import quiet_libraries

    quiet_libraries()
    shape, seq_len = (SMOKE, min(args.seq_len, 128)) if args.smoke else (QWEN2_05B, args.seq_len)
    examples = min(args.examples, 16) if args.smoke else args.examples
    settings = args.only or ["lora", "qlora"]
    if "qlora" in settings and not installed("bitsandbytes"):
        print("QLoRA skipped: bitsandbytes is not installed (pip install 'conveyor[qlora]')")
        settings.remove("qlora")
    root = Path(tempfile.mkdtemp(prefix="conveyor-gpu-"))
    try:
        model_dir = make_model_folder(root / "model", shape, torch.float32 if args.smoke else torch.bfloat16)
        from transformers import AutoTokenizer

        data = root / "data.jsonl"
        write_data(data, AutoTokenizer.from_pretrained(model_dir), examples, seq_len)
        results = []
        for setting in settings:
            qlora = setting == "qlora"
            results.append((setting, "conveyor", conveyor_side(root / f"ws-{setting}", model_dir, data, seq_len,
                                                              qlora, args.smoke)))
            results.append((setting, "plain HF", plain_side(root / f"plain-{setting}", model_dir, data, seq_len,
                                                            qlora, args.smoke)))
        report(results, shape, seq_len, peak_tflops(args.peak_tflops))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
