"""Files of gigabytes: what enqueueing, tokenizing and resuming cost, and whether memory stays flat as files grow.

For each --sizes (GB), a generated `text` JSONL file (short English-like lines, ~180 bytes each) goes through:
  - fingerprint: conveyor's streaming sha256 (MiB/s; the file was just written, so it is page-cached);
  - enqueue: `conveyor add FILE` in a fresh process (the daemon's own claim path: copy + hash, then a streamed
    validation and count), its wall time and peak RSS;
  - first start: `conveyor run --drain` killed right after step 2 (tiny model, batch 8, max_length 64): the whole
    file is tokenized once into memory-mapped arrays; wall time and peak RSS of the training process;
  - resume at 1% and 99% of the file's steps (benchmarks/resume.py's method: step 1's checkpoint relabelled as
    step k, the database as a kill after step k+1 leaves it), timed to the first new optimizer step, with the
    resuming process's peak RSS.
The plain Hugging Face Trainer is not run here: it needs the whole tokenized file in memory (a `datasets` or
list dataset), which is what this benchmark measures conveyor without. Targets (issue "Throughput and scale"):
daemon (enqueue) peak RSS < 300 MB; worker RSS independent of file size; fingerprint ≥ 1 GB/s; resume at 99%
within 1.2× of resume at 1%.

    python benchmarks/scale.py [--sizes 0.1 1.0] [--threads T] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import resume  # noqa: E402  (its prefix, relabelling and child are reused as they are)

WORDS = ("the a model file step token queue batch run ledger audit learns trains reads writes every one sky blue "
         "green river sea tree leaf water light night day").split()


def write_data(path: Path, gigabytes: float) -> int:
    """Lines of ~180 bytes until the file holds `gigabytes`; returns the line count."""
    rng = random.Random(0)
    target, written, lines = int(gigabytes * 1e9), 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            chunk = "".join(json.dumps({"text": f"example {lines + i}: " + " ".join(rng.choices(WORDS, k=30))})
                            + "\n" for i in range(10_000))
            f.write(chunk)
            written += len(chunk.encode())
            lines += 10_000
    return lines


def timed(cmd: list[str], env: dict | None = None) -> tuple[int, float, float, str]:
    """(exit code, wall seconds, peak RSS MB, output) of a child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    return os.waitstatus_to_exitcode(status), time.perf_counter() - start, usage.ru_maxrss / 1024, out


def fingerprint_speed(path: Path) -> float:
    from conveyor.fingerprint import fingerprint

    start = time.perf_counter()
    fingerprint(path)
    return path.stat().st_size / (1 << 20) / (time.perf_counter() - start)


def workspace(root: Path, tiny: Path) -> Path:
    from conveyor.config import Config
    from conveyor.store.workspace import Workspace

    config = Config()
    t = config.training
    t.batch_size, t.grad_accum, t.max_length, t.save_every = resume.BATCH, 1, resume.MAX_LENGTH, 1
    config.daemon.min_free_mb = 0
    Workspace.create(root, config)
    shutil.copytree(tiny, root / "models" / "tiny")
    return root


def resume_at(ws: Path, k: int, tiny: Path, data: Path, planned: int, threads: int) -> dict:
    target = resume.copy_workspace(ws, ws.parent / f"{ws.name}-at-{k}")
    # In a child: the audit rows of k steps are large, and a grown parent inflates its children's peak RSS.
    subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(HERE)!r}); import resume; "
                    f"from pathlib import Path; resume.conveyor_crash_at(Path({str(target)!r}), {k})"], check=True)
    out = target.parent / f"{target.name}.json"
    code, wall, rss, text = timed([sys.executable, str(HERE / "resume.py"), "--child", "conveyor", "--target",
                                   str(target), "--out", str(out), "--tiny", str(tiny), "--data", str(data),
                                   "--planned", str(planned), "--threads", str(threads)])
    if code != 0 or not out.exists():
        raise SystemExit(f"resume at step {k} failed ({code}):\n{text[-3000:]}")
    result = json.loads(out.read_text())
    assert result["step"] == k + 1, result
    shutil.rmtree(target)
    return {"seconds": result["seconds"], "rss": rss}


def one_size(root: Path, tiny: Path, gigabytes: float, threads: int) -> dict:
    data = root / f"data-{gigabytes:g}GB.jsonl"
    lines = write_data(data, gigabytes)
    row = {"gb": data.stat().st_size / 1e9, "lines": lines, "fingerprint": fingerprint_speed(data)}
    ws = workspace(root / f"ws-{gigabytes:g}", tiny)
    code, row["enqueue_s"], row["enqueue_rss"], out = timed([sys.executable, "-m", "conveyor", "-w", str(ws), "add",
                                                             str(data)])
    assert code == 0, out
    data.unlink()  # the workspace holds its own copy in data/; keep the disk for the tokenized arrays
    cmd = [sys.executable, "-m", "conveyor", "-w", str(ws), "run", "--drain", "-q"]
    code, row["first_s"], row["first_rss"], out = timed(cmd, {"CONVEYOR_FAILPOINT": "step:2"})
    assert code == -9, out[-3000:]
    planned = -(-lines // resume.BATCH)
    stored = next((ws / "data").glob("*.jsonl"))
    for share in resume.POSITIONS[::2]:  # 1% and 99%
        k = max(2, int(planned * share))
        row[f"resume_{share}"] = resume_at(ws, k, tiny, stored, planned, threads)
    shutil.rmtree(ws)
    return row


def report(rows: list[dict]) -> None:
    print(f"\n{os.cpu_count()} CPU(s), load avg {os.getloadavg()[0]:.2f}; tiny model, batch {resume.BATCH}, "
          f"max_length {resume.MAX_LENGTH}\n")
    head = (f"{'file GB':>7} {'lines':>10} {'sha256 MiB/s':>12} {'enqueue s':>9} {'enqueue RSS MB':>14} "
            f"{'tokenize+2 steps s':>18} {'its RSS MB':>10} {'resume 1% s':>11} {'RSS MB':>7} {'resume 99% s':>12} "
            f"{'RSS MB':>7} {'99%÷1%':>6}")
    print(head)
    for r in rows:
        a, b = r["resume_0.01"], r["resume_0.99"]
        print(f"{r['gb']:>7.2f} {r['lines']:>10,} {r['fingerprint']:>12,.0f} {r['enqueue_s']:>9.1f} "
              f"{r['enqueue_rss']:>14.0f} {r['first_s']:>18.1f} {r['first_rss']:>10.0f} {a['seconds']:>11.1f} "
              f"{a['rss']:>7.0f} {b['seconds']:>12.1f} {b['rss']:>7.0f} {b['seconds'] / a['seconds']:>6.2f}")


def main() -> None:
    if "--child" in sys.argv:
        raise SystemExit("the child side is benchmarks/resume.py's")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[0.1, 1.0], help="file sizes in GB")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--keep", help="a folder to work in and keep (default: a temporary one, removed)")
    args = parser.parse_args()
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="conveyor-scale-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        tiny = root / "tiny"
        # In a child: a parent that imported torch would inflate every child's peak RSS (fork copies its image).
        subprocess.run([sys.executable, "-c", f"from conveyor.data.tiny import ensure_tiny; ensure_tiny({str(tiny)!r})"],
                       check=True, capture_output=True)
        rows = [one_size(root, tiny, size, args.threads) for size in args.sizes]
        report(rows)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
