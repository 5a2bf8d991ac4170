"""Padding-free batches against padded ones: trainable tokens/s and peak memory, conveyor and plain HF, same run.

For each built-in model (tiny; small with --small) and each length profile, one generated `text` file is trained
three ways, each in a fresh process: conveyor with `training.packing = true` (padding-free), conveyor with
`training.packing = false` (padded, the plain Trainer's layout), and the plain Hugging Face Trainer + PEFT script
(benchmarks/hf_baseline.py, padded) on conveyor's data order. Length profiles, in tokens of the model's tokenizer:
  - skewed: long-tailed (Pareto, alpha 1) between 16 and 1024, as chat logs are: most short, a few very long;
  - uniform: every example 256 tokens (nothing to save: the check that padding-free costs nothing).
Trainable tokens/s counts the tokens that carry loss (every token but the first of each example) over the
training phase (conveyor: the summed optimizer-step times it records; plain: `Trainer.train()`); peak RSS is the
process's maximum resident memory (os.wait4). Batch 8, grad_accum 1, LoRA r=8 on q_proj/v_proj, fp32, max_length 1024.

    python benchmarks/packing.py [--examples N] [--small] [--small-examples N] [--repeats R]
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
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
HERE = Path(__file__).resolve().parent
WORDS = "the a model file step token queue batch run ledger audit learns trains reads writes every one".split()
BATCH, MAX_LENGTH = 8, 1024


def lengths(profile: str, n: int) -> list[int]:
    rng = random.Random(1)
    if profile == "uniform":
        return [256] * n
    return [min(MAX_LENGTH, int(16 * rng.paretovariate(1.0))) for _ in range(n)]


def write_data(path: Path, model_dir: Path, profile: str, n: int) -> None:
    """n lines whose tokenization (with BOS/EOS as conveyor adds them) has about the profile's lengths."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as f:
        for target in lengths(profile, n):
            words: list[str] = []
            while len(tokenizer.encode(" ".join(words), add_special_tokens=False)) < target - 2:
                words.append(rng.choice(WORDS))
            ids = tokenizer.encode(" ".join(words), add_special_tokens=False)[:max(target - 2, 1)]
            f.write(json.dumps({"text": tokenizer.decode(ids)}) + "\n")


def _wait(proc) -> tuple[int, float]:
    _, status, usage = os.wait4(proc.pid, 0)
    return os.waitstatus_to_exitcode(status), usage.ru_maxrss / 1024


