"""Inbox latency and idle CPU of the long-running daemon (`conveyor -w WS run`, tiny model, LoRA).

1. Latency: from a file's last write in WS/inbox/ (time.time() right after renaming `name.jsonl.part` to
   `name.jsonl`) to its job's first optimizer step: with batch_size = grad_accum = save_every = 1 that step's
   audit row is committed right before its checkpoint; the time it first shows in a 10 ms poll of the `audit`
   table is taken (not metrics.created_at: a step's metrics row is flushed with the next step). Split by the
   events table: write → "inbox: claimed" (includes settle_seconds), claim → "worker pid P trains job N" (the
   order handed to the warm worker), handoff → first step. "rival CPU": seconds the replacement warm worker,
   spawned at the handoff, spent importing before that first step, competing for the cores. Each file is dropped
   once the previous job is done and a warm worker idles with torch loaded. Target: latency − settle ≤ ~1 s.
2. Idle CPU: queue empty, CPU seconds of the daemon and its children (the warm worker) over --idle-seconds,
   as a percentage of one core. Target: < 1 %.

3. --burst N: N one-line files written into inbox/ at once while the queue is paused (so only taking files in is
   measured): files/s over the first thousand claimed and over the last thousand (with N - 1000 already queued),
   then how long `conveyor stop` takes to end the daemon with files still arriving. Target: the rate does not
   fall as the queue grows; the stop within a few seconds.

    python benchmarks/inbox.py [--files N] [--idle-seconds S] [--settle S]
    python benchmarks/inbox.py --burst 10000
"""

import argparse
import json
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from rich.console import Console
from rich.table import Column, Table

from conveyor.config import Config
from conveyor.store.workspace import Workspace


def make_workspace(root: Path, settle: float) -> None:
    config = Config()
    config.training.batch_size, config.training.grad_accum, config.training.save_every = 1, 1, 1
    config.inbox.settle_seconds = settle
    Workspace.create(root, config).model_path("tiny")  # makes the model now, or the first job would pay for it


def wait_for(predicate, timeout: float, what: str, every: float = 0.01):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := predicate():
            return result
        time.sleep(every)
    raise TimeoutError(f"gave up after {timeout:.0f} s waiting for {what}")


def workers(pid: int) -> list[psutil.Process]:
    """The daemon's live worker processes (a finished one stays a zombie until the daemon's next poll)."""
    return [p for p in psutil.Process(pid).children() if p.status() != psutil.STATUS_ZOMBIE and "worker" in p.cmdline()]


def cpu_seconds(procs: list[psutil.Process]) -> float:
    return sum(sum(p.cpu_times()[:2]) for p in procs)  # user + system; raises if one died (idle: it must not)


def warm_worker_ready(pid: int) -> bool:
    """One warm worker, torch loaded, no CPU used for 1 s: it is blocked reading its order, imports done."""
    try:
        warm = workers(pid)
        if len(warm) != 1 or not any("libtorch" in m.path for m in warm[0].memory_maps()):
            return False
        before = cpu_seconds(warm)
        time.sleep(1.0)
        return cpu_seconds(warm) - before < 0.02
    except psutil.Error:
        return False  # a process exited while being looked at: ask again


def drop(inbox: Path, name: str) -> float:
    part = inbox / f"{name}.part"  # the daemon ignores .part files
    with open(part, "w", encoding="utf-8") as f:  # 20 steps; the name in each line: no duplicate-bytes warning
        f.writelines(json.dumps({"text": f"{name} line {i}: the queue trains every file"}) + "\n" for i in range(20))
    os.rename(part, inbox / name)  # atomic: the daemon never sees a half-written .jsonl
    return time.time()


def measure_file(con: sqlite3.Connection, ws: Path, pid: int, name: str) -> dict:
    q = lambda sql, *args: con.execute(sql, args).fetchone()  # noqa: E731
    wait_for(lambda: warm_worker_ready(pid), 120, "a warm worker", every=0.2)
    written = drop(ws / "inbox", name)
    job = wait_for(lambda: q("SELECT id FROM jobs WHERE file = ?", name), 60, "the claim")[0]
    wait_for(lambda: q("SELECT 1 FROM audit WHERE job_id = ?", job), 120, "the first step")
    first_step = time.time()  # within ~10 ms (the poll) of the commit
    claimed = q("SELECT ts FROM events WHERE message LIKE ?", f"inbox: claimed {name} as job %")[0]
    handoff, order = q("SELECT ts, message FROM events WHERE kind = 'worker' AND job_id = ?", job)
    rival = cpu_seconds([p for p in workers(pid) if str(p.pid) not in order.split()])  # spawned at the handoff
    wait_for(lambda: q("SELECT state FROM jobs WHERE id = ?", job)[0] == "done", 600, f"job {job}", every=0.1)
    return {"file": name, "job": job, "latency": first_step - written, "claim": claimed - written,
            "handoff": handoff - claimed, "step": first_step - handoff, "rival": rival}


def idle_cpu(pid: int, seconds: float) -> tuple[float, int]:
    wait_for(lambda: warm_worker_ready(pid), 120, "a warm worker", every=0.2)
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    before, start = cpu_seconds(procs), time.monotonic()
    time.sleep(seconds)
    return 100 * (cpu_seconds(procs) - before) / (time.monotonic() - start), len(procs)


def stop(daemon: subprocess.Popen) -> None:
    """SIGTERM (a clean stop), then make sure neither the daemon nor a worker outlives the benchmark."""
    children = psutil.Process(daemon.pid).children(recursive=True) if daemon.poll() is None else []
    daemon.send_signal(signal.SIGTERM)
    try:
        daemon.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(daemon.pid, signal.SIGKILL)  # its own session (start_new_session): nothing else is hit
        daemon.wait()
    for p in children:  # workers call setpgrp, so the group kill above would miss them
        if p.is_running():
            p.kill()


