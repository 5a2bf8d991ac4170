"""The ledger (job J trained global steps [a, b]), the per-step example audit and per-step metrics: written per run,
read along a run's lineage (a rollback's run shows the steps it inherited from the run it branched from; the spans
and the series of metrics, evaluations and samples are series.py's)."""

from __future__ import annotations

import json
import sqlite3
import time

from . import jobs, runs, versions
from .database import transaction
from .series import END, Span, lineage, roll_up, roll_up_span, spans_of


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
        " step_time, margin, accuracy, created_at) VALUES (:run_id, :step, :job_id, :loss, :learning_rate, :grad_norm,"
        " :tokens, :examples, :step_time, :margin, :accuracy, :created_at)",
        [{"run_id": run_id, "created_at": now, "margin": None, "accuracy": None, **m} for m in metrics],
    )
    roll_up(con, run_id, [m["step"] for m in metrics])
    con.executemany("INSERT OR REPLACE INTO evals (run_id, step, job_id, eval_loss, examples, created_at)"
                    " VALUES (:run_id, :step, :job_id, :eval_loss, :examples, :created_at)",
                    [{"run_id": run_id, "created_at": now, **e} for e in evals if "name" not in e])
    con.executemany("INSERT OR REPLACE INTO set_evals (run_id, step, name, job_id, loss, examples, tokens, exact, f1,"
                    " answered, preference, created_at) VALUES (:run_id, :step, :name, :job_id, :loss, :examples,"
                    " :tokens, :exact, :f1, :answered, :preference, :created_at)",
                    [{"run_id": run_id, "created_at": now, "exact": None, "f1": None, "answered": None,
                      "preference": None, **e}
                     for e in evals if "name" in e])
    con.executemany("INSERT INTO samples (run_id, step, prompt, output, created_at)"
                    " VALUES (:run_id, :step, :prompt, :output, :created_at)",
                    [{"run_id": run_id, "created_at": now, **x} for x in samples])


def forget_after(con: sqlite3.Connection, run_id: str, step: int) -> int:
    """Drop audit and metric rows after a checkpoint's step: those steps were lost in a crash and retrain."""
    n = con.execute("DELETE FROM audit WHERE run_id = ? AND step > ?", (run_id, step)).rowcount
    for table in ("metrics", "evals", "set_evals", "samples"):
        con.execute(f"DELETE FROM {table} WHERE run_id = ? AND step > ?", (run_id, step))
    roll_up_span(con, run_id, step + 1, END)  # drops the buckets after `step`, recounts the one holding it
    return n


def supersede_after(con: sqlite3.Connection, run_id: str, step: int) -> int:
    """Mark ledger rows (and versions) that reach past `step` as lost; their jobs train those steps again and
    append anew (a version's name is never reused: the retrained job end is a new version)."""
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
                  owner: str | None = None, method: str | None = None, reference: dict | None = None,
                  **fields) -> None:
    """End a job's segment in one transaction: its ledger row, the run's global step and the job's new state.

    `pos` is the job's position after the segment's last step; a segment of no steps writes no ledger row."""
    outcome = {"done": "done", "interrupted": "interrupted", "skipped": "skipped"}[state.value]
    with transaction(con):
        if pos.last_step >= pos.segment_start:
            _, lines = segment_counts(con, run_id, job_id, pos.segment_start, pos.last_step)
            record(con, run_id=run_id, job_id=job_id, start_step=pos.segment_start, end_step=pos.last_step,
                   examples=len(lines), epochs=pos.epochs, tokens=tokens, outcome=outcome, method=method,
                   reference=reference)
            runs.set_step(con, run_id, pos.last_step)
            if outcome == "done":  # the job's end is a version (v1, v2, ...: never reused)
                versions.add(con, run_id, job_id, pos.last_step)
        jobs.transition(con, job_id, state, expect=expect, owner=owner, reopen=True, claim=None,
                        steps_done=pos.steps_done, position=pos.position, planned_steps=pos.planned_steps,
                        start_step=pos.start_step or None, end_step=pos.last_step if state.value != "interrupted"
                        else pos.end_step, segment_start=pos.segment_start, **fields)


def audit_rows(con: sqlite3.Connection, run_id: str | None = None, own: bool = False) -> list[dict]:
    """Per step, oldest first: the job and file lines trained (and replayed) in a run's lineage, the steps it
    inherited marked (`own`: its own steps only), or in every run."""
    if run_id is None:
        return [_audit_row(r, False) for r in con.execute("SELECT * FROM audit ORDER BY run_id, step")]
    return [_audit_row(r, s.inherited) for s in spans_of(con, run_id, own) for r in con.execute(
        "SELECT * FROM audit WHERE run_id = ? AND step BETWEEN ? AND ? ORDER BY step", s.where())]


def _audit_row(r: sqlite3.Row, inherited: bool) -> dict:
    return {"run": r["run_id"], "inherited": inherited, "step": r["step"], "job": r["job_id"],
            "lines": json.loads(r["lines"]),
            **({"replay": [{"job": j, "line": line} for j, line in json.loads(r["replay"])]} if r["replay"] else {})}


