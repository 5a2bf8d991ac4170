"""The dashboard on a run of a million steps and ten thousand jobs: what each API costs, in wall-clock time.

Builds a workspace database (about 15 s) with one run of STEPS steps (TRAINED jobs of PER_JOB steps, the last one
running, then QUEUED queued jobs and rejected ones), two ledger rows a trained job, an evaluation every 100 steps,
a sample every 10,000; the metrics go through the real write path, which keeps the rollups. A second run branches
from the version at BRANCH_AT (a rollback's run) and trains BRANCH_STEPS steps of its own, so that its series
read along its lineage: the parent's steps up to BRANCH_AT, then its own.

For each endpoint (and the event stream's per-second snapshot) it prints the rows returned, the best of --tries
calls after a warm-up one in ms (a busy machine slows some calls, not all), and the response size. Target (issue
"Throughput and scale"): every endpoint under 100 ms on a quiet machine. What does not depend on the machine
(rows read, query plans, response sizes, exact extremes) is asserted in tests/serve/test_dashboard_scale.py, which
builds the same workspace with `build`.

    python benchmarks/dashboard_scale.py [--tries 5] [--keep DIR]
"""

from __future__ import annotations

import argparse
import math
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

from fastapi.testclient import TestClient
from rich.console import Console
from rich.table import Column, Table

from conveyor.config import Config
from conveyor.serve.api import snapshot
from conveyor.serve.dashboard import create_app
from conveyor.store import database as store
from conveyor.store import ledger
from conveyor.store.workspace import Workspace

LOCAL = "http://127.0.0.1:8750"
RUN, BRANCH = "run-0001", "run-0002"
STEPS = 1_000_000
JOBS = 10_000
TRAINED = 8_000  # jobs 1..TRAINED trained STEPS / TRAINED steps each; the last of them is running
PER_JOB = STEPS // TRAINED
QUEUED = 1_900  # then queued jobs; the rest were rejected
BRANCH_AT = 4_000 * PER_JOB  # the end of job 4000: version 4000, which the branch rolled back to
BRANCH_STEPS = 100_000
TARGET_MS = 100

# (path, the most rows it may return, where they are in the body: a key, or None for a list)
ENDPOINTS = [
    ("/api/status", 100, "jobs"), ("/api/runs", 2, None), ("/api/jobs", 200, "jobs"),
    ("/api/jobs?offset=5000&limit=1000", 1000, "jobs"), ("/api/ledger", 200, "rows"),
    ("/api/ledger?offset=15000&limit=1000", 1000, "rows"), ("/api/metrics", 2000, "rows"),
    ("/api/metrics?points=5000", 5000, "rows"), ("/api/metrics?points=4000&start=123457&end=876543", 4000, "rows"),
    ("/api/metrics?start=990001&points=4000", 4000, "rows"), ("/api/metrics?start=999001", 2000, "rows"),
    ("/api/metrics?since_step=999990", 10, "rows"), ("/api/evals", 2000, "rows"),
    ("/api/evals?points=5000&start=1000", 5000, "rows"), ("/api/events", 200, None),
    ("/api/samples", 20, "rows"), ("/api/set_evals", 10, "rows"),
    # the branch: its parent's steps up to BRANCH_AT, then its own
    (f"/api/metrics?run={BRANCH}", 2000, "rows"),
    (f"/api/metrics?run={BRANCH}&start={BRANCH_AT - 999}&end={BRANCH_AT + 1000}", 2000, "rows"),
    (f"/api/evals?run={BRANCH}", 2000, "rows"), (f"/api/ledger?run={BRANCH}", 200, "rows"),
    (f"/api/ledger?run={BRANCH}&offset=7000&limit=1000", 1000, "rows"), (f"/api/samples?run={BRANCH}", 20, "rows"),
    (f"/api/set_evals?run={BRANCH}", 10, "rows"),
]


def metric(step: int) -> dict:
    """A made-up step: a slowly falling, noisy loss (a spike every 7919 steps), NULL learning rate on some."""
    noise = random.Random(step).random()
    loss = 2 + 3 * math.exp(-step / 200_000) + 0.5 * math.sin(step / 997) + noise + (5 if step % 7919 == 0 else 0)
    return {"step": step, "job_id": (step - 1) // PER_JOB + 1, "loss": loss,
            "learning_rate": None if step % 1000 == 0 else 1e-4 * (1 + noise), "grad_norm": 0.5 + noise,
            "tokens": 400 + step % 97, "examples": 8, "step_time": 0.1 + noise / 10}


