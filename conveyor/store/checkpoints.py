"""Checkpoints on disk: numbered `step-000123/` folders, written atomically, verified, found and pruned.

A checkpoint is written into a temporary folder, flushed, verified against its manifest and renamed
into place; only then does the run's LATEST pointer move and old checkpoints get pruned (law 6). Retention never
deletes a version's weights unless training.prune_version_weights says so: an older job end loses its optimizer
state only, and its manifest records what was pruned and by which setting.
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

from ..errors import CheckpointError
from ..fingerprint import fingerprint, fsync_dir, hash_entry, trusted
from ..testhooks import failpoint, fill_disk
from . import manifest as mf

CHECKPOINTS = "checkpoints"
UNUSABLE = "unusable"
PINS = ".pins.json"  # in checkpoints/: steps of pinned versions (versions.py), never deleted by retention
HASHES = ".hashes.json"  # in checkpoints/: "step-000123/<file>" -> [size, mtime_ns, sha256] of files hashed before
# (a sharded checkpoint's files inside their DCP folder: "step-000123/model/__0_0.distcp")


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



class HashCache:
    """sha256 of checkpoint files, each hashed once: a file as it was when hashed (at its write, or at an earlier
    verification; fingerprint.trusted) costs a stat; any other is hashed again. `doctor --deep` hashes everything."""

    def __init__(self, root: Path):
        self.root, self.dirty = root, False
        try:
            self.entries = json.loads((root / HASHES).read_text(encoding="utf-8"))
            assert isinstance(self.entries, dict)
        except (OSError, ValueError, AssertionError):
            self.entries = {}  # none yet, or unreadable: hash everything again

    def sha256(self, path: Path) -> str:
        st, key = path.stat(), _key(self.root, path)
        known = trusted(self.entries.get(key), st)
        if known is not None:
            return known
        digest = fingerprint(path)
        self.record(key, st, digest)
        return digest

    def record(self, key: str, st: os.stat_result, digest: str) -> None:
        self.entries[key] = hash_entry(st, digest)
        self.dirty = True

    def save(self) -> None:
        """Write the entries of checkpoints that still exist (atomically; a lost write only costs a re-hash)."""
        if not self.dirty or not self.root.is_dir():
            return
        live = {p.name for p in self.root.iterdir()}
        entries = {k: v for k, v in self.entries.items() if k.split("/")[0] in live}
        tmp = self.root / f".{HASHES}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(entries), encoding="utf-8")
        os.replace(tmp, self.root / HASHES)
        self.dirty = False


def _key(root: Path, path: Path) -> str:
    """A file's hash-cache key: its path below checkpoints/ (files of DCP folders share names across folders)."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return f"{path.parent.name}/{path.name}"


