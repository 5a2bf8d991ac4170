"""The ledger (job J trained global steps [a, b]), the per-step example audit and per-step metrics."""

from __future__ import annotations

import json
import sqlite3
import time

from .store import transaction

# Steps per rollup bucket, finest first. Each level is 16 buckets of the one below it, so any bucket is
# recomputed from at most 16 rows whatever its level.
ROLLUP_LEVELS = (16, 256, 4096, 65536)
FAN = 16
END = 2**62  # past any step
ROLLUP_COLUMNS = ("n, step_min, step_max, loss_n, loss_sum, loss_min, loss_max, lr_sum, lr_n, grad_norm_sum,"
                  " grad_norm_n, tokens, examples, step_time")
# One metric row in the rollup's columns: raw rows and buckets then merge with the same aggregates.
RAW_AS_ROLLUP = ("1 AS n, step AS step_min, step AS step_max, loss IS NOT NULL AS loss_n, loss AS loss_sum,"
                 " loss AS loss_min, loss AS loss_max, learning_rate AS lr_sum, learning_rate IS NOT NULL AS lr_n,"
                 " grad_norm AS grad_norm_sum, grad_norm IS NOT NULL AS grad_norm_n, tokens, examples, step_time")
MERGED = ("SUM(n) AS n, MIN(step_min) AS step_min, MAX(step_max) AS step_max, SUM(loss_n) AS loss_n,"
          " SUM(loss_sum) AS loss_sum, MIN(loss_min) AS loss_min, MAX(loss_max) AS loss_max, SUM(lr_sum) AS lr_sum,"
          " SUM(lr_n) AS lr_n, SUM(grad_norm_sum) AS grad_norm_sum, SUM(grad_norm_n) AS grad_norm_n,"
          " SUM(tokens) AS tokens, SUM(examples) AS examples, SUM(step_time) AS step_time")


def write_steps(con: sqlite3.Connection, run_id: str, audit: list[tuple],
                metrics: list[dict], evals: list[dict] = (), samples: list[dict] = ()) -> None:
    """Append buffered audit rows (step, job, lines), metric, evaluation and sample rows in one transaction.

    An evaluation row with a "name" is a held-out set's (set_evals); one without is eval.file's (evals)."""
    if not audit and not metrics and not evals and not samples:
        return
    now = time.time()
    with transaction(con):
        _write_steps(con, run_id, now, audit, metrics, evals, samples)


def _write_steps(con, run_id, now, audit, metrics, evals, samples) -> None:
    # A row is (step, job, lines) or (step, job, lines, replayed [job, line]s).
    con.executemany("INSERT OR REPLACE INTO audit (run_id, step, job_id, lines, replay) VALUES (?, ?, ?, ?, ?)",
                    [(run_id, row[0], row[1], json.dumps(row[2]), json.dumps(row[3]) if len(row) > 3 and row[3]
                      else None) for row in audit])
    con.executemany(
        "INSERT OR REPLACE INTO metrics (run_id, step, job_id, loss, learning_rate, grad_norm, tokens, examples,"
        " step_time, created_at) VALUES (:run_id, :step, :job_id, :loss, :learning_rate, :grad_norm, :tokens,"
        " :examples, :step_time, :created_at)",
        [{"run_id": run_id, "created_at": now, **m} for m in metrics],
    )
    roll_up(con, run_id, [m["step"] for m in metrics])
    con.executemany("INSERT OR REPLACE INTO evals (run_id, step, job_id, eval_loss, examples, created_at)"
                    " VALUES (:run_id, :step, :job_id, :eval_loss, :examples, :created_at)",
                    [{"run_id": run_id, "created_at": now, **e} for e in evals if "name" not in e])
    con.executemany("INSERT OR REPLACE INTO set_evals (run_id, step, name, job_id, loss, examples, tokens,"
                    " created_at) VALUES (:run_id, :step, :name, :job_id, :loss, :examples, :tokens, :created_at)",
                    [{"run_id": run_id, "created_at": now, **e} for e in evals if "name" in e])
    con.executemany("INSERT INTO samples (run_id, step, prompt, output, created_at)"
                    " VALUES (:run_id, :step, :prompt, :output, :created_at)",
                    [{"run_id": run_id, "created_at": now, **x} for x in samples])