def branch_metric(step: int) -> dict:
    """The branch's own steps: other losses than the parent's same steps (a tenth lower)."""
    return {**metric(step), "loss": metric(step)["loss"] - 0.1}


def _jobs_rows(now: float) -> list[tuple]:
    rows = []
    for k in range(1, JOBS + 1):
        trained = k <= TRAINED
        state = ("running" if k == TRAINED else "done") if trained else "queued" if k <= TRAINED + QUEUED else \
            "rejected"
        first, last = ((k - 1) * PER_JOB + 1, k * PER_JOB) if trained else (None, None)
        rows.append((RUN if trained else None, f"f{k}.jsonl", f"/in/f{k}.jsonl", f"/data/{k}", f"{k:064x}", "text",
                     1, state, 32, 2 if trained else None, PER_JOB if trained else None, first, last,
                     PER_JOB if trained else 0, "bad line 3" if state == "rejected" else None, now))
    return rows


def _ledger_rows(now: float) -> list[tuple]:
    """Two segments a trained job (stopped once mid-way), so more ledger rows than jobs."""
    rows = []
    for k in range(1, TRAINED):
        first, last = (k - 1) * PER_JOB + 1, k * PER_JOB
        rows.append((RUN, k, first, first + 59, 15, 1, 6000, 3.0, 2.9, 2.95, "interrupted", now))
        rows.append((RUN, k, first + 60, last, 17, 1, 7000, 2.9, 2.8, 2.85, "done", now))
    return rows


