"""Versions: the checkpoint at the end of each job (`v1`, `v2`, … per workspace, never reused), listed with its
run, job, file, step and evaluation results, and pinned to keep it from retention forever.

Pins live in the database and, for retention (checkpoints.prune runs where no database is at hand), in the run's
`checkpoints/.pins.json`: the steps it must never delete.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import time
from pathlib import Path

from ..data.holdout import EVAL_FILE, job_of
from ..data.probe import RETENTION
from ..errors import ConveyorError
from . import checkpoints as ck
from . import manifest as mf
from . import runs, series
from .runs import ancestry

NAME = re.compile(r"v(\d+)")
BASE = "base"  # the matrix's row of the base model (step 0), where the probe was scored on it


def name(version_id: int) -> str:
    return f"v{version_id}"


def at_step(con: sqlite3.Connection, run_id: str, step: int) -> int | None:
    """The id of the version that ends at this step of the run (a job's end), if any and not lost."""
    row = con.execute("SELECT id FROM versions WHERE run_id = ? AND step = ? AND lost = 0", (run_id, step)).fetchone()
    return row["id"] if row else None


def all_versions(con: sqlite3.Connection, runs_dir: Path | None = None) -> list[dict]:
    """Every version not lost in a rewind, oldest first, with the evaluation losses at its step; given the runs
    folder, also what retention left of it (`kept_state`: "weights" and "optimizer")."""
    rows = con.execute("SELECT v.*, j.file FROM versions v JOIN jobs j ON j.id = v.job_id WHERE v.lost = 0"
                       " ORDER BY v.id").fetchall()
    return [{"version": name(r["id"]), "run": r["run_id"], "job": r["job_id"], "file": r["file"],
             "step": r["step"], "eval": losses_at(con, r["run_id"], r["step"]),
             "answers": answers_at(con, r["run_id"], r["step"]),
             "preference": preference_at(con, r["run_id"], r["step"]), "pinned": bool(r["pinned"]),
             "gated": r["gated"], **(kept_state(runs_dir, r["run_id"], r["step"]) if runs_dir else {})}
            for r in rows]


def kept_state(runs_dir: Path, run_id: str, step: int) -> dict[str, str]:
    """What of a version's checkpoint is on disk, as its manifest says (read, not hashed): "weights" and
    "optimizer" each "kept" or "pruned" (by retention), or both "missing" / "unreadable"."""
    folder = ck.checkpoints_dir(runs_dir / run_id) / ck.folder_name(step)
    if not folder.is_dir():
        return {"weights": "missing", "optimizer": "missing"}
    try:
        data = mf.read(folder)
    except (ValueError, OSError):
        return {"weights": "unreadable", "optimizer": "unreadable"}
    return {"weights": "pruned" if data.weights_pruned else "kept",
            "optimizer": "pruned" if data.optimizer_pruned or data.weights_pruned else "kept"}


def _kept(runs_dir: Path, row: sqlite3.Row, version: str) -> tuple[Path, mf.Manifest]:
    """A version's checkpoint folder and manifest (not yet hashed), if its weights are there; else ConveyorError
    says plainly what happened to them."""
    where = f"{runs_dir.name}/{row['run_id']}/{ck.CHECKPOINTS}"
    folder = ck.checkpoints_dir(runs_dir / row["run_id"]) / ck.folder_name(row["step"])
    if not folder.is_dir():
        raise ConveyorError(f"{version}'s checkpoint {folder.name} is missing from {where} (deleted outside "
                            "conveyor?); it cannot be used. `conveyor versions` shows which versions have weights")
    try:
        data = mf.read(folder)
    except (ValueError, OSError) as e:
        raise ConveyorError(f"{version}'s checkpoint {folder.name} in {where} cannot be used ({e}); "
                            "`conveyor doctor` checks every checkpoint") from None
    if data.weights_pruned:
        at = next(r.get(mf.K_PRUNED_AT) for r in data.pruned if r[mf.K_PRUNED_BY] == data.weights_pruned)
        when = time.strftime(" on %Y-%m-%d at %H:%M", time.localtime(at)) if isinstance(at, (int, float)) else ""
        raise ConveyorError(f"{version}'s weights were pruned by retention ({data.weights_pruned}){when}: "
                            f"{where}/{folder.name} keeps only its manifest, so it cannot be exported, tried or "
                            "rolled back to. Pin the versions you may come back to (`conveyor pin`), or set "
                            f"{mf.BY_VERSION_WEIGHTS} = false to keep the weights of later ones")
    return folder, data


def losses_at(con: sqlite3.Connection, run_id: str, step: int) -> dict[str, float]:
    """Every evaluation set's loss at a step: eval.file's, then the held-out sets in the order they began."""
    out = {EVAL_FILE: r["eval_loss"] for r in con.execute("SELECT eval_loss FROM evals WHERE run_id = ? AND step = ?",
                                                           (run_id, step))}
    rows = con.execute("SELECT name, loss FROM set_evals WHERE run_id = ? AND step = ?", (run_id, step)).fetchall()
    start = {r["id"]: r["start_step"] for r in con.execute(
        f"SELECT id, start_step FROM jobs WHERE id IN ({', '.join('?' * len(rows))})",
        [job_of(r["name"]) for r in rows])}
    out.update({r["name"]: r["loss"] for r in sorted(rows, key=lambda r: (start.get(job_of(r["name"])) or 0,
                                                                           r["name"]))})
    return out


def answers_at(con: sqlite3.Connection, run_id: str, step: int) -> dict[str, dict]:
    """Each held-out set's scored answers at a step ({"exact", "f1", "answered"}), for the sets that had them."""
    return {r["name"]: {"exact": r["exact"], "f1": r["f1"], "answered": r["answered"]} for r in con.execute(
        "SELECT name, exact, f1, answered FROM set_evals WHERE run_id = ? AND step = ? AND answered IS NOT NULL",
        (run_id, step))}


def preference_at(con: sqlite3.Connection, run_id: str, step: int) -> dict[str, float]:
    """Each held-out set of pairs at a step: the share of its pairs whose chosen answer the model finds more likely
    than the rejected one (sets of other files have none)."""
    return {r["name"]: r["preference"] for r in con.execute(
        "SELECT name, preference FROM set_evals WHERE run_id = ? AND step = ? AND preference IS NOT NULL",
        (run_id, step))}


def step_name(con: sqlite3.Connection, run_id: str, step: int) -> str:
    """What the model at a global step of a run's lineage is called: `base` (step 0), the version that ends there
    (`v2`, in whichever run of the lineage trained it), or `step 12` (a checkpoint inside a job)."""
    if step == 0:
        return BASE
    span = next((s for s in series.lineage(con, run_id) if s.first <= step <= s.last), None)
    found = at_step(con, span.run, step) if span else None
    return name(found) if found else f"step {step}"


def lineage(con: sqlite3.Connection, run_id: str | None = None) -> list[dict]:
    """The versions that led to a run (default: the active one): for a rollback's run, its parent's up to the
    version it branched from (and so on up), then its own; oldest first."""
    if run_id is None:
        active = con.execute("SELECT id FROM runs WHERE active = 1").fetchone()
        if active is None:
            return []
        run_id = active["id"]
    by_run: dict[str, list[dict]] = {}
    for v in all_versions(con):
        by_run.setdefault(v["run"], []).append(v)
    out: list[dict] = []
    for run, bound in ancestry(con, run_id):
        out = [v for v in by_run.get(run, []) if bound is None or v["step"] <= bound] + out
    return out


def matrix(con: sqlite3.Connection, run_id: str | None = None) -> dict:
    """Versions × evaluation sets: each version's loss on every set scored at its step (None where a set did not
    exist yet), and its scored answers where there were some. The sets are eval.file's when it was scored, the probe's
    (retention: the base model's answers) and the held-out sets in the order their jobs began. The versions are those
    of a run's lineage (default: the active run's; see `lineage`), after the base model's own row (`base`, step 0)
    where the probe's base answers were scored."""
    rows = lineage(con, run_id)
    if rows:
        first = rows[0]["run"]
        base = {"version": BASE, "run": first, "job": None, "step": 0, "eval": losses_at(con, first, 0),
                "answers": answers_at(con, first, 0), "preference": preference_at(con, first, 0), "gated": None}
        rows = ([base] if base["eval"] else []) + rows
    names: list[str] = []
    for v in rows:
        names += [n for n in v["eval"] if n not in names]
    names.sort(key=lambda n: (n != EVAL_FILE, n != RETENTION))  # eval.file, retention, then held-out sets in order
    sets = []
    for n in names:
        job = con.execute("SELECT id, file FROM jobs WHERE id = ?", (job_of(n),)).fetchone()
        sets.append({"name": n, "job": job["id"] if job else None,
                     "file": job["file"] if job else "base answers" if n == RETENTION else EVAL_FILE,
                     "examples": _examples(con, n)})
    return {"sets": sets, "rows": [{"version": v["version"], "run": v["run"], "job": v["job"], "step": v["step"],
                                    "loss": {n: v["eval"].get(n) for n in names},
                                    "answers": {n: v["answers"][n] for n in names if n in v["answers"]},
                                    "preference": {n: v["preference"][n] for n in names if n in v["preference"]},
                                    "gated": v["gated"]}
                                   for v in rows]}


def _examples(con: sqlite3.Connection, set_name: str) -> int:
    table, where = ("evals", "") if set_name == "eval.file" else ("set_evals", " WHERE name = ?")
    row = con.execute(f"SELECT MAX(examples) FROM {table}{where}", (set_name,) if where else ()).fetchone()
    return row[0] or 0


def find(con: sqlite3.Connection, version: str) -> sqlite3.Row:
    """The version named `version` (v3); ConveyorError says what exists when it does not."""
    match = NAME.fullmatch(version.strip())
    row = con.execute("SELECT * FROM versions WHERE id = ? AND lost = 0", (int(match.group(1)),)).fetchone() \
        if match else None
    if row is None:
        known = ", ".join(v["version"] for v in all_versions(con)) or "none yet (a version is made when a job ends)"
        meant = f" (did you mean v{version.strip()}?)" if version.strip().isdigit() else ""
        raise ConveyorError(f"no version {version!r}{meant}; versions: {known}. See `conveyor versions`")
    return row


def checkpoint(con: sqlite3.Connection, runs_dir: Path, version: str):
    """(run, verified checkpoint, name) of a version; ConveyorError says why it cannot be used."""
    row = find(con, version)
    run = next(r for r in runs.all_runs(con) if r.id == row["run_id"])
    path, _ = _kept(runs_dir, row, version)
    try:
        return run, ck.Checkpoint(path, row["step"], mf.verify(path)), name(row["id"])
    except (ValueError, OSError) as e:
        raise ConveyorError(f"{version}'s checkpoint {path.name} in {runs_dir.name}/{run.id}/{ck.CHECKPOINTS} "
                            f"cannot be used ({e}); `conveyor doctor` checks every checkpoint") from None


def set_pinned(con: sqlite3.Connection, runs_dir: Path, version: str, pinned: bool) -> str:
    """Pin or unpin a version; returns what was done, in words."""
    row = find(con, version)
    folder = ck.checkpoints_dir(runs_dir / row["run_id"]) / ck.folder_name(row["step"])
    data = _kept(runs_dir, row, version)[1] if pinned else None
    con.execute("UPDATE versions SET pinned = ? WHERE id = ?", (int(pinned), row["id"]))
    con.commit()
    _write_pins(con, runs_dir, row["run_id"])
    if pinned:
        text = f"pinned {version}: {folder} is kept whole whatever retention says (`conveyor unpin {version}` undoes)"
        if data.optimizer_pruned:
            text += (f"; its optimizer state was already pruned by retention ({data.optimizer_pruned}), so a "
                     "rollback to it starts the optimizer moments from zero")
        return text
    return (f"unpinned {version}: once it is no longer among the kept ones, retention may prune its optimizer state "
            f"(its weights are kept unless {mf.BY_VERSION_WEIGHTS} is set for a full fine-tune)")


def _write_pins(con: sqlite3.Connection, runs_dir: Path, run_id: str) -> None:
    steps = [r["step"] for r in con.execute("SELECT step FROM versions WHERE run_id = ? AND pinned = 1 AND lost = 0"
                                           " ORDER BY step", (run_id,))]
    root = ck.checkpoints_dir(runs_dir / run_id)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{ck.PINS}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(steps), encoding="utf-8")
    os.replace(tmp, root / ck.PINS)