def forget_after(con: sqlite3.Connection, run_id: str, step: int) -> int:
    """Drop audit and metric rows after a checkpoint's step: those steps were lost in a crash and retrain."""
    n = con.execute("DELETE FROM audit WHERE run_id = ? AND step > ?", (run_id, step)).rowcount
    for table in ("metrics", "evals", "set_evals", "samples"):
        con.execute(f"DELETE FROM {table} WHERE run_id = ? AND step > ?", (run_id, step))
    _roll_up_span(con, run_id, step + 1, END)  # drops the buckets after `step`, recounts the one holding it
    return n


def roll_up(con: sqlite3.Connection, run_id: str, steps: list[int]) -> None:
    """Recompute the rollup buckets that hold `steps` (just written, new or replaced) from the rows under them.

    Recomputing, not adding, is what keeps a replaced step from being counted twice; it reads at most 16 rows
    a bucket, so a new step costs the same."""
    buckets = sorted({step // ROLLUP_LEVELS[0] for step in steps})
    start = 0
    for i, bucket in enumerate(buckets):  # one span per run of consecutive buckets
        if i + 1 == len(buckets) or buckets[i + 1] != bucket + 1:
            _roll_up_span(con, run_id, buckets[start] * ROLLUP_LEVELS[0], bucket * ROLLUP_LEVELS[0])
            start = i + 1


def _roll_up_span(con: sqlite3.Connection, run_id: str, first: int, last: int) -> None:
    """Recompute every level's buckets that hold a step in first..last: the finest from the metric rows, each
    coarser one from the 16 buckets below it. A bucket left with no rows is deleted."""
    source = f"SELECT step AS at, {RAW_AS_ROLLUP} FROM metrics WHERE run_id = :run AND step BETWEEN :lo AND :hi"
    for level in ROLLUP_LEVELS:
        b0, b1 = first // level, last // level
        args = {"run": run_id, "level": level, "b0": b0, "b1": b1, "lo": b0 * level, "hi": b1 * level + level - 1,
                "child": level // FAN, "c0": b0 * FAN, "c1": b1 * FAN + FAN - 1}
        con.execute("DELETE FROM metrics_rollup WHERE run_id = :run AND level = :level AND bucket BETWEEN :b0 AND :b1",
                    args)
        con.execute(
            f"INSERT INTO metrics_rollup (run_id, level, bucket, job_id, {ROLLUP_COLUMNS})"
            " SELECT :run, :level, bucket,"
            " (SELECT job_id FROM metrics m WHERE m.run_id = :run AND m.step = g.step_max),"
            f" {ROLLUP_COLUMNS} FROM (SELECT at / :level AS bucket, {MERGED} FROM ({source}) GROUP BY at / :level) g",
            args)
        source = (f"SELECT step_min AS at, {ROLLUP_COLUMNS} FROM metrics_rollup WHERE run_id = :run"
                  " AND level = :child AND bucket BETWEEN :c0 AND :c1")


def rebuild_rollups(con: sqlite3.Connection, run_id: str | None = None) -> None:
    """Build the rollups of a run (default: of every run) from scratch, from its metric rows."""
    run_ids = [run_id] if run_id else [r[0] for r in con.execute("SELECT DISTINCT run_id FROM metrics")]
    with transaction(con):
        con.execute("DELETE FROM metrics_rollup" + (" WHERE run_id = ?" if run_id else ""), (run_id,) if run_id else ())
        for rid in run_ids:
            last = con.execute("SELECT MAX(step) FROM metrics WHERE run_id = ?", (rid,)).fetchone()[0]
            if last is not None:
                _roll_up_span(con, rid, 0, last)


def supersede_after(con: sqlite3.Connection, run_id: str, step: int) -> int:
    """Mark ledger rows (and versions) that reach past `step` as lost; their jobs train those steps again and
    append anew (a version's name is never reused: the retrained job end is a new version)."""
    from . import versions

    versions.lose_after(con, run_id, step)
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


def segment_replayed(con: sqlite3.Connection, run_id: str, job_id: int, first: int, last: int) -> int:
    """Replayed examples the job's steps in [first, last] trained (replay.fraction), from the audit."""
    rows = con.execute("SELECT replay FROM audit WHERE run_id = ? AND job_id = ? AND step BETWEEN ? AND ?"
                       " AND replay IS NOT NULL", (run_id, job_id, first, last)).fetchall()
    return sum(len(json.loads(r["replay"])) for r in rows)


def segment_tokens(con: sqlite3.Connection, run_id: str, job_id: int, first: int, last: int) -> int:
    row = con.execute("SELECT COALESCE(SUM(tokens), 0) FROM metrics WHERE run_id = ? AND job_id = ? AND step"
                      " BETWEEN ? AND ?", (run_id, job_id, first, last)).fetchone()
    return row[0]


def close_segment(con: sqlite3.Connection, run_id: str, job_id: int, state, pos, *, expect, tokens: int,
                  owner: str | None = None, **fields) -> None:
    """End a job's segment in one transaction: its ledger row, the run's global step and the job's new state.

    `pos` is the job's position after the segment's last step; a segment of no steps writes no ledger row."""
    from . import jobs, runs, versions

    outcome = {"done": "done", "interrupted": "interrupted", "skipped": "skipped"}[state.value]
    with transaction(con):
        if pos.last_step >= pos.segment_start:
            _, lines = segment_counts(con, run_id, job_id, pos.segment_start, pos.last_step)
            record(con, run_id=run_id, job_id=job_id, start_step=pos.segment_start, end_step=pos.last_step,
                   examples=len(lines), epochs=pos.epochs, tokens=tokens, outcome=outcome)
            runs.set_step(con, run_id, pos.last_step)
            if outcome == "done":  # the job's end is a version (v1, v2, ...: never reused)
                versions.add(con, run_id, job_id, pos.last_step)
        jobs.transition(con, job_id, state, expect=expect, owner=owner, reopen=True, claim=None,
                        steps_done=pos.steps_done, position=pos.position, planned_steps=pos.planned_steps,
                        start_step=pos.start_step or None, end_step=pos.last_step if state.value != "interrupted"
                        else pos.end_step, segment_start=pos.segment_start, **fields)


def audit_rows(con: sqlite3.Connection, run_id: str | None = None) -> list[dict]:
    query = "SELECT * FROM audit" + (" WHERE run_id = ?" if run_id else "") + " ORDER BY run_id, step"
    return [{"run": r["run_id"], "step": r["step"], "job": r["job_id"], "lines": json.loads(r["lines"]),
             **({"replay": [{"job": j, "line": line} for j, line in json.loads(r["replay"])]} if r["replay"] else {})}
            for r in con.execute(query, (run_id,) if run_id else ())]


def losses(con: sqlite3.Connection, run_id: str, job_id: int, first: int = 0, last: int = 2**62) -> list[float]:
    rows = con.execute("SELECT loss FROM metrics WHERE run_id = ? AND job_id = ? AND loss IS NOT NULL"
                       " AND step BETWEEN ? AND ? ORDER BY step", (run_id, job_id, first, last))
    return [r["loss"] for r in rows]


def record(con: sqlite3.Connection, *, run_id: str, job_id: int, start_step: int, end_step: int,
           examples: int, epochs: int, tokens: int, outcome: str) -> None:
    """Append the ledger row of a job that has finished training (or stopped training, by outcome). `examples`
    counts the job's own; the replayed ones of those steps are counted from the audit."""
    job_losses = losses(con, run_id, job_id, start_step, end_step)
    con.execute(
        "INSERT INTO ledger (run_id, job_id, start_step, end_step, examples, replayed, epochs, tokens, first_loss,"
        " last_loss, mean_loss, outcome, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (run_id, job_id, start_step, end_step, examples,
         segment_replayed(con, run_id, job_id, start_step, end_step), epochs, tokens,
         job_losses[0] if job_losses else None, job_losses[-1] if job_losses else None,
         sum(job_losses) / len(job_losses) if job_losses else None, outcome, time.time()),
    )


_LEDGER_QUERY = "SELECT l.*, j.file, j.fingerprint FROM ledger l JOIN jobs j ON j.id = l.job_id"


def _ledger_row(r: sqlite3.Row) -> dict:
    return {"run": r["run_id"], "job": r["job_id"], "file": r["file"], "fingerprint": r["fingerprint"],
            "start_step": r["start_step"], "end_step": r["end_step"], "steps": r["end_step"] - r["start_step"] + 1,
            "examples": r["examples"], "replayed": r["replayed"], "epochs": r["epochs"], "tokens": r["tokens"], "first_loss": r["first_loss"],
            "last_loss": r["last_loss"], "mean_loss": r["mean_loss"], "outcome": r["outcome"]}


def rows(con: sqlite3.Connection, run_id: str | None = None) -> list[dict]:
    query = _LEDGER_QUERY + (" WHERE l.run_id = ?" if run_id else "") + " ORDER BY l.id"
    return [_ledger_row(r) for r in con.execute(query, (run_id,) if run_id else ())]


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


def page(con: sqlite3.Connection, run_id: str, offset: int, limit: int) -> tuple[list[dict], int]:
    """One page of a run's ledger rows, newest first, and how many rows the run has."""
    total = con.execute("SELECT COUNT(*) FROM ledger WHERE run_id = ?", (run_id,)).fetchone()[0]
    query = _LEDGER_QUERY + " WHERE l.run_id = ? ORDER BY l.id DESC LIMIT ? OFFSET ?"
    return [_ledger_row(r) for r in con.execute(query, (run_id, limit, offset))], total


def metric_series(con: sqlite3.Connection, run_id: str, first: int, last: int, points: int) -> dict:
    """The metric rows of steps first..last: as stored when there are at most `points`, else at most `points`
    rows, each merging a range of steps (means; sums of tokens, examples and step time; exact loss min and max)."""
    between = (run_id, first, last)
    if _at_most(con, "metrics", between, points):
        return _as_stored(con, "metrics", "job_id, loss, learning_rate, grad_norm, tokens, examples, step_time",
                          between)
    lo, hi = _step_range(con, "metrics", between)
    span = hi - lo + 1
    # The finest level with at most 8 buckets an output row: few rows to read, each of them exact.
    level = next((lv for lv in (1, *ROLLUP_LEVELS) if span // lv + 2 <= 8 * points), ROLLUP_LEVELS[-1])
    parts = _pieces(run_id, lo, hi, tuple(lv for lv in (1, *ROLLUP_LEVELS) if lv <= level))
    width = -(-span // points)
    rows = con.execute(
        "SELECT step, step_min, (SELECT job_id FROM metrics m WHERE m.run_id = ? AND m.step = g.step) AS job_id, n,"
        " loss, loss_min, loss_max, learning_rate, grad_norm, tokens, examples, step_time FROM ("
        " SELECT MAX(step_max) AS step, MIN(step_min) AS step_min, SUM(n) AS n,"
        " SUM(loss_sum) / NULLIF(SUM(loss_n), 0) AS loss, MIN(loss_min) AS loss_min, MAX(loss_max) AS loss_max,"
        " SUM(lr_sum) / NULLIF(SUM(lr_n), 0) AS learning_rate,"
        " SUM(grad_norm_sum) / NULLIF(SUM(grad_norm_n), 0) AS grad_norm, SUM(tokens) AS tokens,"
        " SUM(examples) AS examples, SUM(step_time) AS step_time"
        f" FROM ({' UNION ALL '.join(sql for sql, _ in parts)}) GROUP BY (step_min - ?) / ?) g ORDER BY step",
        (run_id, *[a for _, args in parts for a in args], lo, width))
    return {"rows": [dict(r) for r in rows], "downsampled": True, "bucket_steps": width, "level": level}


def _as_stored(con: sqlite3.Connection, table: str, columns: str, between: tuple) -> dict:
    """The rows of a step range as stored (few enough to send whole)."""
    rows = con.execute(f"SELECT step, {columns}, created_at FROM {table} WHERE run_id = ? AND step BETWEEN ? AND ?"
                       " ORDER BY step", between)
    return {"rows": [dict(r) for r in rows], "downsampled": False}


def _at_most(con: sqlite3.Connection, table: str, between: tuple, count: int) -> bool:
    """Whether the run has at most `count` rows in the step range (reads no more than count + 1 index entries)."""
    return con.execute(f"SELECT 1 FROM {table} WHERE run_id = ? AND step BETWEEN ? AND ? ORDER BY step"
                       " LIMIT 1 OFFSET ?", (*between, count)).fetchone() is None


def _step_range(con: sqlite3.Connection, table: str, between: tuple) -> tuple[int, int]:
    """The first and last step with a row in the range: two index seeks (one MIN and one MAX each are)."""
    where = f"FROM {table} WHERE run_id = ? AND step BETWEEN ? AND ?"
    return (con.execute(f"SELECT MIN(step) {where}", between).fetchone()[0],
            con.execute(f"SELECT MAX(step) {where}", between).fetchone()[0])


def _pieces(run_id: str, first: int, last: int, levels: tuple[int, ...]) -> list[tuple[str, tuple]]:
    """Queries whose rows cover steps first..last exactly, in the rollup's columns: whole buckets of the last
    level, the ragged ends from finer levels down to raw rows (level 1)."""
    if first > last:
        return []
    level = levels[-1]
    if level == 1:
        return [(f"SELECT {RAW_AS_ROLLUP} FROM metrics WHERE run_id = ? AND step BETWEEN ? AND ?",
                 (run_id, first, last))]
    b0, b1 = -(-first // level), (last + 1) // level - 1  # the buckets wholly inside
    if b0 > b1:
        return _pieces(run_id, first, last, levels[:-1])
    whole = (f"SELECT {ROLLUP_COLUMNS} FROM metrics_rollup WHERE run_id = ? AND level = ? AND bucket BETWEEN ? AND ?",
             (run_id, level, b0, b1))
    return (_pieces(run_id, first, b0 * level - 1, levels[:-1]) + [whole]
            + _pieces(run_id, (b1 + 1) * level, last, levels[:-1]))


def eval_series(con: sqlite3.Connection, run_id: str, first: int, last: int, points: int) -> dict:
    """The evaluation rows of steps first..last: as stored when there are at most `points`, else at most
    `points` rows, each merging a range of steps (mean, min and max eval loss)."""
    between = (run_id, first, last)
    if _at_most(con, "evals", between, points):
        return _as_stored(con, "evals", "job_id, eval_loss, examples", between)
    lo, hi = _step_range(con, "evals", between)
    width = -(-(hi - lo + 1) // points)
    rows = con.execute(
        "SELECT step, step_min, (SELECT job_id FROM evals e WHERE e.run_id = ? AND e.step = g.step) AS job_id, n,"
        " eval_loss, eval_loss_min, eval_loss_max, examples FROM (SELECT MAX(step) AS step, MIN(step) AS step_min,"
        " COUNT(*) AS n, AVG(eval_loss) AS eval_loss, MIN(eval_loss) AS eval_loss_min, MAX(eval_loss) AS eval_loss_max,"
        " MAX(examples) AS examples FROM evals WHERE run_id = ? AND step BETWEEN ? AND ? GROUP BY (step - ?) / ?) g"
        " ORDER BY step", (run_id, *between, lo, width))
    return {"rows": [dict(r) for r in rows], "downsampled": True, "bucket_steps": width}
