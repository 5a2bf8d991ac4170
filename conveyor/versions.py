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
from pathlib import Path

from . import checkpoints as ck
from .errors import ConveyorError

NAME = re.compile(r"v(\d+)")


def name(version_id: int) -> str:
    return f"v{version_id}"


def all_versions(con: sqlite3.Connection) -> list[dict]:
    """Every version not lost in a rewind, oldest first, with the evaluation losses at its step."""
    rows = con.execute("SELECT v.*, j.file FROM versions v JOIN jobs j ON j.id = v.job_id WHERE v.lost = 0"
                       " ORDER BY v.id").fetchall()
    out = []
    for r in rows:
        evals = con.execute("SELECT eval_loss FROM evals WHERE run_id = ? AND step = ?", (r["run_id"], r["step"]))
        out.append({"version": name(r["id"]), "run": r["run_id"], "job": r["job_id"], "file": r["file"],
                    "step": r["step"], "eval": {"eval.file": e["eval_loss"] for e in evals},
                    "pinned": bool(r["pinned"])})
    return out


def find(con: sqlite3.Connection, version: str) -> sqlite3.Row:
    """The version named `version` (v3); ConveyorError says what exists when it does not."""
    match = NAME.fullmatch(version.strip())
    row = con.execute("SELECT * FROM versions WHERE id = ? AND lost = 0", (int(match.group(1)),)).fetchone() \
        if match else None
    if row is None:
        known = ", ".join(v["version"] for v in all_versions(con)) or "none yet (a version is made when a job ends)"
        raise ConveyorError(f"no version {version!r}; versions: {known}. See `conveyor versions`")
    return row


def set_pinned(con: sqlite3.Connection, runs_dir: Path, version: str, pinned: bool) -> str:
    """Pin or unpin a version; returns what was done, in words."""
    row = find(con, version)
    folder = ck.checkpoints_dir(runs_dir / row["run_id"]) / ck.folder_name(row["step"])
    if pinned and not folder.is_dir():
        raise ConveyorError(f"{version}'s checkpoint {folder.name} was already removed by retention; only versions "
                            "whose checkpoint still exists can be pinned (raise training.keep_job_ends to keep more)")
    con.execute("UPDATE versions SET pinned = ? WHERE id = ?", (int(pinned), row["id"]))
    con.commit()
    _write_pins(con, runs_dir, row["run_id"])
    if pinned:
        return f"pinned {version}: {folder} is kept whatever retention says (`conveyor unpin {version}` undoes)"
    return f"unpinned {version}: retention may remove {folder.name} once it is no longer among the kept ones"


def _write_pins(con: sqlite3.Connection, runs_dir: Path, run_id: str) -> None:
    steps = [r["step"] for r in con.execute("SELECT step FROM versions WHERE run_id = ? AND pinned = 1 AND lost = 0"
                                           " ORDER BY step", (run_id,))]
    root = ck.checkpoints_dir(runs_dir / run_id)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{ck.PINS}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(steps), encoding="utf-8")
    os.replace(tmp, root / ck.PINS)