def build(con, now: float, branch_steps: int = BRANCH_STEPS) -> None:
    """Runs, jobs, ledger, evals, samples and events with executemany in one transaction; the metrics through the
    real write path (which keeps the rollups) in chunks of 100k steps. With `branch_steps`, BRANCH branches from
    the version at BRANCH_AT and trains that many steps of its own (metrics, an evaluation every 100 steps and a
    sample every 10,000; no ledger rows yet: its job is under way)."""
    with store.transaction(con):
        con.execute("INSERT INTO runs (id, created_at, identity, global_step, active) VALUES (?, ?, '{}', ?, 1)",
                    (RUN, now, STEPS))
        con.executemany("INSERT INTO jobs (run_id, file, source, stored, fingerprint, format, priority, state,"
                        " examples, epochs, planned_steps, start_step, end_step, steps_done, error, created_at)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", _jobs_rows(now))
        con.executemany("INSERT INTO ledger (run_id, job_id, start_step, end_step, examples, epochs, tokens,"
                        " first_loss, last_loss, mean_loss, outcome, created_at)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", _ledger_rows(now))
        con.executemany("INSERT INTO evals VALUES (?, ?, ?, ?, 64, ?)",
                        [(RUN, s, (s - 1) // PER_JOB + 1, 3 + math.sin(s / 5000), now)
                         for s in range(100, STEPS + 1, 100)])
        con.executemany("INSERT INTO samples (run_id, step, prompt, output, created_at) VALUES (?, ?, 'p', 'o', ?)",
                        [(RUN, s, now) for s in range(10_000, STEPS + 1, 10_000)])
        con.executemany("INSERT INTO set_evals (run_id, step, name, job_id, loss, examples, tokens, created_at)"
                        " VALUES (?, ?, 'job 1', 1, ?, 16, 500, ?)",
                        [(RUN, s, 3 + s / STEPS, now) for s in range(100_000, STEPS + 1, 100_000)])
        con.executemany("INSERT INTO events (ts, level, kind, job_id, message) VALUES (?, 'info', 'done', ?, ?)",
                        [(now, k, f"job {k} done") for k in range(1, 2 * JOBS)])
        if branch_steps:
            _branch(con, now, branch_steps)
    for start in range(1, STEPS + 1, 100_000):
        ledger.write_steps(con, RUN, [], [metric(s) for s in range(start, start + 100_000)])
    for start in range(BRANCH_AT + 1, BRANCH_AT + branch_steps + 1, 100_000):
        last = min(start + 100_000, BRANCH_AT + branch_steps + 1)
        ledger.write_steps(con, BRANCH, [], [branch_metric(s) for s in range(start, last)])


def _branch(con, now: float, steps: int) -> None:
    """BRANCH, branched from the version at the end of job BRANCH_AT / PER_JOB (a rollback's run)."""
    version = con.execute("INSERT INTO versions (run_id, job_id, step, created_at) VALUES (?, ?, ?, ?)",
                          (RUN, BRANCH_AT // PER_JOB, BRANCH_AT, now)).lastrowid
    con.execute("INSERT INTO runs (id, created_at, identity, global_step, active, parent_run, parent_version)"
                " VALUES (?, ?, '{}', ?, 0, ?, ?)", (BRANCH, now + 1, BRANCH_AT + steps, RUN, version))
    last = BRANCH_AT + steps
    con.executemany("INSERT INTO evals VALUES (?, ?, ?, ?, 64, ?)",
                    [(BRANCH, s, (s - 1) // PER_JOB + 1, 2.5 + math.sin(s / 5000), now)
                     for s in range(BRANCH_AT + 100, last + 1, 100)])
    con.executemany("INSERT INTO samples (run_id, step, prompt, output, created_at) VALUES (?, ?, 'p', 'b', ?)",
                    [(BRANCH, s, now) for s in range(BRANCH_AT + 10_000, last + 1, 10_000)])
    con.executemany("INSERT INTO set_evals (run_id, step, name, job_id, loss, examples, tokens, created_at)"
                        " VALUES (?, ?, 'job 1', 1, ?, 16, 500, ?)",
                    [(BRANCH, s, 2 + s / STEPS, now) for s in range(BRANCH_AT + 100_000, last + 1, 100_000)])


def make(root: Path) -> Path:
    """The workspace at `root`, built (printing how long that took)."""
    ws = Workspace.create(root, Config())
    began = time.perf_counter()
    build(ws.db, time.time())
    ws.db.close()
    print(f"built {STEPS:,} steps (and a branch of {BRANCH_STEPS:,}), {JOBS:,} jobs in "
          f"{time.perf_counter() - began:.1f} s")
    return root


def best_ms(call, tries: int) -> float:
    """The fastest of `tries` calls after a warm-up one, in ms: a busy machine slows some calls, not all."""
    call()
    times = []
    for _ in range(tries):
        began = time.perf_counter()
        call()
        times.append((time.perf_counter() - began) * 1000)
    return min(times)


def measure(root: Path, tries: int) -> list[tuple[str, int, float, int]]:
    """(endpoint, rows, best ms, bytes) for each endpoint, then the stream's snapshot."""
    client = TestClient(create_app(root), base_url=LOCAL)
    out = []
    for path, _, key in ENDPOINTS:
        response = client.get(path)
        response.raise_for_status()
        body = response.json()
        rows = len(body if key is None else body[key])
        ms = best_ms(lambda path=path: client.get(path).raise_for_status(), tries)
        out.append((path, rows, ms, len(response.content)))
    ws = Workspace(root)
    try:
        out.append(("stream snapshot (each second)", 1, best_ms(lambda: snapshot(ws), tries), 0))
    finally:
        ws.db.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tries", type=int, default=5, help="timed calls per endpoint (the best one counts)")
    parser.add_argument("--keep", type=Path, help="build the workspace here and keep it (reused if it is there)")
    args = parser.parse_args()
    folder = args.keep or Path(tempfile.mkdtemp(prefix="dashboard-scale-"))
    root = folder / "ws"
    try:
        if not (root / "conveyor.db").exists():
            make(root)
        results = measure(root, args.tries)
    finally:
        if args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)
    table = Table("endpoint", Column("rows", justify="right"), Column("ms", justify="right"),
                  Column("KB", justify="right"), title=f"dashboard on {STEPS:,} steps, {JOBS:,} jobs (best of "
                                                        f"{args.tries})")
    for path, rows, ms, size in results:
        table.add_row(path, f"{rows:,}", f"{ms:.1f}", f"{size / 1024:,.0f}" if size else "-")
    console = Console(width=120)
    console.print(table)
    slow = [path for path, _, ms, _ in results if ms >= TARGET_MS]
    console.print(f"target: every endpoint under {TARGET_MS} ms on a quiet machine: "
                  + ("met" if not slow else f"MISSED by {', '.join(slow)}") + "; load average "
                  + ", ".join(f"{x:.2f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
