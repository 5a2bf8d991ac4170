"""A run's series along its lineage: the spans of global steps that make up a run (a rollback's run and the runs
it branched from), the metric rollups that keep a series of millions of steps cheap to read (kept exact on every
write), and the reads the dashboard and status make of them: metrics and evaluations downsampled to a number of
points, held-out sets, samples, and what changed since a given row."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass

from ..data.formats import PREFERENCE_FORMATS
from ..data.holdout import set_name
from .runs import ancestry

# Steps per rollup bucket, finest first. Each level is 16 buckets of the one below it, so any bucket is
# recomputed from at most 16 rows whatever its level.
ROLLUP_LEVELS = (16, 256, 4096, 65536)
FAN = 16
END = 2**62  # past any step
ROLLUP_COLUMNS = ("n, step_min, step_max, loss_n, loss_sum, loss_min, loss_max, lr_sum, lr_n, grad_norm_sum,"
                  " grad_norm_n, tokens, examples, step_time, margin_sum, margin_n, accuracy_sum, accuracy_n")
# One metric row in the rollup's columns: raw rows and buckets then merge with the same aggregates.
RAW_AS_ROLLUP = ("1 AS n, step AS step_min, step AS step_max, loss IS NOT NULL AS loss_n, loss AS loss_sum,"
                 " loss AS loss_min, loss AS loss_max, learning_rate AS lr_sum, learning_rate IS NOT NULL AS lr_n,"
                 " grad_norm AS grad_norm_sum, grad_norm IS NOT NULL AS grad_norm_n, tokens, examples, step_time,"
                 " margin AS margin_sum, margin IS NOT NULL AS margin_n, accuracy AS accuracy_sum,"
                 " accuracy IS NOT NULL AS accuracy_n")
MERGED = ("SUM(n) AS n, MIN(step_min) AS step_min, MAX(step_max) AS step_max, SUM(loss_n) AS loss_n,"
          " SUM(loss_sum) AS loss_sum, MIN(loss_min) AS loss_min, MAX(loss_max) AS loss_max, SUM(lr_sum) AS lr_sum,"
          " SUM(lr_n) AS lr_n, SUM(grad_norm_sum) AS grad_norm_sum, SUM(grad_norm_n) AS grad_norm_n,"
          " SUM(tokens) AS tokens, SUM(examples) AS examples, SUM(step_time) AS step_time,"
          " SUM(margin_sum) AS margin_sum, SUM(margin_n) AS margin_n, SUM(accuracy_sum) AS accuracy_sum,"
          " SUM(accuracy_n) AS accuracy_n")


def roll_up(con: sqlite3.Connection, run_id: str, steps: list[int]) -> None:
    """Recompute the rollup buckets that hold `steps` (just written, new or replaced) from the rows under them.

    Recomputing, not adding, is what keeps a replaced step from being counted twice; it reads at most 16 rows
    a bucket, so a new step costs the same."""
    buckets = sorted({step // ROLLUP_LEVELS[0] for step in steps})
    start = 0
    for i, bucket in enumerate(buckets):  # one span per run of consecutive buckets
        if i + 1 == len(buckets) or buckets[i + 1] != bucket + 1:
            roll_up_span(con, run_id, buckets[start] * ROLLUP_LEVELS[0], bucket * ROLLUP_LEVELS[0])
            start = i + 1


def roll_up_span(con: sqlite3.Connection, run_id: str, first: int, last: int) -> None:
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
    """Build the rollups of a run (default: of every run) from scratch, from its metric rows. The caller holds a
    transaction (upgrade.py), so that no reader sees a run half rolled up."""
    run_ids = [run_id] if run_id else [r[0] for r in con.execute("SELECT DISTINCT run_id FROM metrics")]
    con.execute("DELETE FROM metrics_rollup" + (" WHERE run_id = ?" if run_id else ""), (run_id,) if run_id else ())
    for rid in run_ids:
        last = con.execute("SELECT MAX(step) FROM metrics WHERE run_id = ?", (rid,)).fetchone()[0]
        if last is not None:
            roll_up_span(con, rid, 0, last)


# Reads along a run's lineage. A rollback's run holds only the steps it trained itself; the ones before its branch
# step are its parent's rows (up to that step), so every read walks the lineage's spans, oldest first, and marks
# each row with the run that trained it and whether that is an ancestor's (inherited).
@dataclass(frozen=True)
class Span:
    """Global steps first..last of a lineage, trained in `run`: an ancestor's up to the step its child branched
    at (inherited), or the run's own."""
    run: str
    first: int
    last: int
    inherited: bool

    def where(self) -> tuple:
        return (self.run, self.first, self.last)


