"""`conveyor doctor --repair`: a damaged, missing or mismatched conveyor.db is moved aside (never deleted) and a new
one is built from the checkpoint manifests (consistency.py finds what is wrong). Nothing under runs/ or data/ is ever
written here.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import testhooks
from ..data.holdout import kept_lines
from ..data.plan import Position
from ..fingerprint import fsync_dir, short
from . import checkpoints as ck
from . import database, jobs, lock, runs, versions
from .consistency import BUILDING, BUILT, INTENT, DiskRun, diagnose, scan
from .database import DB_FILE

TERMINAL = ("done", "skipped", "failed", "rejected")  # job states that never train again


# Rebuilding -------------------------------------------------------------------------------------------------------
@dataclass
class Report:
    problem: str | None = None  # what was wrong (None: nothing, so nothing was done)
    finished: str | None = None  # what became of a repair cut off before this one
    moved: list[str] = field(default_factory=list)  # the old files' new names
    rebuilt: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)  # what could not be rebuilt, and where it still is

    def to_json(self) -> dict:
        return {"problem": self.problem, "moved": self.moved, "rebuilt": self.rebuilt, "not_rebuilt": self.lost,
                "finished": self.finished}


def repair(ws) -> Report:
    """`conveyor doctor --repair`: a damaged, missing or mismatched conveyor.db is moved aside with its -wal and
    -shm (never deleted) and a new one is built from the checkpoint manifests; a whole, matching one is left alone.

    Crash-atomic: the new database is built beside the old one (BUILDING), the old one's aside name recorded
    (INTENT), and renaming the build to BUILT commits the repair; then the old files move aside and BUILT takes
    their place. A repair cut off before the commit leaves the old database as it was (the next repair removes the
    build); one cut off after it is finished by the next (`finish_cut_off`), with the rows it had already read."""
    path = ws.root / DB_FILE
    with lock.hold(ws, lambda pid: f"a conveyor daemon (pid {pid}) is running in {ws.root} with {DB_FILE} open; "
                   "end it first (`kill -TERM <pid>` stops it warmly), then `conveyor doctor --repair`"):
        finished = finish_cut_off(ws)
        problem = diagnose(ws)
        if problem is None:
            return Report(finished=finished)
        report = Report(problem=problem, finished=finished)
        disk = scan(ws)
        old = _salvage(path, disk, report)
        building = ws.root / BUILDING
        try:
            con = database.connect(building)
            try:
                with database.transaction(con):
                    _rebuild(con, ws, disk, old, report)
                con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                con.close()
            testhooks.failpoint("repair-built", 0)
            _write_intent(ws.root / INTENT, {"aside": _aside_name(path).name})
            testhooks.failpoint("repair-intent", 0)
        except BaseException:
            _remove(building)
            raise
        os.rename(building, ws.root / BUILT)  # the commit
        fsync_dir(ws.root)
        testhooks.failpoint("repair-committed", 0)
        report.moved = _put_in_place(ws)
    return report


def finish_cut_off(ws) -> str | None:
    """A repair cut off (SIGKILL, power loss): finished if it committed (its database put in place, the old one
    moved aside as it said), its leftovers removed if it did not; what was done, in words (None: nothing)."""
    root = ws.root
    if (root / BUILT).exists():
        moved = _put_in_place(ws)
        return (f"a `conveyor doctor --repair` cut off after it had built the new {DB_FILE} is finished: the new one "
                f"is in place" + (f", the old one moved aside as {', '.join(moved)}" if moved else ""))
    (root / INTENT).unlink(missing_ok=True)  # alone, it outlived a finished repair by an instant
    leftovers = [p for p in root.glob(f".{DB_FILE}.repair*") if p.is_file()]  # the build, or an older one's
    for p in leftovers:
        p.unlink()
    if leftovers:
        fsync_dir(root)
        return (f"a `conveyor doctor --repair` cut off before it had built the new {DB_FILE} left "
                f"{', '.join(sorted(p.name for p in leftovers))}, now removed; {DB_FILE} is as it was")
    return None


def _put_in_place(ws) -> list[str]:
    """The committed repair's last steps, each safe to repeat: the old database's parts aside, BUILT in its place,
    the intent gone."""
    root, path = ws.root, ws.root / DB_FILE
    try:
        aside = root / json.loads((root / INTENT).read_text(encoding="utf-8"))["aside"]
    except (OSError, ValueError, KeyError):  # written before the commit; unreadable only if tampered with
        aside = _aside_name(path)
    moved = _move_aside(path, aside)
    testhooks.failpoint("repair-moved", 0)
    os.rename(root / BUILT, path)
    fsync_dir(root)
    (root / INTENT).unlink(missing_ok=True)
    fsync_dir(root)
    return moved


def _write_intent(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(data) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)
    fsync_dir(path.parent)


def _remove(db: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)


def _aside_name(path: Path) -> Path:
    target = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
    while any(Path(f"{target}{s}").exists() for s in ("", "-wal", "-shm")):
        target = target.with_name(target.name + "x")
    return target


def _move_aside(path: Path, target: Path) -> list[str]:
    """conveyor.db, -wal, -shm → conveyor.db.damaged-<time>, -wal, -shm (SQLite still pairs them by name). The
    log goes first: a cut between leaves the main file as if its log had been deleted, never a log beside a
    database it does not belong to; the repair's new database replaces the main file anyway."""
    moved = []
    for suffix in ("-wal", "-shm", ""):
        if Path(f"{path}{suffix}").exists():
            os.rename(f"{path}{suffix}", f"{target}{suffix}")
            moved.append(f"{target.name}{suffix}")
            testhooks.failpoint(f"repair-aside{suffix or '-db'}", 0)
    fsync_dir(path.parent)
    return sorted(moved)


