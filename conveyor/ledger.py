"""The ledger (job J trained global steps [a, b]), the per-step example audit and per-step metrics."""

from __future__ import annotations

import json
import sqlite3
import time

from .store import transaction


def write_steps(con: sqlite3.Connection, run_id: str, audit: list[tuple[int, int, list[int]]],
                metrics: list[dict], evals: list[dict] = (), samples: list[dict] = ()) -> None:
    """Append buffered audit rows (step, job, lines), metric, evaluation and sample rows in one transaction."""
    if not audit and not metrics and not evals and not samples:
        return
    now = time.time()
    with transaction(con):
        _write_steps(con, run_id, now, audit, metrics, evals, samples)


def _write_steps(con, run_id, now, audit, metrics, evals, samples) -> None:
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


def forget_after(con: sqlite3.Connection, run_id: str, step: int) -> int:
    """Drop audit and metric rows after a checkpoint's step: those steps were lost in a crash and retrain."""
    n = con.execute("DELETE FROM audit WHERE run_id = ? AND step > ?", (run_id, step)).rowcount
    for table in ("metrics", "evals", "samples"):
        con.execute(f"DELETE FROM {table} WHERE run_id = ? AND step > ?", (run_id, step))
    return n


def supersede_after(con: sqlite3.Connection, run_id: str, step: int) -> int:
    """Mark ledger rows that reach past `step` as lost; their jobs train those steps again and append anew."""
    return con.execute("UPDATE ledger SET outcome = 'lost' WHERE run_id = ? AND end_step > ? AND outcome != 'lost'",
                       (run_id, step)).rowcount


def segment_closed(con: sqlite3.Connection, run_id: str, job_id: int, step: int) -> bool:
    """Whether a (not lost) ledger row of the job ends at `step`: its segment was closed there (a stop)."""
    return con.execute("SELECT 1 FROM ledger WHERE run_id = ? AND job_id = ? AND end_step = ? AND outcome != 'lost'",
                       (run_id, job_id, step)).fetchone() is not None


def segment_counts(con: sqlite3.Connection, run_id: str, job_id: int, first: int, last: int) -> tuple[int, list[int]]:
    """(optimizer steps, lines trained) of the job in global steps [first, last], from the audit."""
    rows = con.execute("SELECT lines FROM audit WHERE run_id = ? AND job_id = ? AND step BETWEEN ? AND ?",
                       (run_id, job_id, first, last)).fetchall()
    return len(rows), [line for r in rows for line in json.loads(r["lines"])]


def segment_tokens(con: sqlite3.Connection, run_id: str, job_id: int, first: int, last: int) -> int:
    row = con.execute("SELECT COALESCE(SUM(tokens), 0) FROM metrics WHERE run_id = ? AND job_id = ? AND step"
                      " BETWEEN ? AND ?", (run_id, job_id, first, last)).fetchone()
    return row[0]


def close_segment(con: sqlite3.Connection, run_id: str, job_id: int, state, pos, *, expect, tokens: int,
                  owner: str | None = None, **fields) -> None:
    """End a job's segment in one transaction: its ledger row, the run's global step and the job's new state.

    `pos` is the job's position after the segment's last step; a segment of no steps writes no ledger row."""
    from . import jobs, runs

    outcome = {"done": "done", "interrupted": "interrupted", "skipped": "skipped"}[state.value]
    with transaction(con):
        if pos.last_step >= pos.segment_start:
            _, lines = segment_counts(con, run_id, job_id, pos.segment_start, pos.last_step)
            record(con, run_id=run_id, job_id=job_id, start_step=pos.segment_start, end_step=pos.last_step,
                   examples=len(lines), epochs=pos.epochs, tokens=tokens, outcome=outcome)
            runs.set_step(con, run_id, pos.last_step)
        jobs.transition(con, job_id, state, expect=expect, owner=owner, reopen=True, claim=None,
                        steps_done=pos.steps_done, position=pos.position, planned_steps=pos.planned_steps,
                        start_step=pos.start_step or None, end_step=pos.last_step if state.value != "interrupted"
                        else pos.end_step, segment_start=pos.segment_start, **fields)


def audit_rows(con: sqlite3.Connection, run_id: str | None = None) -> list[dict]:
    query = "SELECT * FROM audit" + (" WHERE run_id = ?" if run_id else "") + " ORDER BY run_id, step"
    return [{"run": r["run_id"], "step": r["step"], "job": r["job_id"], "lines": json.loads(r["lines"])}
            for r in con.execute(query, (run_id,) if run_id else ())]


def losses(con: sqlite3.Connection, run_id: str, job_id: int, first: int = 0, last: int = 2**62) -> list[float]:
    rows = con.execute("SELECT loss FROM metrics WHERE run_id = ? AND job_id = ? AND loss IS NOT NULL"
                       " AND step BETWEEN ? AND ? ORDER BY step", (run_id, job_id, first, last))
    return [r["loss"] for r in rows]


def record(con: sqlite3.Connection, *, run_id: str, job_id: int, start_step: int, end_step: int,
           examples: int, epochs: int, tokens: int, outcome: str) -> None:
    """Append the ledger row of a job that has finished training (or stopped training, by outcome)."""
    job_losses = losses(con, run_id, job_id, start_step, end_step)
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


def close_overtaken(con: sqlite3.Connection, run_id: str, pos) -> bool:
    """Give an open segment (a job stopped by a crash, so no row was written) its `interrupted` row, when
    another job overtakes it or its run is left; idempotent. Its next segment starts after that."""
    if pos.last_step < pos.segment_start or segment_closed(con, run_id, pos.job_id, pos.last_step):
        return False
    _, lines = segment_counts(con, run_id, pos.job_id, pos.segment_start, pos.last_step)
    record(con, run_id=run_id, job_id=pos.job_id, start_step=pos.segment_start, end_step=pos.last_step,
           examples=len(lines), epochs=pos.epochs,
           tokens=segment_tokens(con, run_id, pos.job_id, pos.segment_start, pos.last_step), outcome="interrupted")
    return True