def report(rows: list[dict], settle: float, cpu: float, nprocs: int, seconds: float, code) -> None:
    keys = ("latency", "claim", "handoff", "step", "rival")
    table = Table("file", *(Column(c, justify="right") for c in ("job", "latency", "write→claim", "claim→handoff",
                  "handoff→step", "rival CPU", "latency−settle")),
                  title=f"inbox → first optimizer step, seconds (settle_seconds = {settle:g})")
    med = {k: statistics.median(r[k] for r in rows) for k in keys}
    for r in [*rows, {"file": "median", "job": "", **med}]:
        table.add_row(r["file"], str(r["job"]), *(f"{r[k]:.3f}" for k in keys), f"{r['latency'] - settle:.3f}")
    summary = Table("measure", "value", "target", "met", title="targets")
    late = med["latency"] - settle
    summary.add_row("median latency − settle, s", f"{late:.3f}", "≤ 1", "yes" if late <= 1 else "NO")
    summary.add_row(f"idle CPU over {seconds:g} s, % of one core ({nprocs} processes)", f"{cpu:.2f}", "< 1",
                    "yes" if cpu < 1 else "NO")
    console = Console(width=max(Console().width, 110))  # a pipe gets 80 columns: too narrow for these headers
    console.print(table, summary, f"daemon exit code after SIGTERM: {code}")


def burst(n: int, settle: float) -> None:
    """Take in n files written at once (queue paused: no training), then stop the daemon with more arriving."""
    from conveyor.store import controls

    with tempfile.TemporaryDirectory(prefix="conveyor-burst-") as tmp:
        ws = Path(tmp) / "ws"
        make_workspace(ws, settle)
        controls.hold(Workspace.open(ws).db, "benchmark", "paused by benchmarks/inbox.py --burst")
        for i in range(n + 200):  # 200 more, written while it stops
            (ws / ("spare" if i >= n else "inbox")).mkdir(exist_ok=True)
            folder = ws / ("spare" if i >= n else "inbox")
            (folder / f"b{i:05d}.jsonl").write_text(json.dumps({"text": f"burst file {i}"}) + "\n")
        con = sqlite3.connect(ws / "conveyor.db", timeout=30)
        count = lambda: con.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]  # noqa: E731
        with open(ws / "daemon.out", "w") as log:
            daemon = subprocess.Popen([sys.executable, "-m", "conveyor", "-w", str(ws), "run"], stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True)
            marks: dict[int, float] = {}
            try:
                start = time.monotonic()
                for mark in sorted({min(1000, n), max(n - 1000, 0), n}):
                    wait_for(lambda: count() >= mark, 3600, f"{mark} files taken in", every=0.05)
                    marks[mark] = time.monotonic()
                for path in (ws / "spare").iterdir():  # more arrive; then `conveyor stop`
                    path.rename(ws / "inbox" / path.name)
                asked = time.monotonic()
                subprocess.run([sys.executable, "-m", "conveyor", "-w", str(ws), "stop"], capture_output=True)
                daemon.wait(timeout=120)
                stopped = time.monotonic() - asked
            finally:
                stop(daemon)
        first, last = min(1000, n), n - max(n - 1000, 0)
        table = Table("measure", Column("value", justify="right"), title=f"{n} files at once (settle {settle:g} s)")
        table.add_row("files/s, the first 1000", f"{first / (marks[min(1000, n)] - start):.1f}")
        table.add_row(f"files/s, the last 1000 ({max(n - 1000, 0)} already queued)",
                      f"{last / (marks[n] - marks[max(n - 1000, 0)]):.1f}")
        table.add_row(f"all {n}, s", f"{marks[n] - start:.1f}")
        table.add_row("`conveyor stop` → daemon ended, s (200 more files arriving)", f"{stopped:.2f}")
        Console(width=110).print(table, f"daemon exit code: {daemon.returncode}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=5)
    parser.add_argument("--idle-seconds", type=float, default=30.0)
    parser.add_argument("--settle", type=float, default=1.0, help="[inbox] settle_seconds")
    parser.add_argument("--burst", type=int, default=0, help="take in this many files at once instead (see 3.)")
    args = parser.parse_args()
    if args.burst:
        return burst(args.burst, args.settle)
    with tempfile.TemporaryDirectory(prefix="conveyor-inbox-") as tmp:
        ws = Path(tmp) / "ws"
        make_workspace(ws, args.settle)
        with open(ws / "daemon.out", "w") as log:  # a file, not a pipe: an unread pipe could fill and block it
            daemon = subprocess.Popen([sys.executable, "-m", "conveyor", "-w", str(ws), "run"], stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True)
            try:
                wait_for(lambda: "watching" in (ws / "daemon.out").read_text(), 60, "the daemon", every=0.1)
                con = sqlite3.connect(ws / "conveyor.db", timeout=30)
                rows = [measure_file(con, ws, daemon.pid, f"in-{i:03d}.jsonl") for i in range(args.files)]
                cpu, nprocs = idle_cpu(daemon.pid, args.idle_seconds)
            except BaseException:  # the workspace is about to be deleted: show why the daemon did not deliver
                print((ws / "daemon.out").read_text()[-4000:], file=sys.stderr)
                raise
            finally:
                stop(daemon)
        report(rows, args.settle, cpu, nprocs, args.idle_seconds, daemon.returncode)


if __name__ == "__main__":
    main()