def conveyor_side(root: Path, model: str, model_dir: Path, data: Path, packing: bool) -> dict:
    from conveyor.config import parse_config
    from conveyor.store.workspace import Workspace

    config = parse_config({"model": {"name": model}, "training": {
        "batch_size": BATCH, "grad_accum": 1, "max_length": MAX_LENGTH, "save_every": 10**6, "packing": packing}})
    Workspace.create(root, config)
    shutil.copytree(model_dir, root / "models" / model)
    proc = subprocess.Popen([sys.executable, "-m", "conveyor", "-w", str(root), "train", str(data), "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    code, rss = _wait(proc)
    if code != 0:
        raise SystemExit(f"conveyor failed:\n{out}")
    con = sqlite3.connect(root / "conveyor.db")
    tokens, examples, seconds = con.execute("SELECT SUM(tokens), SUM(examples), SUM(step_time) FROM metrics").fetchone()
    order = [line - 1 for (lines,) in con.execute("SELECT lines FROM audit ORDER BY step") for line in json.loads(lines)]
    warnings = json.loads(con.execute("SELECT warnings FROM jobs").fetchone()[0])
    con.close()
    if packing and any("training.packing" in w for w in warnings):
        raise SystemExit(f"conveyor fell back to padding: {warnings}")
    return {"trainable": tokens - examples, "seconds": seconds, "rss": rss, "order": order}


def plain_side(root: Path, model_dir: Path, data: Path, order: list[int]) -> dict:
    """hf_baseline.train_plain in a fresh process, with the settings and data order of conveyor's side."""
    root.mkdir(parents=True)
    (root / "order.json").write_text(json.dumps(order))
    code = (f"import json, sys; sys.path.insert(0, {str(HERE)!r}); from pathlib import Path; "
            f"from hf_baseline import Settings, train_plain; "
            f"r = train_plain({str(model_dir)!r}, Path({str(data)!r}), json.loads(Path({str(root / 'order.json')!r})"
            f".read_text()), Settings(batch_size={BATCH}, grad_accum=1, max_length={MAX_LENGTH}), "
            f"Path({str(root / 'out')!r})); print('RESULT', json.dumps({{'tokens': r['tokens'], 'seconds': "
            f"r['seconds'], 'examples': len(json.loads(Path({str(root / 'order.json')!r}).read_text()))}}))")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    status, rss = _wait(proc)
    result = next((json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")), None)
    if status != 0 or result is None:
        raise SystemExit(f"the plain script failed:\n{out}")
    return {"trainable": result["tokens"] - result["examples"], "seconds": result["seconds"], "rss": rss}


def main() -> None:
    if sys.argv[1:2] == ["--write"]:
        return write_data(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4], int(sys.argv[5]))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=256, help="examples per file on tiny")
    parser.add_argument("--small", action="store_true", help="also the 26M-parameter built-in model `small`")
    parser.add_argument("--small-examples", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=1, help="best of R (other processes only slow a run)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="conveyor-packing-") as tmp:
        root = Path(tmp)
        for model in ["tiny"] + (["small"] if args.small else []):
            model_dir = root / "models" / model
            # In a child: a parent that imported torch would inflate every child's peak RSS (fork copies it).
            subprocess.run([sys.executable, "-c", f"from conveyor.data.models import BUILTIN; BUILTIN[{model!r}]"
                            f"({str(model_dir)!r})"], check=True, capture_output=True)
            n = args.examples if model == "tiny" else args.small_examples
            for profile in ("skewed", "uniform"):
                data = root / f"{model}-{profile}.jsonl"
                # In a child too (the tokenizer imports torch): see above.
                subprocess.run([sys.executable, __file__, "--write", str(data), str(model_dir), profile, str(n)],
                               check=True, capture_output=True)
                best: dict[str, dict] = {}
                for k in range(args.repeats):
                    free = conveyor_side(root / f"{model}-{profile}-free-{k}", model, model_dir, data, True)
                    padded = conveyor_side(root / f"{model}-{profile}-padded-{k}", model, model_dir, data, False)
                    plain = plain_side(root / f"{model}-{profile}-plain-{k}", model_dir, data, free["order"])
                    for side, r in (("conveyor padding-free", free), ("conveyor padded", padded),
                                    ("plain HF padded", plain)):
                        rate = r["trainable"] / r["seconds"]
                        if side not in best or rate > best[side]["rate"]:
                            best[side] = {**r, "rate": rate}
                rows.append((model, profile, n, best))
    print(f"\nbatch {BATCH}, max_length {MAX_LENGTH}, LoRA fp32, {os.cpu_count()} CPU(s), best of {args.repeats}, "
          f"load avg {os.getloadavg()[0]:.2f}\n")
    print(f"{'model':6} {'lengths':8} {'ex.':>4} {'side':24} {'trainable tok/s':>15} {'peak RSS MB':>11} "
          f"{'÷ padded':>9}")
    for model, profile, n, best in rows:
        base = best["conveyor padded"]["rate"]
        for side, r in best.items():
            print(f"{model:6} {profile:8} {n:>4} {side:24} {r['rate']:>15,.0f} {r['rss']:>11,.0f} "
                  f"{r['rate'] / base:>9.2f}")
    for model, profile, _, best in rows:
        ratio = best["conveyor padding-free"]["rate"] / best["conveyor padded"]["rate"]
        target = 1.8 if profile == "skewed" else 1.0
        print(f"{model} {profile}: padding-free ÷ padded = {ratio:.2f} (target ≥ {target}: "
              f"{'met' if ratio >= target else 'MISSED'}); ÷ plain HF = "
              f"{best['conveyor padding-free']['rate'] / best['plain HF padded']['rate']:.2f}")


if __name__ == "__main__":
    start = time.time()
    main()
    print(f"({time.time() - start:.0f} s)")
