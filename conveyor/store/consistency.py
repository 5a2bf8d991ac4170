"""conveyor.db checked against the runs on disk. The checkpoint manifests are the truth about weights and positions;
the database records them and what nothing else holds (ledger, metrics, events). Here conveyor finds where a database
disagrees with the runs on disk: at every open (Workspace.db), in full before anything trains, and for `conveyor
doctor`. Nothing is written here; repair.py rebuilds a database from the manifests.
"""

from __future__ import annotations

import contextlib
import re
import sqlite3
import weakref
from dataclasses import dataclass
from pathlib import Path

from ..faults import (
    DatabaseDamaged,
    database_message,
    database_mismatch_message,
    database_missing_message,
    is_damaged_database,
)
from ..fingerprint import fingerprint, short
from . import checkpoints as ck
from . import database, runs
from . import manifest as mf
from .database import DB_FILE
from .upgrade import upgrade

RUN_FOLDER = re.compile(r"run-\d+")  # the names runs.next_id gives; other folders in runs/ are a person's
SHOWN = 4  # mismatches named in one message; the rest are counted
# A repair's files beside conveyor.db: the new database while it is built, the same once built (renaming it is the
# repair's commit), and the name the old database is moved aside to (written before the commit).
BUILDING, BUILT, INTENT = f".{DB_FILE}.repair", f".{DB_FILE}.repaired", f".{DB_FILE}.repair.json"


# Finding a mismatch ---------------------------------------------------------------------------------------------
def run_folders(runs_dir: Path) -> list[Path]:
    """conveyor's run folders under runs/, in the order their runs were made."""
    if not runs_dir.is_dir():
        return []
    return sorted((p for p in runs_dir.iterdir() if p.is_dir() and RUN_FOLDER.fullmatch(p.name)),
                  key=lambda p: int(p.name[4:]))


def _manifests(run_dir: Path, after: int | None = None) -> list[tuple[Path, mf.Manifest]]:
    """Readable manifests, newest first: of every checkpoint past step `after`, and at least the newest one that
    reads (read, not hashed: this runs at every open, so it reads one or two files a run)."""
    out: list[tuple[Path, mf.Manifest]] = []
    for path in reversed(ck.numbered(run_dir)):
        if out and (after is None or ck.step_of(path) <= after):
            break
        with contextlib.suppress(ValueError, OSError):
            out.append((path, mf.read(path)))
    return out


def _unknown(folder: Path, newest: mf.Manifest) -> str:
    return (f"runs/{folder.name} holds {len(ck.numbered(folder))} checkpoint(s) (newest step {newest.global_step}) "
            f"that {DB_FILE} does not know")


def missing(ws) -> list[str]:
    """With conveyor.db gone: the run folders holding checkpoints, which a new database would train over."""
    return [_unknown(folder, read[0][1]) for folder in run_folders(ws.runs) if (read := _manifests(folder))]


