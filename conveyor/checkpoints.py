"""Checkpoints on disk: numbered `step-000123/` folders, written atomically, verified, found and pruned.

A checkpoint is written into a temporary folder, flushed, verified against its manifest and renamed
into place; only then does the run's LATEST pointer move and old checkpoints get pruned (law 6).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import manifest as mf
from .errors import CheckpointError
from .fingerprint import fingerprint
from .testhooks import failpoint

CHECKPOINTS = "checkpoints"
UNUSABLE = "unusable"


@dataclass
class Checkpoint:
    path: Path
    step: int
    manifest: mf.Manifest


@dataclass
class Problem:
    path: Path
    reason: str


def folder_name(step: int) -> str:
    return f"{mf.STEP_PREFIX}{step:06d}"


def checkpoints_dir(run_dir: Path) -> Path:
    return run_dir / CHECKPOINTS


def step_of(path: Path) -> int | None:
    name = path.name
    if not name.startswith(mf.STEP_PREFIX):
        return None
    digits = name[len(mf.STEP_PREFIX):]
    return int(digits) if digits.isdigit() else None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _seal(tmp: Path, manifest: mf.Manifest) -> None:
    """Hash every file, write the manifest and flush everything to disk."""
    files = {}
    for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        files[str(path.relative_to(tmp))] = fingerprint(path)
    manifest.files = files
    with open(tmp / mf.MANIFEST, "w", encoding="utf-8") as f:
        json.dump(manifest.to_json(), f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)


def write(run_dir: Path, step: int, save: Callable[[Path], None], content: mf.Manifest, keep: int) -> Checkpoint:
    """Write a checkpoint atomically; on any failure the previous checkpoints stay as they were."""
    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / folder_name(step)
    tmp = root / f".tmp-{folder_name(step)}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        save(tmp)
        failpoint("checkpoint-write", step)
        _seal(tmp, content)
        data = mf.verify(tmp)
        if final.exists():
            raise CheckpointError(f"{final} already exists; checkpoint numbers must strictly increase")
        os.rename(tmp, final)
        _fsync_dir(root)
        failpoint("checkpoint-renamed", step)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            need = estimate_size(run_dir)
            raise CheckpointError(
                f"disk full while writing checkpoint {final.name}: it needs about {need / 1e6:.1f} MB, "
                f"{shutil.disk_usage(root).free / 1e6:.1f} MB are free; the previous checkpoint is intact. "
                "Free some space and start conveyor again"
            ) from e
        raise
    except ValueError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"checkpoint {final.name} failed verification right after writing: {e}") from e
    _point_latest(run_dir, final.name)
    prune(run_dir, keep)
    return Checkpoint(final, step, data)


def _point_latest(run_dir: Path, name: str) -> None:
    root = checkpoints_dir(run_dir)
    tmp = root / f".{mf.LATEST}.tmp"
    tmp.write_text(name + "\n")
    os.replace(tmp, root / mf.LATEST)


def estimate_size(run_dir: Path) -> int:
    """Bytes the next checkpoint will need: the size of the newest one (a small floor when there is none)."""
    found = numbered(run_dir)
    if not found:
        return 1 << 20
    return sum(p.stat().st_size for p in found[-1].rglob("*") if p.is_file())


def space_needed(run_dir: Path | None, keep: int, reserve_bytes: int) -> int:
    """Free bytes a job needs: `keep` checkpoints plus the one being written and a job-end one, plus a reserve."""
    per = estimate_size(run_dir) if run_dir else 1 << 20
    return per * (keep + 2) + reserve_bytes


def numbered(run_dir: Path) -> list[Path]:
    """Checkpoint folders in numeric (not string) order of their step."""
    root = checkpoints_dir(run_dir)
    if not root.exists():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and step_of(p) is not None]
    return sorted(found, key=step_of)


def foreign(run_dir: Path) -> list[Path]:
    """Folders in the checkpoints folder that are not conveyor's (e.g. a copied-in HF `checkpoint-N`)."""
    root = checkpoints_dir(run_dir)
    if not root.exists():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and step_of(p) is None and not p.name.startswith(".tmp-"))


def newest_verified(run_dir: Path) -> tuple[Checkpoint | None, list[Problem]]:
    """The newest checkpoint whose manifest and hashes check out, and the problems of every newer one."""
    problems: list[Problem] = [Problem(p, "not a conveyor checkpoint folder (no step-N name); never resumed")
                               for p in foreign(run_dir)]
    for path in reversed(numbered(run_dir)):
        try:
            data = mf.verify(path)
        except ValueError as e:
            problems.append(Problem(path, str(e)))
            continue
        if data.global_step != step_of(path):
            problems.append(Problem(path, f"folder says step {step_of(path)}, manifest says {data.global_step}"))
            continue
        return Checkpoint(path, data.global_step, data), problems
    return None, problems


def set_aside(run_dir: Path, problem: Problem) -> Path:
    """Move an unusable checkpoint to the run's `unusable/` folder with its reason; nothing is deleted."""
    target_root = run_dir / UNUSABLE
    target_root.mkdir(exist_ok=True)
    target = target_root / f"{problem.path.name}-{int(time.time())}"
    while target.exists():
        target = target.with_name(target.name + "x")
    os.rename(problem.path, target)
    (target_root / f"{target.name}.reason.txt").write_text(problem.reason + "\n", encoding="utf-8")
    return target


def clean_temporary(run_dir: Path) -> list[Path]:
    """Remove `.tmp-step-*` folders left by a write that was cut off; they never held a verified checkpoint."""
    root = checkpoints_dir(run_dir)
    if not root.exists():
        return []
    leftovers = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(".tmp-")]
    for path in leftovers:
        shutil.rmtree(path)
    return leftovers


def prune(run_dir: Path, keep: int) -> list[Path]:
    """Delete checkpoints beyond the last `keep`, except the last one of each job and any unreadable one."""
    found = numbered(run_dir)
    protected = set(found[-keep:])
    last_of_job: dict[int, Path] = {}
    for path in found:
        try:
            last_of_job[mf.read(path).job.job_id] = path  # numeric order: the last one wins
        except (ValueError, KeyError, TypeError):
            protected.add(path)  # never delete what we cannot read: a person may want to look at it
    protected |= set(last_of_job.values())
    removed = [p for p in found if p not in protected]
    for path in removed:
        shutil.rmtree(path)
    return removed