def lineage(con: sqlite3.Connection, run_id: str | None) -> list[Span]:
    """The spans of steps that make up a run, oldest first: for a rollback's run, its parent's steps up to the
    version it branched from (and so on up), then its own. Empty without a run."""
    spans: list[list] = []
    for i, (run, bound) in enumerate(ancestry(con, run_id)):  # newest first; bound: the child's branch step
        if i and bound is None:  # a parent whose version is gone (a damaged database): the walk ends here
            break
        spans.append([run, 0, END if bound is None else bound, i > 0])
        if i:
            spans[i - 1][1] = bound + 1
    return [Span(*s) for s in reversed(spans)]


def spans_of(con: sqlite3.Connection, run_id: str, own: bool) -> list[Span]:
    return [Span(run_id, 0, END, False)] if own else lineage(con, run_id)


def _clip(spans: list[Span], first: int, last: int) -> list[Span]:
    """The spans cut to steps first..last (those left with no step dropped)."""
    cut = [Span(s.run, max(s.first, first), min(s.last, last), s.inherited) for s in spans]
    return [s for s in cut if s.first <= s.last]


def _marked(row: sqlite3.Row, run_id: str) -> dict:
    return {**dict(row), "inherited": row["run"] != run_id}


def metric_series(con: sqlite3.Connection, run_id: str, first: int, last: int, points: int) -> dict:
    """The metric rows of a run's lineage in steps first..last: as stored when there are at most `points`, else at
    most `points` rows, each merging a range of steps (means; sums of tokens, examples and step time; exact loss
    min and max; a preference step's margin and accuracy averaged over the steps that have them, else None). Each
    row names the run of its (last) step."""
    spans = _clip(lineage(con, run_id), first, last)
    if _at_most(con, "metrics", spans, points):
        return _as_stored(con, "metrics", "job_id, loss, learning_rate, grad_norm, tokens, examples, step_time,"
                          " margin, accuracy", spans, run_id)
    lo, hi = _step_range(con, "metrics", spans)
    span = hi - lo + 1
    # The finest level with at most 8 buckets an output row: few rows to read, each of them exact.
    level = next((lv for lv in (1, *ROLLUP_LEVELS) if span // lv + 2 <= 8 * points), ROLLUP_LEVELS[-1])
    levels = tuple(lv for lv in (1, *ROLLUP_LEVELS) if lv <= level)
    parts = [part for s in _clip(spans, lo, hi) for part in _pieces(s.run, s.first, s.last, levels)]
    width = -(-span // points)
    run_of, run_args = _run_of_step(spans)
    rows = con.execute(
        "SELECT h.*, (SELECT job_id FROM metrics m WHERE m.run_id = h.run AND m.step = h.step) AS job_id FROM ("
        f" SELECT g.*, {run_of} AS run FROM ("
        " SELECT MAX(step_max) AS step, MIN(step_min) AS step_min, SUM(n) AS n,"
        " SUM(loss_sum) / NULLIF(SUM(loss_n), 0) AS loss, MIN(loss_min) AS loss_min, MAX(loss_max) AS loss_max,"
        " SUM(lr_sum) / NULLIF(SUM(lr_n), 0) AS learning_rate,"
        " SUM(grad_norm_sum) / NULLIF(SUM(grad_norm_n), 0) AS grad_norm, SUM(tokens) AS tokens,"
        " SUM(examples) AS examples, SUM(step_time) AS step_time, SUM(margin_sum) / NULLIF(SUM(margin_n), 0) AS margin,"
        " SUM(accuracy_sum) / NULLIF(SUM(accuracy_n), 0) AS accuracy"
        f" FROM ({' UNION ALL '.join(sql for sql, _ in parts)}) GROUP BY (step_min - ?) / ?) g) h ORDER BY step",
        (*run_args, *[a for _, args in parts for a in args], lo, width))
    return {"rows": [_marked(r, run_id) for r in rows], "downsampled": True, "bucket_steps": width, "level": level}


def eval_series(con: sqlite3.Connection, run_id: str, first: int, last: int, points: int) -> dict:
    """The evaluation rows of a run's lineage in steps first..last: as stored when there are at most `points`, else
    at most `points` rows, each merging a range of steps (mean, min and max eval loss)."""
    spans = _clip(lineage(con, run_id), first, last)
    if _at_most(con, "evals", spans, points):
        return _as_stored(con, "evals", "job_id, eval_loss, examples", spans, run_id)
    lo, hi = _step_range(con, "evals", spans)
    width = -(-(hi - lo + 1) // points)
    run_of, run_args = _run_of_step(spans)
    union = " UNION ALL ".join(["SELECT step, eval_loss, examples FROM evals WHERE run_id = ? AND step BETWEEN ? AND ?"]
                               * len(spans))
    rows = con.execute(
        "SELECT h.*, (SELECT job_id FROM evals e WHERE e.run_id = h.run AND e.step = h.step) AS job_id FROM ("
        f" SELECT g.*, {run_of} AS run FROM (SELECT MAX(step) AS step, MIN(step) AS step_min, COUNT(*) AS n,"
        " AVG(eval_loss) AS eval_loss, MIN(eval_loss) AS eval_loss_min, MAX(eval_loss) AS eval_loss_max,"
        f" MAX(examples) AS examples FROM ({union}) GROUP BY (step - ?) / ?) g) h ORDER BY step",
        (*run_args, *[a for s in spans for a in s.where()], lo, width))
    return {"rows": [_marked(r, run_id) for r in rows], "downsampled": True, "bucket_steps": width}


def _run_of_step(spans: list[Span]) -> tuple[str, tuple]:
    """SQL naming the run whose span holds `g.step` (spans in step order), and its arguments."""
    if len(spans) == 1:
        return "?", (spans[0].run,)
    whens = " ".join("WHEN g.step <= ? THEN ?" for _ in spans[:-1])
    return f"CASE {whens} ELSE ? END", (*[a for s in spans[:-1] for a in (s.last, s.run)], spans[-1].run)


def _as_stored(con: sqlite3.Connection, table: str, columns: str, spans: list[Span], run_id: str) -> dict:
    """The rows of the spans as stored (few enough to send whole)."""
    rows = [_marked(r, run_id) for s in spans for r in con.execute(
        f"SELECT step, run_id AS run, {columns}, created_at FROM {table} WHERE run_id = ? AND step BETWEEN ? AND ?"
        " ORDER BY step", s.where())]
    return {"rows": rows, "downsampled": False}


def _at_most(con: sqlite3.Connection, table: str, spans: list[Span], count: int) -> bool:
    """Whether the spans hold at most `count` rows (reads no more than count + 1 index entries)."""
    for s in spans:
        count -= con.execute(f"SELECT COUNT(*) FROM (SELECT 1 FROM {table} WHERE run_id = ? AND step BETWEEN ? AND ?"
                             " LIMIT ?)", (*s.where(), count + 1)).fetchone()[0]
        if count < 0:
            return False
    return True


def _step_range(con: sqlite3.Connection, table: str, spans: list[Span]) -> tuple[int, int]:
    """The first and last step with a row in the spans: an index seek a span (one MIN and one MAX each are)."""
    where = f"FROM {table} WHERE run_id = ? AND step BETWEEN ? AND ?"
    firsts = (con.execute(f"SELECT MIN(step) {where}", s.where()).fetchone()[0] for s in spans)
    lasts = (con.execute(f"SELECT MAX(step) {where}", s.where()).fetchone()[0] for s in reversed(spans))
    return next(v for v in firsts if v is not None), next(v for v in lasts if v is not None)


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


def set_eval_rows(con: sqlite3.Connection, run_id: str) -> list[dict]:
    """The held-out sets' losses (scored answers, preferred answers of pairs) at every evaluation of a run's
    lineage, by step then set name."""
    return [_marked(r, run_id) for s in lineage(con, run_id) for r in con.execute(
        "SELECT step, run_id AS run, name, job_id, loss, examples, tokens, exact, f1, answered, preference, created_at"
        " FROM set_evals WHERE run_id = ? AND step BETWEEN ? AND ? ORDER BY step, name", s.where())]


def samples(con: sqlite3.Connection, run_id: str, limit: int) -> list[dict]:
    """The latest `limit` sample generations of a run's lineage, newest first."""
    out: list[dict] = []
    for s in reversed(lineage(con, run_id)):
        out += [_marked(r, run_id) for r in con.execute(
            "SELECT id, step, run_id AS run, prompt, output, created_at FROM samples WHERE run_id = ?"
            " AND step BETWEEN ? AND ? ORDER BY id DESC LIMIT ?", (*s.where(), limit - len(out)))]
        if len(out) >= limit:
            break
    return out


def last_eval(con: sqlite3.Connection, run_id: str | None) -> dict | None:
    """The newest evaluation of eval.file in a run's lineage: {"step", "eval_loss"}, or None."""
    for s in reversed(lineage(con, run_id)):
        row = con.execute("SELECT step, eval_loss FROM evals WHERE run_id = ? AND step BETWEEN ? AND ?"
                          " ORDER BY step DESC LIMIT 1", s.where()).fetchone()
        if row is not None:
            return dict(row)
    return None


def preference_job(con: sqlite3.Connection, run_id: str | None) -> dict | None:
    """The newest preference or feedback job of a run's lineage (running or not): its id, file, format, state,
    steps, overrides and reference, the loss, margin and accuracy of its newest step ("step"; None before its first)
    and the share of its held-out pairs preferred at its newest evaluation ("held_out": {"set", "step",
    "preference", "examples"}, or None). Index seeks, but for a pass over the jobs."""
    formats = ", ".join("?" * len(PREFERENCE_FORMATS))
    for span in reversed(lineage(con, run_id)):
        job = con.execute("SELECT id, run_id, file, format, state, start_step, end_step, overrides, reference"
                          f" FROM jobs WHERE run_id = ? AND format IN ({formats}) AND start_step <= ?"
                          " ORDER BY start_step DESC, id DESC LIMIT 1",
                          (span.run, *PREFERENCE_FORMATS, span.last)).fetchone()
        if job is not None:
            break
    else:
        return None
    steps = (span.run, job["start_step"], min(job["end_step"] or END, span.last))
    step = con.execute("SELECT step, loss, margin, accuracy FROM metrics WHERE run_id = ? AND step BETWEEN ? AND ?"
                       " AND job_id = ? ORDER BY step DESC LIMIT 1", (*steps, job["id"])).fetchone()
    held = con.execute("SELECT step, preference, examples FROM set_evals WHERE run_id = ? AND step BETWEEN ? AND ?"
                       " AND name = ? AND preference IS NOT NULL ORDER BY step DESC LIMIT 1",
                       (*steps, set_name(job["id"]))).fetchone()
    return {**dict(job), "overrides": json.loads(job["overrides"] or "{}"),
            "reference": json.loads(job["reference"]) if job["reference"] else None,
            **(dict(step) if step else {"step": None, "loss": None, "margin": None, "accuracy": None}),
            "held_out": {"set": set_name(job["id"]), **dict(held)} if held else None}


def latest(con: sqlite3.Connection, run_id: str | None) -> dict:
    """What changes when a run's lineage gains rows: its last metric and evaluation step and newest sample id
    (0 for none). Index seeks a span, never counts."""
    spans = lineage(con, run_id)[::-1]

    def newest(query: str) -> int:
        return next((v for v in (con.execute(query, s.where()).fetchone()[0] for s in spans) if v is not None), 0)

    return {"metric_step": newest("SELECT MAX(step) FROM metrics WHERE run_id = ? AND step BETWEEN ? AND ?"),
            "eval_step": newest("SELECT MAX(step) FROM evals WHERE run_id = ? AND step BETWEEN ? AND ?"),
            "sample_id": newest("SELECT MAX(id) FROM samples WHERE run_id = ? AND step BETWEEN ? AND ?")}


def metric_count(con: sqlite3.Connection, run_id: str) -> int:
    """How many metric rows a run has of its own: summed from the coarsest rollup (a few rows a run), not counted."""
    return con.execute("SELECT COALESCE(SUM(n), 0) FROM metrics_rollup WHERE run_id = ? AND level = ?",
                       (run_id, ROLLUP_LEVELS[-1])).fetchone()[0]