def mismatches(ws, con: sqlite3.Connection) -> list[str]:
    """Where conveyor.db disagrees with the runs on disk, in words; [] when it agrees.

    A disagreement is a run folder with checkpoints the database does not know (it was deleted or replaced), a run
    whose checkpoints carry another identity than the database's, a checkpoint naming a job the database does not
    know or knows with other bytes, or a job whose end checkpoint exists while the database still has it queued (it
    lost its last writes: the job would train twice). A database behind its newest checkpoint's step is not one: a
    crash between a checkpoint and its database write is normal, and the manifests win (reconcile.place). Lost
    writes are a suffix of its history, so a job's lost end lies past the step the database has: only checkpoints
    past it are read for that (the worker records each step before its checkpoint, so normally none).

    The step-by-step history (the audit) is never behind: a step is recorded before any checkpoint holds it. A
    history that ends before the newest checkpoint's step is a database put back from an older copy (or one that
    lost its last writes): the steps between are named, and nothing trains on it until it is put back or rebuilt."""
    known = {run.id: run for run in runs.all_runs(con)}
    reads = [(folder, known.get(folder.name)) for folder in run_folders(ws.runs)]
    reads = [(folder, run, read) for folder, run in reads
             if (read := _manifests(folder, run.global_step if run else None))]
    named = sorted({p.job_id for _, _, read in reads for _, m in read for p in [m.job, *m.open_jobs]})
    known = {r["id"]: (r["fingerprint"], r["state"]) for r in con.execute(  # only the jobs the manifests name:
        f"SELECT id, fingerprint, state FROM jobs WHERE id IN ({', '.join('?' * len(named))})", named)}  # every open
    found: list[str] = []
    for folder, run, read in reads:
        if run is None:
            found.append(_unknown(folder, read[0][1]))
            continue
        path, newest = read[0]
        where = f"runs/{run.id}/{ck.CHECKPOINTS}/{path.name}"
        if newest.identity != run.identity:
            found.append(f"{where} was trained as another model than {DB_FILE} records for {run.id} ("
                         + "; ".join(runs.differences(run.identity, newest.identity)) + ")")
        for pos in [newest.job, *newest.open_jobs]:
            recorded = known.get(pos.job_id)
            if recorded is None:
                found.append(f"{where} trained job {pos.job_id} (data {short(pos.fingerprint)}), which {DB_FILE} "
                             "does not know")
            elif recorded[0] != pos.fingerprint:
                found.append(f"{where} trained job {pos.job_id} on data {short(pos.fingerprint)}, but {DB_FILE} "
                             f"has job {pos.job_id} with data {short(recorded[0])}")
        behind = _history_behind(con, run.id, read)
        if behind:
            found.append(behind)
        for path, data in read:
            if data.job_end and not data.branched_from and known.get(data.job.job_id, ("", ""))[1] == "queued":
                found.append(f"runs/{run.id}/{ck.CHECKPOINTS}/{path.name} is the end of job {data.job.job_id}, "
                             f"which {DB_FILE} still has queued")
    found = list(dict.fromkeys(found))
    return found[:SHOWN] + ([f"and {len(found) - SHOWN} more"] if len(found) > SHOWN else [])


def _history_behind(con: sqlite3.Connection, run_id: str, read: list[tuple[Path, mf.Manifest]]) -> str | None:
    """The run's newest checkpoint holds steps its recorded history lacks: in words, with the jobs that trained them.
    A run with no history of its own (rebuilt by a repair, or a rollback's copy not trained on) has none to lack."""
    last = con.execute("SELECT MAX(step) FROM audit WHERE run_id = ?", (run_id,)).fetchone()[0]
    path, newest = read[0]
    if last is None or newest.global_step <= last:
        return None
    jobs = sorted({m.job.job_id for _, m in read if m.global_step > last} | {newest.job.job_id})
    return (f"its history of {run_id} ends at step {last}, but runs/{run_id}/{ck.CHECKPOINTS}/{path.name} holds step "
            f"{newest.global_step}: steps {last + 1}–{newest.global_step} (job {', '.join(map(str, jobs))}) are "
            f"missing from its history, as in an older copy of {DB_FILE} put back; if you have the newer one, put it "
            "back (with its -wal file)")


def open_checked(ws) -> sqlite3.Connection:
    """The workspace's database, checked on open (Workspace.db): DatabaseDamaged, naming the file, what is wrong
    and the fix, when it is damaged (database.connect), missing while runs/ holds checkpoints (no empty one is made in
    its place), or does not match the runs on disk."""
    path = ws.root / DB_FILE
    if not path.exists() and (ws.root / BUILT).exists():
        raise DatabaseDamaged(f"the state database {path} is missing: a `conveyor doctor --repair` was cut off just "
                              f"after it had built the new one ({BUILT}); run `conveyor doctor --repair` again to "
                              "put it in place")
    if not path.exists() and (found := missing(ws)):
        raise DatabaseDamaged(database_missing_message(path, found))
    con = database.connect(path)
    try:
        upgrade(con, path)
        found = mismatches(ws, con)
    except BaseException:
        con.close()
        raise
    if found:
        con.close()
        raise DatabaseDamaged(database_mismatch_message(path, found))
    return con