def _salvage(path: Path, disk: list[DiskRun], report: Report) -> dict[int, dict]:
    """Job rows of the old database, by id, where it can still be read and is this workspace's (each run it shares
    with the disk has the checkpoints' identity). Read from a copy, so the old file stays exactly as it was."""
    if not path.exists():
        return {}
    rows: dict[int, dict] = {}
    with tempfile.TemporaryDirectory(prefix=".repair-", dir=path.parent) as folder:
        copy = Path(folder) / DB_FILE
        for suffix in ("", "-wal"):
            if Path(f"{path}{suffix}").exists():
                shutil.copyfile(f"{path}{suffix}", f"{copy}{suffix}")
        con = sqlite3.connect(copy)
        con.row_factory = sqlite3.Row
        try:
            identities = {r["id"]: json.loads(r["identity"]) for r in con.execute("SELECT id, identity FROM runs")}
            if any(identities.get(r.id, r.checkpoints[-1].manifest.identity) != r.checkpoints[-1].manifest.identity
                   for r in disk if r.checkpoints):
                report.lost.append(f"nothing was taken from the old {DB_FILE}: its runs were trained as other models "
                                   "than the checkpoints in runs/ (a database of another workspace?)")
                return {}
            for row in con.execute("SELECT * FROM jobs ORDER BY id"):  # a damaged page ends the walk: keep the rest
                rows[row["id"]] = dict(row)
        except (sqlite3.Error, ValueError, TypeError) as e:
            report.lost.append(f"the old {DB_FILE} could be read only in part ({e}): {len(rows)} job row(s) read")
        finally:
            con.close()
    return rows


def _rebuild(con: sqlite3.Connection, ws, disk: list[DiskRun], old: dict[int, dict], report: Report) -> None:
    usable = [run for run in disk if run.checkpoints]
    for run in disk:
        if run.unusable:
            report.lost.append(f"runs/{run.id}: {len(run.unusable)} checkpoint(s) fail verification and are not used "
                               f"({'; '.join(run.unusable[:2])}); they are left as they are")
        if not run.checkpoints:
            report.lost.append(f"runs/{run.id}: no verified checkpoint, so no run is made of it (a new run never "
                               "takes its name: runs.next_id skips folders that hold anything)")
    _runs_and_versions(con, ws, usable, report)
    named = _jobs(con, ws, usable, old, report)
    _old_jobs(con, old, named, report)
    _stored_without_job(con, ws, old, report)
    report.lost.append("the ledger (which job trained which global steps), per-step metrics, evaluation losses, the "
                       "example audit, events, pause and control requests, and versions' gated marks: no checkpoint "
                       f"holds them; they stay in the moved-aside file ({DB_FILE}.damaged-…, readable with sqlite3 "
                       "where it is not damaged)")
    database.attach_log_file(ws.logs)
    database.log_event(con, "warning", "repair", f"{DB_FILE} rebuilt by `conveyor doctor --repair` from the checkpoint "
                    f"manifests of {len(usable)} run(s); the old one is kept beside it as {DB_FILE}.damaged-…")


