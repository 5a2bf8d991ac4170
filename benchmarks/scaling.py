"""Scaling: tokens/s and scaling efficiency of one job on 1, 2 and 4 processes of one node, and on 2 simulated
nodes × 2 processes (two torchrun agents on this machine, `distributed.launcher = "local"`: the several-machine path
with its static rendezvous, nonce check and watchdog), on the built-in `small` model (26M parameters). On CPU with
gloo; on a machine with CUDA the same command uses its GPUs with nccl.

Each row is a fresh workspace and `conveyor train` of one generated `text` file sized so that every row trains
--steps optimizer steps: batch 4 per process, grad_accum 1, max_length 128, one thread per process (OMP_NUM_THREADS,
as torchrun sets it for several). tokens/s is the recorded steps' tokens over their summed step times (the metrics
table), the first --warmup steps left out; efficiency = tokens/s at N processes ÷ (N × tokens/s at 1 process).
With --plain (the default) each process count also runs the stock Trainer + PEFT under torchrun (no audit, no
database, no broadcasts; the same data, order and settings) and "vs plain" is conveyor ÷ plain at that world size.

Strategies (--strategy ddp fsdp): `ddp` holds the whole model on every process; `fsdp` shards it with FSDP2 (under
--method lora, the default, the frozen base is sharded and the adapter whole on every process; under --method full
every weight and optimizer moment). The plain rows are the stock Trainer's DDP either way. benchmarks/fsdp.py adds
peak memory per process for the full fine-tune.

    python benchmarks/scaling.py [--strategy ddp fsdp] [--method lora|full] [--layouts 1x1 1x2 1x4 2x2] [--steps 8]
                                 [--warmup 2] [--threads 1] [--no-plain] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
HERE = Path(__file__).resolve().parent
WORDS = ("the a model file step token queue batch run ledger audit learns trains reads writes every one sky blue "
         "green river sea tree leaf water light night day").split()
BATCH, MAX_LENGTH, LR = 4, 128, 2e-4


@dataclass(frozen=True)
class Layout:
    nodes: int
    nproc: int  # per node

    @property
    def world(self) -> int:
        return self.nodes * self.nproc

    def __str__(self) -> str:
        return f"{self.nodes} × {self.nproc}"

    @classmethod
    def parse(cls, text: str) -> "Layout":
        nodes, nproc = text.lower().split("x")
        return cls(int(nodes), int(nproc))


def write_data(path: Path, n: int) -> None:
    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"text": f"example {i}: " + " ".join(rng.choices(WORDS, k=60))}) + "\n")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rate(rows: list[tuple[int, float]], warmup: int) -> tuple[float, float]:
    """(tokens/s, seconds a step) over the steps after the first `warmup`."""
    kept = rows[warmup:] or rows
    seconds = sum(s for _, s in kept)
    return sum(t for t, _ in kept) / seconds, seconds / len(kept)


def measure(base: Path, model_dir: Path, layout: Layout, strategy: str, method: str, steps: int, warmup: int,
            threads: int) -> dict:
    """One job through `conveyor train` on `layout`: tokens/s, seconds a step, wall seconds."""
    from conveyor.config import parse_config
    from conveyor.store.workspace import Workspace

    root = base / f"{strategy}-{method}-{layout.nodes}x{layout.nproc}"
    data = base / f"data-{layout.world}.jsonl"
    if not data.exists():
        write_data(data, steps * BATCH * layout.world)
    hosts = ["localhost"] * layout.nodes if layout.nodes > 1 else []
    config = parse_config({
        "model": {"name": "small"}, "adapter": {"method": method},
        "training": {"batch_size": BATCH, "grad_accum": 1, "max_length": MAX_LENGTH, "learning_rate": LR,
                     "save_every": 10**6},
        "distributed": {"nproc_per_node": layout.nproc, "hosts": hosts, "strategy": strategy,
                        "rdzv_port": _free_port()}, "daemon": {"min_free_mb": 0}})
    Workspace.create(root, config)
    shutil.copytree(model_dir, root / "models" / "small")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "conveyor", "-w", str(root), "train", str(data), "-q"],
                          capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"conveyor failed on {layout} ({strategy}):\n{done.stdout}\n{done.stderr}")
    con = sqlite3.connect(root / "conveyor.db")
    rows = con.execute("SELECT tokens, step_time FROM metrics ORDER BY step").fetchall()
    con.close()
    rate, step = _rate(rows, warmup)
    return {"rate": rate, "step": step, "wall": time.perf_counter() - start, "steps": len(rows)}


def measure_ddp(base: Path, model_dir: Path, layout: Layout, args) -> dict:
    return measure(base, model_dir, layout, "ddp", args.method, args.steps, args.warmup, args.threads)


def measure_fsdp(base: Path, model_dir: Path, layout: Layout, args) -> dict:
    return measure(base, model_dir, layout, "fsdp", args.method, args.steps, args.warmup, args.threads)


# Strategy -> its row measurement.
STRATEGIES = {"ddp": measure_ddp, "fsdp": measure_fsdp}


def measure_plain(base: Path, model_dir: Path, world: int, args) -> dict:
    """The stock Trainer + PEFT (or full) on `world` processes of torchrun, the same data in the same order."""
    data = base / f"data-{world}.jsonl"
    if not data.exists():
        write_data(data, args.steps * BATCH * world)
    out = base / f"plain-{args.method}-{world}.json"
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
                           str(Path(__file__).resolve()), "--plain-rank", str(data), str(model_dir), str(out),
                           args.method], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"the plain Trainer failed on {world} process(es):\n{done.stdout}\n{done.stderr}")
    rate, step = _rate([tuple(r) for r in json.loads(out.read_text())], args.warmup)
    return {"rate": rate, "step": step, "wall": time.perf_counter() - start}


def plain_rank(data: Path, model_dir: Path, out: Path, method: str) -> None:
    """A rank of the plain run (under torchrun): step times from the Trainer's own callbacks, tokens from the data."""
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        set_seed,
    )

    sys.path.insert(0, str(HERE))
    from hf_baseline import tokenize_text_file

    world = int(os.environ.get("WORLD_SIZE", "1"))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    rows = tokenize_text_file(data, tokenizer, MAX_LENGTH)
    set_seed(42)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                 task_type="CAUSAL_LM"))
    cpu = {"use_cpu": True, "ddp_backend": "gloo"} if not torch.cuda.is_available() and world > 1 else {}
    args = TrainingArguments(output_dir=str(out.parent / f"{out.stem}-out"), per_device_train_batch_size=BATCH,
                             learning_rate=LR, num_train_epochs=1, train_sampling_strategy="sequential",
                             save_strategy="no", logging_steps=1, report_to="none", disable_tqdm=True,
                             dataloader_pin_memory=False, **cpu)
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **kw):
            now = time.perf_counter()
            times.append(now - self.t)
            self.t = now

    trainer = Trainer(model=model, args=args, train_dataset=rows,
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
                      callbacks=[Clock()])
    trainer.train()
    if int(os.environ.get("RANK", "0")) == 0:  # step k trains rows [k·W·B, (k+1)·W·B) across the ranks
        per = world * BATCH
        tokens = [sum(len(r["input_ids"]) for r in rows[k * per:(k + 1) * per]) for k in range(len(times))]
        out.write_text(json.dumps(list(zip(tokens, times))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategy", nargs="+", choices=sorted(STRATEGIES), default=["ddp"])
    parser.add_argument("--method", choices=["lora", "full"], default="lora", help="adapter.method of every row")
    parser.add_argument("--layouts", nargs="+", type=Layout.parse, default=[Layout(1, 1), Layout(1, 2), Layout(1, 4),
                                                                            Layout(2, 2)], help="NODESxPROCS")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps each row trains")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of tokens/s")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every process")
    parser.add_argument("--no-plain", dest="plain", action="store_false", help="skip the plain Trainer rows")
    parser.add_argument("--keep", type=Path, default=None, help="keep the workspaces in this folder")
    args = parser.parse_args()

    sys.path.insert(0, str(HERE.parent))
    import torch

    from conveyor.data.models import ensure_small

    base = args.keep or Path(tempfile.mkdtemp(prefix="conveyor-scaling-"))
    base.mkdir(parents=True, exist_ok=True)
    model_dir = ensure_small(base / "small")
    device = f"{torch.cuda.device_count()} CUDA GPU(s), nccl" if torch.cuda.is_available() else \
        f"CPU ({os.cpu_count()} cores), gloo"
    print(f"# `small` (26M), {args.method}, batch {BATCH} per process, max_length {MAX_LENGTH}, {args.steps} steps "
          f"({args.warmup} left out), {args.threads} thread(s) per process; {device}; torch {torch.__version__}")
    print("| strategy | nodes × processes | tokens/s | efficiency | s/step | plain tokens/s | vs plain | wall (s) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    plain: dict[int, float] = {}
    for strategy in args.strategy:
        alone = None
        for layout in args.layouts:
            got = STRATEGIES[strategy](base, model_dir, layout, args)
            alone = got["rate"] if layout.world == 1 else alone
            if args.plain and layout.world not in plain:
                plain[layout.world] = measure_plain(base, model_dir, layout.world, args)["rate"]
            base_rate = plain.get(layout.world)
            print(f"| {strategy} | {layout} | {got['rate']:,.0f} | "
                  + (f"{got['rate'] / (layout.world * alone):.0%}" if alone else "—")
                  + f" | {got['step']:.2f} | " + (f"{base_rate:,.0f} | {got['rate'] / base_rate:.2f}" if base_rate
                                                   else "— | —")
                  + f" | {got['wall']:.0f} |", flush=True)
    if args.keep is None:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--plain-rank"]:
        plain_rank(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]), sys.argv[5])
    else:
        main()