_whole: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # id(workspace) -> workspace checked in full


def refuse_to_train(ws) -> None:
    """Before a job is placed (reconcile.place): conveyor.db is whole, every page of it (PRAGMA quick_check: it
    reads the whole file, so once per workspace object, i.e. per connection), and agrees with the runs on disk,
    which may have changed since it was opened. Raises DatabaseDamaged otherwise: nothing trains on it."""
    path = ws.root / DB_FILE
    if _whole.get(id(ws)) is not ws:
        try:
            problems = [row[0] for row in ws.db.execute("PRAGMA quick_check")]
        except sqlite3.DatabaseError as e:
            if not is_damaged_database(e):
                raise
            problems = [str(e)]
        if problems != ["ok"]:
            raise DatabaseDamaged(database_message(path, "; ".join(problems[:3])))
        _whole[id(ws)] = ws
    found = mismatches(ws, ws.db)
    if found:
        raise DatabaseDamaged(database_mismatch_message(path, found))


def diagnose(ws) -> str | None:
    """What is wrong with conveyor.db, in words (None: whole, every page, and matching the runs on disk). Opens
    its own connection; a missing database with no checkpoints on disk is not a fault (the next command makes it)."""
    path = ws.root / DB_FILE
    if not path.exists():
        found = missing(ws)
        return database_missing_message(path, found) if found else None
    try:
        con = database.connect(path)
    except DatabaseDamaged as e:
        return str(e)
    try:
        problems = [row[0] for row in con.execute("PRAGMA quick_check")]
        if problems != ["ok"]:
            return database_message(path, "; ".join(problems[:3]))
        found = mismatches(ws, con)
        return database_mismatch_message(path, found) if found else None
    except sqlite3.DatabaseError as e:
        if not is_damaged_database(e):
            raise
        return database_message(path, e)
    finally:
        con.close()


# What the disk holds ----------------------------------------------------------------------------------------------
@dataclass
class DiskRun:
    id: str
    checkpoints: list[ck.Checkpoint]  # verified, oldest first
    unusable: list[str]  # "step-000004: why"


def scan(ws, deep: bool = False) -> list[DiskRun]:
    """Every run folder's checkpoints, verified against their manifests (hashes recorded before are trusted when
    size and mtime match, unless `deep`; nothing is recorded: runs/ is only read)."""
    out = []
    for folder in run_folders(ws.runs):
        sha256 = fingerprint if deep else ck.HashCache(ck.checkpoints_dir(folder)).sha256
        good, bad = [], []
        for path in ck.numbered(folder):
            try:
                data = mf.verify(path, sha256)
                if data.global_step != ck.step_of(path):
                    raise ValueError(f"the folder says step {ck.step_of(path)}, the manifest {data.global_step}")
                good.append(ck.Checkpoint(path, data.global_step, data))
            except (ValueError, OSError) as e:
                bad.append(f"{path.name}: {e}")
        out.append(DiskRun(folder.name, good, bad))
    return out


def describe(disk: list[DiskRun]) -> list[tuple[str, str]]:
    """(level, text) per run folder: what `--repair` would rebuild it from."""
    out = []
    for run in disk:
        if run.checkpoints:
            newest = run.checkpoints[-1]
            where = "end of" if newest.manifest.job_end else "in"
            out.append(("ok", f"runs/{run.id}: {len(run.checkpoints)} checkpoint(s) verified, newest step "
                        f"{newest.step} ({where} job {newest.manifest.job.job_id})"))
        for problem in run.unusable:
            out.append(("warning", f"runs/{run.id}/{problem}"))
    return out


