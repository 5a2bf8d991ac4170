"""A plain Hugging Face Trainer + PEFT script: the yardstick conveyor is compared with.

It trains one `text`-format JSONL file with nothing of conveyor's machinery (no audit, no manifests,
no database), given the data order as a list of example indices. Used by the equivalence test
(same weights) and by benchmarks/overhead.py (same speed).

    python benchmarks/hf_baseline.py MODEL_DIR FILE.jsonl
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class Settings:
    batch_size: int = 4
    grad_accum: int = 2
    learning_rate: float = 2e-4
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_length: int = 512
    seed: int = 42
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple = ("q_proj", "v_proj")


def tokenize_text_file(path: Path, tokenizer, max_length: int) -> list[dict]:
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        text = json.loads(line)["text"]
        bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]  # ChatML families have none
        ids = bos + tokenizer.encode(text + tokenizer.eos_token, add_special_tokens=False)
        ids = ids[:max_length]
        labels = [-100] + ids[1:]  # the BOS position is context only
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def train_plain(model_dir: str, path: Path, order: list[int], s: Settings, out_dir: Path) -> dict:
    """Train with the stock Trainer; returns the adapter weights and the training-phase timing."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = tokenize_text_file(path, tokenizer, s.max_length)
    dataset = [rows[i] for i in order]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False
    set_seed(s.seed)
    model = get_peft_model(model, LoraConfig(r=s.r, lora_alpha=s.alpha, lora_dropout=s.dropout,
                                             target_modules=list(s.target_modules), task_type="CAUSAL_LM"))
    args = TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=s.batch_size, gradient_accumulation_steps=s.grad_accum,
        learning_rate=s.learning_rate, weight_decay=s.weight_decay, max_grad_norm=s.max_grad_norm,
        warmup_steps=s.warmup_steps, lr_scheduler_type="constant_with_warmup", num_train_epochs=1,
        train_sampling_strategy="sequential", save_strategy="no", logging_steps=1, report_to="none", seed=s.seed,
        disable_tqdm=True, dataloader_pin_memory=False,
    )
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    tokens = sum(len(r["input_ids"]) for r in dataset)
    return {"weights": {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()},
            "seconds": seconds, "tokens": tokens, "steps": trainer.state.global_step}


if __name__ == "__main__":
    model_dir, file = sys.argv[1], Path(sys.argv[2])
    n = sum(1 for line in file.read_text().splitlines() if line.strip())
    result = train_plain(model_dir, file, list(range(n)), Settings(), Path("/tmp/hf-baseline"))
    print(f"{result['steps']} steps, {result['tokens'] / result['seconds']:.0f} tokens/s")