def _seal(tmp: Path, manifest: mf.Manifest, hashes: HashCache, final_name: str) -> None:
    """Hash every file once (recorded under its final folder name), write the manifest, flush it all to disk.
    A sharded checkpoint's files (every rank's shards, DCP's .metadata) are hashed here too, by rank 0."""
    files = {}
    for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        name = path.relative_to(tmp).as_posix()
        files[name] = fingerprint(path)
        hashes.record(f"{final_name}/{name}", path.stat(), files[name])
    manifest.files = files
    with open(tmp / mf.MANIFEST, "w", encoding="utf-8") as f:
        json.dump(manifest.to_json(), f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(tmp)


def seal_copy(tmp: Path, manifest: mf.Manifest) -> None:
    """Finish a copied checkpoint: its files (bytes unchanged, so their hashes too) flushed, its manifest written."""
    for path in (p for p in tmp.rglob("*") if p.is_file()):
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    with open(tmp / mf.MANIFEST, "w", encoding="utf-8") as f:
        json.dump(manifest.to_json(), f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(tmp)


def temporary(run_dir: Path, step: int) -> Path:
    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    return root / f".tmp-{folder_name(step)}-{os.getpid()}"


def write(run_dir: Path, step: int, save: Callable[[Path], None], content: mf.Manifest, keep: int,
          job_ends: int, prune_weights: bool = False, shards: Path | None = None) -> Checkpoint:
    """Write a checkpoint atomically; on any failure the previous checkpoints stay as they were. Then retention
    (`prune`) runs with keep, job_ends and prune_weights (training.prune_version_weights).

    `shards`: the temporary folder every rank already wrote its shards into (write_sharded); `save` adds rank 0's
    files, and the folder is sealed as any other."""
    root = checkpoints_dir(run_dir)
    final = root / folder_name(step)
    tmp = shards or temporary(run_dir, step)
    hashes = HashCache(root)
    try:
        if shards is None:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            fill_disk("checkpoint", step)
        save(tmp)
        failpoint("checkpoint-write", step)
        _seal(tmp, content, hashes, final.name)
        data = mf.verify(tmp, _hashed_by(hashes, final.name, tmp))  # the manifest and every file are there
        if final.exists():
            raise CheckpointError(f"{final} already exists; checkpoint numbers must strictly increase")
        os.rename(tmp, final)
        fsync_dir(root)
        failpoint("checkpoint-renamed", step)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            raise disk_full(run_dir, final.name) from e
        raise
    except ValueError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"checkpoint {final.name} failed verification right after writing: {e}") from e
    point_latest(run_dir, final.name)
    prune(run_dir, keep, job_ends, prune_weights)
    hashes.save()
    return Checkpoint(final, step, data)


def disk_full(run_dir: Path, name: str) -> CheckpointError:
    need, root = estimate_size(run_dir), checkpoints_dir(run_dir)
    return CheckpointError(
        f"disk full while writing checkpoint {name}: it needs about {need / 1e6:.1f} MB, "
        f"{shutil.disk_usage(root).free / 1e6:.1f} MB are free; the previous checkpoint is intact. "
        "Free some space: a running daemon goes on by itself once there is room")


def no_space(e: BaseException) -> bool:
    """An ENOSPC, itself or inside the CheckpointException DCP raises with every rank's failure."""
    if isinstance(e, OSError):
        return e.errno == errno.ENOSPC
    failures = getattr(e, "failures", None)
    return isinstance(failures, dict) and any(no_space(f) for f in failures.values() if isinstance(f, BaseException))


def _hashed_by(hashes: HashCache, final_name: str, tmp: Path):
    """The hash _seal just took of a file of the temporary folder (read once; it is still in the page cache)."""
    def sha256(path: Path) -> str:
        entry = hashes.entries.get(f"{final_name}/{path.relative_to(tmp).as_posix()}")
        return entry[2] if entry else fingerprint(path)

    return sha256


def point_latest(run_dir: Path, name: str) -> None:
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


def estimate_version_size(run_dir: Path | None, prune_weights: bool = False) -> int:
    """Bytes a version keeps for good once retention prunes it: the newest checkpoint without its optimizer
    state (a LoRA adapter is small; a full fine-tune's weights are not), or its manifest alone when
    prune_weights and the run is a full fine-tune."""
    found = numbered(run_dir) if run_dir else []
    if not found:
        return 1 << 20
    try:
        data = mf.read(found[-1])
    except ValueError:
        return estimate_size(run_dir)
    kept = [n for n in data.files if n not in _pruned_files(data, prune_weights)[0]] + [mf.MANIFEST]
    return sum((found[-1] / n).stat().st_size for n in kept if (found[-1] / n).is_file())


def space_needed(run_dir: Path | None, keep: int, job_ends: int, reserve_bytes: int,
                 prune_weights: bool = False) -> int:
    """Free bytes a job needs: retention holds at most `keep` + `job_ends` whole checkpoints, plus the one being
    written; what the run holds already is on disk. The job's end is one more version, whose weights are kept
    for good (estimate_version_size; prune_weights=False counts a full fine-tune's weights, the safe side).
    Plus a reserve."""
    per = estimate_size(run_dir) if run_dir else 1 << 20
    held = sum(1 for p in numbered(run_dir) if not _was_pruned(p)) if run_dir else 0
    return per * max(1, keep + job_ends + 1 - held) + estimate_version_size(run_dir, prune_weights) + reserve_bytes


def _was_pruned(path: Path) -> bool:
    try:
        return bool(mf.read(path).pruned)
    except ValueError:
        return False


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


def newest_verified(run_dir: Path, save: bool = True) -> tuple[Checkpoint | None, list[Problem]]:
    """The newest checkpoint whose manifest and hashes check out, and the problems of every newer one.

    save=False writes nothing (not even the hash cache): for a run that may be left as it is."""
    problems: list[Problem] = [Problem(p, "not a conveyor checkpoint folder (no step-N name); never resumed")
                               for p in foreign(run_dir)]
    hashes = HashCache(checkpoints_dir(run_dir))
    try:
        return _newest(run_dir, hashes, problems), problems
    finally:
        if save:
            hashes.save()


def _newest(run_dir: Path, hashes: HashCache, problems: list[Problem]) -> Checkpoint | None:
    for path in reversed(numbered(run_dir)):
        try:
            data = mf.verify(path, hashes.sha256)
        except ValueError as e:
            problems.append(Problem(path, str(e)))
            continue
        if data.weights_pruned:  # a version retention left its manifest only: no checkpoint, and not unusable
            continue
        if data.global_step != step_of(path):
            problems.append(Problem(path, f"folder says step {step_of(path)}, manifest says {data.global_step}"))
            continue
        return Checkpoint(path, data.global_step, data)
    return None


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


def _pinned(run_dir: Path) -> set[int]:
    try:
        return {int(s) for s in json.loads((checkpoints_dir(run_dir) / PINS).read_text(encoding="utf-8"))}
    except FileNotFoundError:
        return set()
    except (OSError, ValueError, TypeError):  # unreadable: keep every job end rather than guess
        return {s for p in numbered(run_dir) if (s := step_of(p)) is not None}


def prune(run_dir: Path, keep: int, job_ends: int, prune_weights: bool = False) -> list[Path]:
    """Retention: delete checkpoints beyond the last `keep` that are no version (job end); returns them.

    Kept whole: the last `keep`, the ends of the last `job_ends` finished jobs (at least the newest: the latest
    version), pinned versions and any unreadable one. Every older job end is a version and keeps its weights
    (law 6); `trim` prunes its optimizer state, and with prune_weights a full fine-tune's weights too. So a run
    holds at most keep + job_ends whole checkpoints plus its pins, and one trimmed version per older job end
    (space_needed counts on that)."""
    found = numbered(run_dir)
    whole = set(found[-keep:]) | {p for p in found if step_of(p) in _pinned(run_dir)}
    ends: list[tuple[Path, mf.Manifest]] = []
    for path in found:
        try:
            data = mf.read(path)
        except (ValueError, OSError):
            whole.add(path)  # never delete what we cannot read: a person may want to look at it
            continue
        if data.job_end:
            ends.append((path, data))
    whole |= {p for p, _ in ends[-max(job_ends, 1):]}
    versions = {p for p, _ in ends}
    removed = [p for p in found if p not in whole and p not in versions]
    for path in removed:
        shutil.rmtree(path)
    for path, data in ends:
        if path not in whole:
            trim(path, data, prune_weights)
    return removed


def _pruned_files(data: mf.Manifest, prune_weights: bool) -> tuple[list[str], str]:
    """The files of a job end that retention prunes, and the setting that says so: every file of a full
    fine-tune with prune_weights (only the manifest stays), else the optimizer state: optimizer.pt, or a sharded
    checkpoint's optimizer/ folder (its shards and .metadata; the model's shards are the version's weights).
    Scheduler and RNG states are a few KB: kept. A LoRA adapter is always kept."""
    if prune_weights and data.identity.get("adapter.method") == "full":
        return sorted(data.files), mf.BY_VERSION_WEIGHTS
    return sorted(n for n in data.files if mf.is_optimizer_state(n)), mf.BY_JOB_ENDS


def trim(path: Path, data: mf.Manifest, prune_weights: bool = False) -> list[str]:
    """Prune an older version's files (see _pruned_files) and keep the rest verifiable; returns what went.

    Crash-safe: the manifest is first rewritten without the files and with a record of them (what, by which
    setting, when), then they are deleted. A cut-off trim leaves only files its manifest no longer lists, which
    verify ignores and the next trim of that folder deletes."""
    drop, by = _pruned_files(data, prune_weights)
    if drop:
        data.pruned.append({mf.K_PRUNED_FILES: drop, mf.K_PRUNED_BY: by, mf.K_PRUNED_AT: round(time.time(), 3)})
        data.files = {n: h for n, h in data.files.items() if n not in drop}
        _rewrite_manifest(path, data)
        failpoint("checkpoint-pruned", data.global_step)
    leftovers = [path / n for r in data.pruned for n in r[mf.K_PRUNED_FILES] if (path / n).is_file()]
    leftovers += list(path.glob(f".{mf.MANIFEST}.*.tmp"))  # a rewrite cut off before its rename
    for file in leftovers:
        file.unlink()
    for folder in sorted({f.parent for f in leftovers if f.parent != path}, key=lambda p: -len(p.parts)):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    if leftovers:
        fsync_dir(path)
    return drop


def _rewrite_manifest(folder: Path, data: mf.Manifest) -> None:
    """Replace a checkpoint's manifest atomically (a temporary file in the folder, flushed, renamed)."""
    tmp = folder / f".{mf.MANIFEST}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data.to_json(), f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / mf.MANIFEST)
    fsync_dir(folder)
