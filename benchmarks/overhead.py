"""What conveyor's machinery costs: conveyor vs a plain Hugging Face Trainer script, same file, same run.

Trains one generated `text` JSONL file on the built-in tiny model both ways (same settings, same data
order), after one untimed warm-up pair, alternating the sides for --repeats rounds; prints medians of:
  - training-phase seconds and tokens/s: time inside `Trainer.train()` on both sides, i.e. the loop
    itself plus conveyor's callbacks, audit, DB writes and end-of-job checkpoint;
  - end-to-end seconds: conveyor's `Daemon.work(drain=True)` (parse, tokenize, load model, train,
    checkpoint, record; enqueue not included), and the whole `train_plain` call (no checkpoint);
  - the same for conveyor with the web dashboard served and a client following it as an open page does;
  - sha256 fingerprint throughput of a large file (MiB/s).

    python benchmarks/overhead.py [--examples N] [--repeats R] [--fingerprint-mb MB] [--threads T]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import timeit
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # the tiny model is local; never touch the network
sys.path.insert(0, str(Path(__file__).resolve().parent))  # for hf_baseline, a sibling script

import torch  # noqa: E402
import transformers  # noqa: E402
from hf_baseline import Settings, train_plain  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from conveyor.config import Config  # noqa: E402
from conveyor.data.models import (
    BUILTIN,  # noqa: E402
    quiet_libraries,  # noqa: E402
)
from conveyor.fingerprint import fingerprint  # noqa: E402
from conveyor.queue.daemon import Daemon  # noqa: E402
from conveyor.queue.inbox import enqueue  # noqa: E402
from conveyor.store.ledger import audit_rows  # noqa: E402
from conveyor.store.workspace import Workspace  # noqa: E402

BATCH, ACCUM, LR, MAX_LENGTH = 8, 1, 1e-3, 128
MODEL = ["tiny"]  # --model: the built-in model both sides train
WORDS = "the a model file step token queue batch run ledger audit learns trains reads writes every one".split()

# conveyor's worker times nothing we can read, and must not be edited: wrap Trainer.train instead (both
# sides go through it). Wall and CPU seconds: CPU time moves far less when other processes share the CPUs.
TRAIN_TIMES: list[tuple[float, float]] = []
_original_train = transformers.Trainer.train


def _timed_train(self, *args, **kwargs):
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        return _original_train(self, *args, **kwargs)
    finally:
        TRAIN_TIMES.append((time.perf_counter() - wall, time.process_time() - cpu))


def write_data(path: Path, n: int) -> None:
    """n deterministic lines of a few dozen characters (a seeded RNG, so every run trains the same bytes)."""
    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            text = f"line {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9)))
            f.write(json.dumps({"text": text}) + "\n")


@contextlib.contextmanager
def dashboard_watching(root: Path):
    """The web dashboard served for the workspace, with a client doing what an open page does (follow the
    event stream, refetch status and metrics on every update). Both run in another process, as with
    `conveyor run --dashboard`, where training happens in a worker process apart from the server."""
    import subprocess

    proc = subprocess.Popen([sys.executable, __file__, "--serve-and-watch", str(root), str(_free_port())])
    time.sleep(3)  # let it import and start following before training begins
    try:
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def serve_and_watch(root: Path, port: int) -> None:
    import threading

    import httpx

    from conveyor.serve.dashboard import build_server

    server = build_server(root, port=port)
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.01)
    last = 0
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        with client.stream("GET", "/api/stream") as stream:
            for line in stream.iter_lines():
                if line.startswith("data:"):  # as the page does: status, then only the new metric rows
                    client.get("/api/status")
                    rows = client.get("/api/metrics", params={"since_step": last}).json().get("rows", [])
                    last = rows[-1]["step"] if rows else last


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_conveyor(root: Path, tiny: Path, data: Path, dashboard: bool = False) -> dict:
    """One fresh workspace, one job; returns timings, tokens and the data order it trained."""
    config = Config()
    config.model.name = MODEL[0]
    t = config.training
    t.batch_size, t.grad_accum, t.learning_rate, t.max_length = BATCH, ACCUM, LR, MAX_LENGTH
    t.save_every, t.warmup_steps = 10**9, 0  # only the end-of-job checkpoint, as a real job always writes
    t.packing = False  # the plain side pads: compare the machinery, not the batch layout (benchmarks/packing.py)
    ws = Workspace.create(root, config)
    shutil.copytree(tiny, ws.models / MODEL[0])  # a copy, so conveyor never spends time building the model
    enqueue(ws, data, epochs=1)
    ws.db.execute("SELECT 1")  # create the database before a dashboard opens it
    with dashboard_watching(root) if dashboard else contextlib.nullcontext():
        start = time.perf_counter()
        ok = Daemon(ws).work(drain=True)
        end_to_end = time.perf_counter() - start
    if not ok:
        raise SystemExit("conveyor's job failed")
    tokens = ws.db.execute("SELECT tokens FROM ledger").fetchone()[0]
    order = [line - 1 for r in audit_rows(ws.db) for line in r["lines"]]  # audit lines are 1-based
    ws.db.close()
    seconds, cpu = TRAIN_TIMES[-1]
    return {"seconds": seconds, "cpu": cpu, "tokens": tokens, "end_to_end": end_to_end, "order": order}


def run_plain(tiny: Path, data: Path, order: list[int], out: Path) -> dict:
    settings = Settings(batch_size=BATCH, grad_accum=ACCUM, learning_rate=LR, max_length=MAX_LENGTH)
    start = time.perf_counter()
    # Its Trainer keeps the PrinterCallback (a dict per step on stdout); send that to /dev/null so the
    # table stays readable and terminal speed does not count against the plain side.
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        result = train_plain(str(tiny), data, order, settings, out)
    seconds, cpu = TRAIN_TIMES[-1]  # the same wrapper as conveyor's side (equal to result["seconds"])
    return {"seconds": seconds, "cpu": cpu, "tokens": result["tokens"], "end_to_end": time.perf_counter() - start}


def fingerprint_speed(folder: Path, mb: int) -> float:
    """MiB/s of conveyor.fingerprint on a freshly written file (page-cached, so this is hashing speed)."""
    path = folder / "big.bin"
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(mb):
            f.write(block)
    return mb / statistics.median(timeit.repeat(lambda: fingerprint(path), number=1, repeat=3))


def rate(rows: list[dict], key: str = "seconds", pick=statistics.median) -> float:
    """Tokens per second of wall (or CPU) time over the repeats: median by default."""
    return pick(r["tokens"] / r[key] for r in rows)


def report(conv: list[dict], plain: list[dict], dash: list[dict], fp_mbps: float, args) -> None:
    # Load avg, CPU-time rates and the best repeat are shown because other processes only ever add wall
    # time: when wall-clock medians disagree with those, the machine was busy, not conveyor.
    table = Table(title=f"conveyor vs plain HF Trainer ({args.model} model)",
                  caption=f"{args.examples} examples, {conv[0]['tokens']} "
                  f"tokens, batch {BATCH}, medians of {args.repeats} repeats, {torch.get_num_threads()} torch "
                  f"thread(s), load avg {os.getloadavg()[0]:.2f}")
    for col in ("side", "train-phase s", "tokens/s", "tokens/CPU-s", "end-to-end s"):
        table.add_column(col, justify="left" if col == "side" else "right")
    for name, rows in (("conveyor", conv), ("conveyor + dashboard", dash), ("plain HF", plain)):
        table.add_row(name, f"{statistics.median(r['seconds'] for r in rows):.2f}", f"{rate(rows):,.0f}",
                      f"{rate(rows, 'cpu'):,.0f}", f"{statistics.median(r['end_to_end'] for r in rows):.2f}")
    console = Console(width=110)
    console.print(table)
    ratio = rate(conv) / rate(plain)
    verdict = "met" if ratio >= 0.97 else "MISSED"
    console.print(f"conveyor tokens/s ÷ plain tokens/s = {ratio:.3f} (target ≥ 0.97: {verdict}); "
                  f"per CPU-s {rate(conv, 'cpu') / rate(plain, 'cpu'):.3f}; "
                  f"best ÷ best {rate(conv, pick=max) / rate(plain, pick=max):.3f}")
    dash_ratio = rate(dash) / rate(conv)
    console.print(f"with the dashboard open ÷ without: {dash_ratio:.3f} (target ≥ 0.97: "
                  f"{'met' if dash_ratio >= 0.97 else 'MISSED'}); per CPU-s {rate(dash, 'cpu') / rate(conv, 'cpu'):.3f}")
    rounds = sorted((c["tokens"] / c["seconds"]) / (p["tokens"] / p["seconds"]) for c, p in zip(conv, plain))
    console.print(f"conveyor ÷ plain per round (interleaved): min {rounds[0]:.3f}, median "
                  f"{statistics.median(rounds):.3f}, max {rounds[-1]:.3f} over {len(rounds)} rounds")
    for name, rows in (("conveyor", conv), ("conveyor + dashboard", dash), ("plain HF", plain)):
        console.print(f"{name} per repeat, train-phase wall/CPU s: "
                      + ", ".join(f"{r['seconds']:.2f}/{r['cpu']:.2f}" for r in rows))
    console.print(f"fingerprint (sha256): {fp_mbps:,.0f} MiB/s on a {args.fingerprint_mb} MiB file, median of 3")


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--serve-and-watch":
        return serve_and_watch(Path(sys.argv[2]), int(sys.argv[3]))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--fingerprint-mb", type=int, default=200)
    # One torch thread by default: with several, any other busy process on the machine makes OpenMP's
    # spin-waiting threads stall (10-40x slower runs seen), which swamps the few per cent measured here.
    parser.add_argument("--threads", type=int, default=1, help="torch threads; 0 keeps torch's default")
    # The less noisy mode: `--model small --repeats 9` (steps of a 26M-parameter model take long enough that
    # scheduler noise and per-job constants weigh little; the spread of the per-round ratios is printed).
    parser.add_argument("--model", choices=["tiny", "small"], default="tiny")
    args = parser.parse_args()
    MODEL[0] = args.model
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet_libraries()
    transformers.Trainer.train = _timed_train
    with tempfile.TemporaryDirectory(prefix="conveyor-bench-") as tmp:
        tmp = Path(tmp)
        tiny = BUILTIN[args.model](tmp / args.model)  # built once; both sides load the same weights
        data = tmp / "data.jsonl"
        write_data(data, args.examples)
        # An untimed warm-up pair pays the one-time costs (lazy imports, first kernels, allocator); its
        # conveyor run also gives the data order (fixed by seed and fingerprint) for every plain run.
        order = run_conveyor(tmp / "ws-warmup", tiny, data)["order"]
        run_plain(tiny, data, order, tmp / "plain-warmup")
        conv, plain, dash = [], [], []
        # Alternate the sides, and which goes first, so drift in machine speed hits all alike.
        for i in range(args.repeats):
            sides = [lambda: conv.append(run_conveyor(tmp / f"ws{i}", tiny, data)),
                     lambda: dash.append(run_conveyor(tmp / f"dash{i}", tiny, data, dashboard=True)),
                     lambda: plain.append(run_plain(tiny, data, order, tmp / f"plain{i}"))]
            for side in sides if i % 2 == 0 else reversed(sides):
                side()
            if conv[-1]["tokens"] != plain[-1]["tokens"]:
                raise SystemExit(f"the sides trained {conv[-1]['tokens']} vs {plain[-1]['tokens']} tokens")
        fp_mbps = fingerprint_speed(tmp, args.fingerprint_mb)
    report(conv, plain, dash, fp_mbps, args)


if __name__ == "__main__":
    main()
