"""FSDP2 throughput: tokens/s of a full fine-tune of the built-in `small` model (26M parameters) at 1, 2 and 4
processes with distributed.strategy = "fsdp" (and "ddp" beside it with --strategy), and the scaling efficiency
against one process (tokens/s at N / (N × tokens/s at 1)).

Each row is a fresh workspace and `conveyor train` of one generated `text` file through torchrun (gloo on CPU, nccl
on CUDA: the same command uses the GPUs where there are some). Tokens/s is the tokens of the steps the worker
recorded over their summed step times (metrics table), the first --warmup steps left out; one thread per process
(--threads; torchrun's default, so that the one-process row is one worker); batch 4 per process,
grad_accum 1, max_length 128, fp32, no checkpoint but the job's last. Peak RSS is the largest of the run's processes
(os.wait4 over the whole tree: torchrun's agent and its ranks).

benchmarks/scaling.py (the DDP part and the several-node rows, another engineer's) was not there when this was
written; its FSDP rows are these.

    python benchmarks/fsdp.py [--procs 1 2 4] [--strategy fsdp ddp] [--steps 8] [--warmup 2] [--threads T]
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
WORDS = ("the a model file step token queue batch run ledger audit learns trains reads writes every one sky blue "
         "green river sea tree leaf water light night day").split()
BATCH, MAX_LENGTH = 4, 128


def write_data(path: Path, n: int) -> None:
    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"text": f"example {i}: " + " ".join(rng.choices(WORDS, k=60))}) + "\n")


def one(root: Path, model_dir: Path, data: Path, procs: int, strategy: str, threads: int | None) -> dict:
    from conveyor.config import parse_config
    from conveyor.store.workspace import Workspace

    config = parse_config({
        "model": {"name": "small"}, "adapter": {"method": "full"},
        "training": {"batch_size": BATCH, "grad_accum": 1, "max_length": MAX_LENGTH, "save_every": 10**6},
        "distributed": {"nproc_per_node": procs, "strategy": strategy}, "daemon": {"min_free_mb": 0}})
    Workspace.create(root, config)
    shutil.copytree(model_dir, root / "models" / "small")
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "conveyor", "-w", str(root), "train", str(data), "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"conveyor failed at {procs} process(es), {strategy}:\n{out}")
    con = sqlite3.connect(root / "conveyor.db")
    rows = con.execute("SELECT tokens, step_time FROM metrics ORDER BY step").fetchall()
    con.close()
    return {"rows": rows, "wall": time.perf_counter() - start, "rss": usage.ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--strategy", nargs="+", choices=["fsdp", "ddp"], default=["fsdp"])
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps a run trains")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of tokens/s")
    parser.add_argument("--threads", type=int, default=1,
                        help="OMP_NUM_THREADS per process (1, as torchrun sets it, so one process is one worker)")
    parser.add_argument("--keep", type=Path, default=None, help="keep the workspaces in this folder")
    args = parser.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import torch

    from conveyor.data.models import ensure_small

    base = args.keep or Path(tempfile.mkdtemp(prefix="conveyor-fsdp-"))
    model_dir = ensure_small(base / "small")
    device = f"{torch.cuda.device_count()} CUDA GPU(s), nccl" if torch.cuda.is_available() else \
        f"CPU ({os.cpu_count()} cores), gloo"
    print(f"# full fine-tune of `small` (26M), batch {BATCH} per process, max_length {MAX_LENGTH}, {args.steps} steps "
          f"({args.warmup} left out), {args.threads} thread(s) a process; {device}; torch {torch.__version__}; "
          f"load average before: {os.getloadavg()[0]:.1f}")
    print("| strategy | processes | tokens/s | efficiency | step (s) | wall (s) | peak RSS (MB) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for strategy in args.strategy:
        alone = None
        for procs in args.procs:
            data = base / f"data-{procs}.jsonl"
            write_data(data, args.steps * BATCH * procs)
            got = one(base / f"{strategy}-{procs}", model_dir, data, procs, strategy, args.threads)
            kept = got["rows"][args.warmup:]
            rate = sum(t for t, _ in kept) / sum(s for _, s in kept)
            alone = rate if procs == 1 else alone
            efficiency = f"{rate / (procs * alone):.0%}" if alone else "—"
            step = sum(s for _, s in kept) / len(kept)
            print(f"| {strategy} | {procs} | {rate:,.0f} | {efficiency} | {step:.2f} | {got['wall']:.0f} | "
                  f"{got['rss']:.0f} |", flush=True)
    if args.keep is None:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