def rises(con: sqlite3.Connection, version_id: int, exclude: str | None = None) -> list[dict]:
    """How each held-out set scored at both this version and the version before it (in its run's lineage)
    changed: [{"set", "file", "before", "after", "change", "before_version"}], largest relative rise first; and
    where answers were scored at both, their F1 ("f1_before", "f1_after"). The probe (retention) is not a held-out
    set: `retention` measures it."""
    row = con.execute("SELECT * FROM versions WHERE id = ?", (version_id,)).fetchone()
    previous = _previous(con, row)
    if previous is None:
        return []
    after, before = losses_at(con, row["run_id"], row["step"]), losses_at(con, previous["run_id"], previous["step"])
    answered = answers_at(con, row["run_id"], row["step"])
    answered_before = answers_at(con, previous["run_id"], previous["step"])
    out = []
    for set_name, loss in after.items():
        if set_name in (EVAL_FILE, RETENTION, exclude) or before.get(set_name) is None or not before[set_name]:
            continue
        job = con.execute("SELECT file FROM jobs WHERE id = ?", (job_of(set_name),)).fetchone()
        f1 = {} if set_name not in answered or set_name not in answered_before else {
            "f1_before": answered_before[set_name]["f1"], "f1_after": answered[set_name]["f1"]}
        out.append({"set": set_name, "file": job["file"] if job else "?", "before": before[set_name], "after": loss,
                    "change": (loss - before[set_name]) / before[set_name], "before_version": previous["id"], **f1})
    return sorted(out, key=lambda r: -r["change"])