def losses(con: sqlite3.Connection, run_id: str, job_id: int, first: int = 0, last: int = 2**62) -> list[float]:
    rows = con.execute("SELECT loss FROM metrics WHERE run_id = ? AND job_id = ? AND loss IS NOT NULL"
                       " AND step BETWEEN ? AND ? ORDER BY step", (run_id, job_id, first, last))
    return [r["loss"] for r in rows]


def record(con: sqlite3.Connection, *, run_id: str, job_id: int, start_step: int, end_step: int,
           examples: int, epochs: int, tokens: int, outcome: str, method: str | None = None,
           reference: dict | None = None) -> None:
    """Append the ledger row of a job that has finished training (or stopped training, by outcome). `examples`
    counts the job's own; the replayed ones of those steps are counted from the audit."""
    job_losses = losses(con, run_id, job_id, start_step, end_step)
    con.execute(
        "INSERT INTO ledger (run_id, job_id, start_step, end_step, examples, replayed, epochs, tokens, first_loss,"
        " last_loss, mean_loss, outcome, method, reference, created_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (run_id, job_id, start_step, end_step, examples,
         segment_replayed(con, run_id, job_id, start_step, end_step), epochs, tokens,
         job_losses[0] if job_losses else None, job_losses[-1] if job_losses else None,
         sum(job_losses) / len(job_losses) if job_losses else None, outcome, method,
         json.dumps(reference) if reference else None, time.time()),
    )


_LEDGER_QUERY = ("SELECT l.*, j.file, j.fingerprint, j.overrides, j.format FROM ledger l"
                 " JOIN jobs j ON j.id = l.job_id")
# How a segment recorded without its method trained (a stop overtaken by a crash, or a database from before).
_FORMAT_METHOD = {"preference": "preference", "feedback": "kto"}


def _ledger_row(r: sqlite3.Row, inherited: bool) -> dict:
    return {"run": r["run_id"], "inherited": inherited, "job": r["job_id"], "file": r["file"],
            "fingerprint": r["fingerprint"], "start_step": r["start_step"], "end_step": r["end_step"],
            "steps": r["end_step"] - r["start_step"] + 1, "examples": r["examples"], "replayed": r["replayed"],
            "epochs": r["epochs"], "tokens": r["tokens"], "first_loss": r["first_loss"], "last_loss": r["last_loss"],
            "mean_loss": r["mean_loss"], "outcome": r["outcome"],
            "method": r["method"] or _FORMAT_METHOD.get(r["format"], "sft"),
            **({"reference": json.loads(r["reference"])} if r["reference"] else {}),
            "overrides": json.loads(r["overrides"]) if r["overrides"] else {}}  # the job's `add --set`


def _ledger_where(span: Span) -> tuple[str, tuple]:
    """A span's ledger rows: an ancestor's those that end by its branch step; the run's own all of them (an
    index-only count)."""
    if span.inherited:
        return " WHERE l.run_id = ? AND l.end_step BETWEEN ? AND ?", span.where()
    return " WHERE l.run_id = ?", (span.run,)


def rows(con: sqlite3.Connection, run_id: str | None = None, own: bool = False) -> list[dict]:
    """Ledger rows, oldest first: a run's lineage, the rows it inherited marked (`own`: its own rows only), or
    every run's."""
    if run_id is None:
        return _named(con, [_ledger_row(r, False) for r in con.execute(_LEDGER_QUERY + " ORDER BY l.id")])
    out = []
    for span in spans_of(con, run_id, own):
        where, args = _ledger_where(span)
        out += [_ledger_row(r, span.inherited) for r in con.execute(_LEDGER_QUERY + where + " ORDER BY l.id", args)]
    return _named(con, out)


def _named(con: sqlite3.Connection, rows: list[dict]) -> list[dict]:
    """A preference job's reference also by what a person calls it: `"name": "v2"` (or "base", or "step 12" for a
    checkpoint inside a job)."""
    for r in rows:
        if r.get("reference") and isinstance(r["reference"].get("step"), int):
            r["reference"]["name"] = versions.step_name(con, r["run"], r["reference"]["step"])
    return rows


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
    """One page of a run's ledger rows, newest first (its own, then those it inherited), and how many there are."""
    spans = lineage(con, run_id)[::-1]
    counts = [con.execute("SELECT COUNT(*) FROM ledger l" + where, args).fetchone()[0]
              for where, args in map(_ledger_where, spans)]
    out: list[dict] = []
    for span, count in zip(spans, counts):
        if offset >= count:
            offset -= count
            continue
        where, args = _ledger_where(span)
        out += [_ledger_row(r, span.inherited) for r in con.execute(
            _LEDGER_QUERY + where + " ORDER BY l.id DESC LIMIT ? OFFSET ?", (*args, limit - len(out), offset))]
        offset = 0
        if len(out) >= limit:
            break
    return _named(con, out), sum(counts)


def replayed_by_job(con: sqlite3.Connection, job_ids: list[int]) -> dict[int, int]:
    """Replayed examples each job's steps trained, summed over its ledger rows (jobs with none left out). The
    ledger has no index by job: one pass over it, as many rows as job segments."""
    if not job_ids:
        return {}
    rows = con.execute(f"SELECT job_id, SUM(replayed) FROM ledger WHERE replayed > 0 AND outcome != 'lost' AND job_id"
                       f" IN ({', '.join('?' * len(job_ids))}) GROUP BY job_id", job_ids)
    return {r[0]: r[1] for r in rows}
