"""Training speed and peak memory of each precision and memory setting on this machine.

Each setting trains the same --examples `text` lines (the built-in --model, tiny or small; LoRA r=8 on q_proj/v_proj, batch 8, grad_accum 1,
max_length 128) with `conveyor train` in a fresh process. Tokens/s counts the trained tokens over the summed
optimizer-step times conveyor records (model load and setup excluded); peak RSS is that process's maximum resident
memory (os.wait4). With --repeats R each setting trains R times and the fastest is shown (other processes on the
machine only ever slow a run down). A setting this machine refuses (fp16 autocast without a GPU) is listed with
the refusal.

    python benchmarks/precision.py [--model tiny|small] [--examples N] [--repeats R] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
WORDS = "the a model file step token queue batch run ledger audit learns trains reads writes every one".split()
BASE = {"training": {"batch_size": 8, "grad_accum": 1, "max_length": 128, "save_every": 1000, "seed": 0}}
SETTINGS = {  # name: changes to BASE
    "fp32": {},
    "bf16 autocast": {"training": {"mixed_precision": "bf16"}},
    "fp16 autocast": {"training": {"mixed_precision": "fp16"}},
    "bf16 base": {"model": {"precision": "bfloat16"}},
    "bf16 base + autocast": {"model": {"precision": "bfloat16"}, "training": {"mixed_precision": "bf16"}},
    "fp16 base": {"model": {"precision": "float16"}},
    "fp32 + grad. checkpointing": {"training": {"gradient_checkpointing": True}},
    "fp32 + adamw_8bit": {"training": {"optimizer": "adamw_8bit"}},
    "nf4 (QLoRA, fp32 compute)": {"model": {"quantization": "nf4"}},
    "nf4 (QLoRA) bf16 + autocast": {"model": {"quantization": "nf4", "precision": "bfloat16"},
                                    "training": {"mixed_precision": "bf16"}},
}


def write_data(path: Path, n: int) -> None:
    rng = random.Random(0)  # seeded: every setting trains the same bytes
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            words = " ".join(rng.choices(WORDS, k=rng.randint(12, 24)))
            f.write(json.dumps({"text": f"example {i}: {words}"}) + "\n")


def measure(name: str, changes: dict, data: Path, model: str, model_dir: Path, root: Path) -> dict:
    from conveyor.config import parse_config
    from conveyor.errors import ConfigError
    from conveyor.store.workspace import Workspace

    sections = json.loads(json.dumps(BASE))
    sections["model"] = {"name": model}
    for section, values in changes.items():
        sections.setdefault(section, {}).update(values)
    try:
        config = parse_config(sections, name)
    except ConfigError as e:
        return {"name": name, "refused": str(e).splitlines()[-1].strip(" -")}
    ws = root / "".join(c if c.isalnum() else "_" for c in name)
    Workspace.create(ws, config)
    shutil.copytree(model_dir, ws / "models" / model)
    proc = subprocess.Popen([sys.executable, "-m", "conveyor", "-w", str(ws), "train", str(data), "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        return {"name": name, "refused": f"exit {proc.returncode}: {out.strip().splitlines()[-1]}"}
    con = sqlite3.connect(ws / "conveyor.db")
    tokens, seconds, steps = con.execute("SELECT SUM(tokens), SUM(step_time), COUNT(*) FROM metrics").fetchone()
    loss = con.execute("SELECT loss FROM metrics ORDER BY step DESC LIMIT 1").fetchone()[0]
    con.close()
    return {"name": name, "steps": steps, "tokens": tokens, "tokens_per_s": tokens / seconds,
            "peak_rss_mb": usage.ru_maxrss / 1024, "last_loss": loss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--only", nargs="*", help="setting names to run (default: all)")
    parser.add_argument("--model", choices=["tiny", "small"], default="tiny", help="the built-in model to train")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="conveyor-precision-") as tmp:
        root = Path(tmp)
        model_dir = root / args.model
        # In a child: a parent that imported torch would inflate every child's peak RSS (fork copies its image).
        subprocess.run([sys.executable, "-c", f"from conveyor.data.models import BUILTIN; BUILTIN[{args.model!r}]"
                        f"({str(model_dir)!r})"], check=True, capture_output=True)
        data = root / "data.jsonl"
        write_data(data, args.examples)
        rows = []
        for name, changes in SETTINGS.items():
            if args.only and name not in args.only:
                continue
            tries = [measure(name, changes, data, args.model, model_dir, root / f"try-{i}") for i in range(args.repeats)]
            rows.append(max(tries, key=lambda r: r.get("tokens_per_s", 0)))
    print(f"{args.model} model, LoRA, {args.examples} examples, batch 8, max_length 128, {os.cpu_count()} CPU(s)\n")
    print(f"{'setting':30} {'steps':>5} {'tokens':>7} {'tokens/s':>9} {'peak RSS MB':>11} {'last loss':>9}")
    for r in rows:
        if "refused" in r:
            print(f"{r['name']:30} refused: {r['refused']}")
            continue
        print(f"{r['name']:30} {r['steps']:>5} {r['tokens']:>7} {r['tokens_per_s']:>9.0f} {r['peak_rss_mb']:>11.0f} "
              f"{r['last_loss']:>9.4f}")


if __name__ == "__main__":
    main()