def retention(con: sqlite3.Connection, version_id: int) -> dict | None:
    """The version's answers to the probe against the base's ({"exact", "f1", "answered"}), if scored."""
    row = con.execute("SELECT run_id, step FROM versions WHERE id = ?", (version_id,)).fetchone()
    return answers_at(con, row["run_id"], row["step"]).get(RETENTION) if row else None


def _previous(con: sqlite3.Connection, row: sqlite3.Row) -> sqlite3.Row | None:
    """The version before `row` in its run, or, for a rollback's first job, the version the run branched from."""
    found = con.execute("SELECT * FROM versions WHERE run_id = ? AND step < ? AND lost = 0 ORDER BY step DESC"
                        " LIMIT 1", (row["run_id"], row["step"])).fetchone()
    if found is not None:
        return found
    parent = con.execute("SELECT parent_version FROM runs WHERE id = ?", (row["run_id"],)).fetchone()
    if parent and parent["parent_version"]:
        return con.execute("SELECT * FROM versions WHERE id = ?", (parent["parent_version"],)).fetchone()
    return None


# Writers: the versions table is written here only. ---------------------------------------------------------------
def add(con: sqlite3.Connection, run_id: str, job_id: int, step: int, pinned: bool = False) -> int:
    """A job ended at `step`: its checkpoint there is a new version (v1, v2, ...: never reused); returns its id.
    `pinned`: as the run's .pins.json already says (doctor --repair rebuilding the table)."""
    return con.execute("INSERT INTO versions (run_id, job_id, step, created_at, pinned) VALUES (?, ?, ?, ?, ?)",
                       (run_id, job_id, step, time.time(), int(pinned))).lastrowid


def lose_after(con: sqlite3.Connection, run_id: str, step: int) -> None:
    """Versions past `step` are lost with a rewind (their jobs train those steps again; a new version follows)."""
    con.execute("UPDATE versions SET lost = 1 WHERE run_id = ? AND step > ?", (run_id, step))


def set_gated(con: sqlite3.Connection, version_id: int, why: str) -> None:
    con.execute("UPDATE versions SET gated = ? WHERE id = ?", (why, version_id))


def backfill(con: sqlite3.Connection) -> None:
    """A database from before versions: one version per job end its ledger recorded, in ledger order."""
    if con.execute("SELECT 1 FROM versions LIMIT 1").fetchone() is None:
        con.execute("INSERT INTO versions (run_id, job_id, step, created_at) SELECT run_id, job_id, end_step,"
                    " created_at FROM ledger WHERE outcome = 'done' ORDER BY id")
