"""The ledger (job J trained global steps [a, b]), the per-step example audit and per-step metrics."""

from __future__ import annotations

import json
import sqlite3
import time


def write_steps(con: sqlite3.Connection, run_id: str, audit: list[tuple[int, int, list[int]]],
                metrics: list[dict], evals: list[dict] = (), samples: list[dict] = ()) -> None:
    """Append buffered audit rows (step, job, lines), metric, evaluation and sample rows in one transaction."""
    if not audit and not metrics and not evals and not samples:
        return
    now = time.time()
    con.execute("BEGIN IMMEDIATE")
    con.executemany("INSERT OR REPLACE INTO audit (run_id, step, job_id, lines) VALUES (?, ?, ?, ?)",
                    [(run_id, step, job, json.dumps(lines)) for step, job, lines in audit])
    con.executemany(
        "INSERT OR REPLACE INTO metrics (run_id, step, job_id, loss, learning_rate, grad_norm, tokens, examples,"
        " step_time, created_at) VALUES (:run_id, :step, :job_id, :loss, :learning_rate, :grad_norm, :tokens,"
        " :examples, :step_time, :created_at)",
        [{"run_id": run_id, "created_at": now, **m} for m in metrics],
    )
    con.executemany("INSERT OR REPLACE INTO evals (run_id, step, job_id, eval_loss, examples, created_at)"
                    " VALUES (:run_id, :step, :job_id, :eval_loss, :examples, :created_at)",
                    [{"run_id": run_id, "created_at": now, **e} for e in evals])
    con.executemany("INSERT INTO samples (run_id, step, prompt, output, created_at)"
                    " VALUES (:run_id, :step, :prompt, :output, :created_at)",
                    [{"run_id": run_id, "created_at": now, **x} for x in samples])
    con.execute("COMMIT")


def forget_after(con: sqlite3.Connection, run_id: str, step: int) -> int:
    """Drop audit and metric rows after a checkpoint's step: those steps were lost in a crash and retrain."""
    n = con.execute("DELETE FROM audit WHERE run_id = ? AND step > ?", (run_id, step)).rowcount
    for table in ("metrics", "evals", "samples"):
        con.execute(f"DELETE FROM {table} WHERE run_id = ? AND step > ?", (run_id, step))
    return n


def supersede_after(con: sqlite3.Connection, run_id: str, step: int) -> int:
    """Mark ledger rows that reach past `step` as lost; their jobs train those steps again and append anew."""
    return con.execute("UPDATE ledger SET outcome = 'lost' WHERE run_id = ? AND end_step > ? AND outcome = 'done'",
                       (run_id, step)).rowcount


def audit_rows(con: sqlite3.Connection, run_id: str | None = None) -> list[dict]:
    query = "SELECT * FROM audit" + (" WHERE run_id = ?" if run_id else "") + " ORDER BY run_id, step"
    return [{"run": r["run_id"], "step": r["step"], "job": r["job_id"], "lines": json.loads(r["lines"])}
            for r in con.execute(query, (run_id,) if run_id else ())]


def losses(con: sqlite3.Connection, run_id: str, job_id: int) -> list[float]:
    rows = con.execute("SELECT loss FROM metrics WHERE run_id = ? AND job_id = ? AND loss IS NOT NULL ORDER BY step",
                       (run_id, job_id))
    return [r["loss"] for r in rows]


def record(con: sqlite3.Connection, *, run_id: str, job_id: int, start_step: int, end_step: int,
           examples: int, epochs: int, tokens: int, outcome: str) -> None:
    """Append the ledger row of a job that has finished training (or stopped training, by outcome)."""
    job_losses = losses(con, run_id, job_id)
    con.execute(
        "INSERT INTO ledger (run_id, job_id, start_step, end_step, examples, epochs, tokens, first_loss, last_loss,"
        " mean_loss, outcome, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (run_id, job_id, start_step, end_step, examples, epochs, tokens,
         job_losses[0] if job_losses else None, job_losses[-1] if job_losses else None,
         sum(job_losses) / len(job_losses) if job_losses else None, outcome, time.time()),
    )


def rows(con: sqlite3.Connection, run_id: str | None = None) -> list[dict]:
    query = ("SELECT l.*, j.file, j.fingerprint FROM ledger l JOIN jobs j ON j.id = l.job_id"
             + (" WHERE l.run_id = ?" if run_id else "") + " ORDER BY l.id")
    out = []
    for r in con.execute(query, (run_id,) if run_id else ()):
        out.append({
            "run": r["run_id"], "job": r["job_id"], "file": r["file"], "fingerprint": r["fingerprint"],
            "start_step": r["start_step"], "end_step": r["end_step"], "steps": r["end_step"] - r["start_step"] + 1,
            "examples": r["examples"], "epochs": r["epochs"], "tokens": r["tokens"],
            "first_loss": r["first_loss"], "last_loss": r["last_loss"], "mean_loss": r["mean_loss"],
            "outcome": r["outcome"],
        })
    return out