def _runs_and_versions(con: sqlite3.Connection, ws, usable: list[DiskRun], report: Report) -> None:
    """A run per folder with a verified checkpoint (identity and global step from its newest), in number order,
    so the last is the active one; each followed by its versions, one per job-end checkpoint it trained."""
    version_of: dict[tuple[str, int], int] = {}
    for run in usable:
        newest, first = run.checkpoints[-1], run.checkpoints[0]
        branched = first.manifest.branched_from if isinstance(first.manifest.branched_from, dict) else None
        parent = version_of.get((branched.get("run"), branched.get("step"))) if branched else None
        if branched and parent is None:
            report.lost.append(f"{run.id} branched from {branched.get('run')} at step {branched.get('step')}, whose "
                               "checkpoint is gone: its parent version is not known")
        runs.create(con, newest.manifest.identity, f"rebuilt by `conveyor doctor --repair` from {len(run.checkpoints)}"
                    " checkpoint(s)", run_id=run.id, step=newest.step,
                    parent_run=branched.get("run") if branched else None, parent_version=parent)
        pins = _pins(ws.run_dir(run.id))
        for cp in run.checkpoints:
            if cp.manifest.job_end and not cp.manifest.branched_from:  # a rollback's copy is its parent's version
                # pinned as .pins.json says already (set_pinned would write that file again)
                version_of[(run.id, cp.step)] = versions.add(con, run.id, cp.manifest.job.job_id, cp.step,
                                                             pinned=cp.step in pins)
        report.rebuilt.append(f"{run.id}: identity and global step {newest.step} from {newest.path.name} "
                              f"({len(run.checkpoints)} verified checkpoint(s))"
                              + (f", branched from {branched.get('run')} at step {branched.get('step')}" if branched
                                 else ""))
    if usable:
        report.rebuilt.append(f"active run: {usable[-1].id}, the newest run folder with a verified checkpoint (a "
                              "rollback or a new identity always starts the next run number)")
    if version_of:
        shown = [f"{versions.name(v)} ({run} step {step})" for (run, step), v in version_of.items()]
        report.rebuilt.append(f"versions, one per job-end checkpoint that exists: {', '.join(shown[:12])}"
                              + (f" and {len(shown) - 12} more" if len(shown) > 12 else "")
                              + "; numbered anew, so a version may have another number than before")


def _pins(run_dir: Path) -> set[int]:
    try:
        return {int(s) for s in json.loads((ck.checkpoints_dir(run_dir) / ck.PINS).read_text(encoding="utf-8"))}
    except (OSError, ValueError, TypeError):
        return set()


@dataclass
class _Seen:
    """What the manifests say of one job, oldest mention first: (run, step, position, whether it ends there)."""
    mentions: list[tuple[str, int, Position, bool]] = field(default_factory=list)


def _jobs(con: sqlite3.Connection, ws, usable: list[DiskRun], old: dict[int, dict], report: Report) -> set[int]:
    """A job row for every job a verified manifest names: done at its newest end checkpoint; interrupted where
    the active run's newest checkpoint has it under way (it resumes from its own position); otherwise skipped,
    since whether it trained further is not known (`conveyor add` queues its stored copy again)."""
    seen: dict[int, _Seen] = {}
    for run in usable:
        for cp in run.checkpoints:
            m = cp.manifest
            owner = m.branched_from.get("run", run.id) if m.branched_from else run.id  # a copy: its parent's end
            seen.setdefault(m.job.job_id, _Seen()).mentions.append((owner, cp.step, m.job, m.job_end))
            for pos in m.open_jobs:
                seen.setdefault(pos.job_id, _Seen()).mentions.append((run.id, cp.step, pos, False))
    active = usable[-1] if usable else None
    said: dict[str, list[str]] = {}
    for job_id in sorted(seen):
        mentions = seen[job_id].mentions
        ends = [m for m in mentions if m[3]]
        under_way = active.checkpoints[-1].manifest.position_of(job_id) if active else None
        run_id, step, pos, _ = ends[-1] if ends else mentions[-1]
        if ends:
            state, fields = "done", {"end_step": step, "finished_at": time.time()}
        elif under_way is not None:
            run_id, pos = active.id, under_way
            state, fields = "interrupted", {"end_step": under_way.end_step}
        else:
            state = "skipped"
            fields = {"end_step": None, "error": f"rebuilt by `conveyor doctor --repair`: under way in {run_id} at "
                      f"step {step}, then no longer, and no end checkpoint of it exists, so whether it trained further "
                      f"is not known; `conveyor add data/{pos.fingerprint}.jsonl` trains it again from its first "
                      "example"}
        if len({m[2].fingerprint for m in mentions}) > 1:
            report.lost.append(f"job {job_id}: its checkpoints name different data; the newest "
                               f"({short(pos.fingerprint)}) is recorded")
        _insert_job(con, ws, job_id, run_id, state, pos, fields, old.get(job_id), report)
        said.setdefault(state, []).append(str(job_id))
    words = {"done": "done (their end checkpoints exist)", "interrupted": "interrupted where the active run's newest "
             "checkpoint has them (each resumes from its own position)", "skipped": "skipped: under way in a "
             "checkpoint, then no longer, with no end checkpoint (whether they trained further is not known)"}
    for state, ids in said.items():
        report.rebuilt.append(f"job(s) {', '.join(ids)}: {words[state]}")
    return set(seen)


def _insert_job(con, ws, job_id: int, run_id: str, state: str, pos: Position, fields: dict, old: dict | None,
                report: Report) -> None:
    stored = ws.data / f"{pos.fingerprint}.jsonl"
    kept = old if old and old.get("fingerprint") == pos.fingerprint else {}
    if not kept and not stored.exists():
        report.lost.append(f"job {job_id}: its stored copy data/{stored.name} is gone and its file name is not known")
    row = {"id": job_id, "run_id": run_id, "file": kept.get("file") or stored.name, "source": kept.get("source")
           or str(stored), "stored": str(stored), "fingerprint": pos.fingerprint, "format": kept.get("format"),
           "priority": kept.get("priority", 1), "state": state, "examples": pos.examples or kept.get("examples"),
           "tokens": kept.get("tokens"), "epochs": pos.epochs or kept.get("epochs"),
           "planned_steps": pos.planned_steps,
           "start_step": pos.start_step or None, "steps_done": pos.steps_done, "position": pos.position,
           "segment_start": pos.segment_start or None, "kept": kept.get("kept"), "truncated": kept.get("truncated", 0),
           "excluded": kept.get("excluded"), "warnings": kept.get("warnings") or "[]",
           "created_at": kept.get("created_at") or time.time(), "started_at": kept.get("started_at"),
           "holdout": kept.get("holdout") or _held_out(ws, job_id), "requeued_from": kept.get("requeued_from"),
           "error": None, **fields}
    jobs.restore(con, row)


def _held_out(ws, job_id: int) -> str:
    """The job's held-out lines, from its kept held-out examples (holdout.save: data/holdout/job-<id>-*.json);
    none kept: none held out (a job that did hold some out then stops with a message when it resumes, since its
    example count differs from its manifest's, rather than train its held-out examples)."""
    return json.dumps(kept_lines(ws.data / "holdout", job_id) or [])


def _old_jobs(con: sqlite3.Connection, old: dict[int, dict], taken: set[int], report: Report) -> None:
    """Jobs of the old database no manifest names that can never train again (done, skipped, failed, rejected):
    kept as they were, for the record. Waiting ones are not queued again (they may have trained after the old
    database's last write); _stored_without_job lists their stored copies."""
    columns = {r["name"] for r in con.execute("PRAGMA table_info(jobs)")}
    kept = []
    for job_id, row in old.items():
        if job_id in taken or row.get("state") not in TERMINAL:
            continue
        row = {k: v for k, v in row.items() if k in columns}
        jobs.restore(con, row)
        kept.append(str(job_id))
    if kept:
        report.rebuilt.append(f"job(s) {', '.join(kept)}: as the old {DB_FILE} had them (finished, skipped, failed or "
                              "rejected; no checkpoint names them)")


def _stored_without_job(con: sqlite3.Connection, ws, old: dict[int, dict], report: Report) -> None:
    """Stored copies in data/ that no rebuilt job holds (jobs only the old database knew, e.g. queued ones), and
    waiting jobs of the old database whose copy is gone. None is queued again: conveyor cannot tell whether it
    trained after the old database's last write, and a job must never train twice."""
    held = {r[0] for r in con.execute("SELECT fingerprint FROM jobs")}
    waiting = {}
    for job_id, row in old.items():
        if row.get("fingerprint") not in held:
            waiting.setdefault(row.get("fingerprint"), []).append(
                f"job {job_id}, {row.get('file')}, {row.get('state')}")
    for path in sorted(ws.data.glob("*.jsonl")) if ws.data.is_dir() else []:
        if path.stem not in held:
            was = "; ".join(waiting.pop(path.stem, [])) or "its job is not known"
            report.lost.append(f"data/{path.name} ({was}): in no checkpoint, so not queued again; "
                               f"`conveyor add data/{path.name}` queues it, if it never trained (conveyor cannot tell)")
    for fp, names in waiting.items():
        report.lost.append(f"{'; '.join(names)}: in no checkpoint, and its stored copy data/{fp}.jsonl is gone; add "
                           "the original file again if it never trained")
