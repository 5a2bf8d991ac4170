"""The manifest in every checkpoint: names of checkpoint files and manifest keys live here, and nowhere else.

A manifest is the truth about the weights next to it: the run identity, the global step, the position of the
job that trained that step and of every other job of the run that was stopped mid-way (so an interrupted job
resumes from its own position whatever ran in between), and a sha256 of every file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..config import Config
from ..data.plan import Position
from ..fingerprint import fingerprint

VERSION = 2

# Checkpoint file names.
MANIFEST = "manifest.json"
OPTIMIZER = "optimizer.pt"
SCHEDULER = "scheduler.pt"
RNG = "rng.pt"
STEP_PREFIX = "step-"
LATEST = "LATEST"  # the run's pointer to its newest verified checkpoint
# A sharded checkpoint (distributed.strategy = "fsdp"): torch.distributed.checkpoint (DCP) folders, each holding one
# `__<rank>_0.distcp` file per rank that wrote it and DCP's `.metadata`, next to config.json, scheduler and RNG files.
MODEL_SHARDS = "model"
OPTIMIZER_SHARDS = "optimizer"
DCP_METADATA = ".metadata"

# Manifest keys.
K_VERSION = "version"
K_RUN = "run_id"
K_STEP = "global_step"
K_JOB = "job"
K_JOB_END = "job_end"  # true when this checkpoint closes its job
K_OPEN_JOBS = "open_jobs"  # positions of the run's other jobs stopped mid-way, as of this step
K_IDENTITY = "identity"
K_HPARAMS = "hyperparameters"
K_LIBRARIES = "libraries"
K_FILES = "files"
K_BRANCHED = "branched_from"  # a rollback's first checkpoint: {"run", "version", "step"} it was copied from
# A sharded checkpoint's layout: {"format": SHARDED_FORMAT, "strategy", "world_size", "torch"} as written. Absent: the
# weights are ordinary Hugging Face files (save_pretrained) and the optimizer state one torch file (OPTIMIZER).
K_SHARDED = "sharded"
SHARDED_FORMAT = "torch.distributed.checkpoint"
# Files retention deleted from a version (checkpoints.prune): [{"files": [...], "by": <setting>, "at": <unix time>}].
# The manifest is rewritten without them first, then they are deleted: a crash between leaves unlisted files only.
K_PRUNED = "pruned"
K_PRUNED_FILES = "files"
K_PRUNED_BY = "by"
K_PRUNED_AT = "at"

# The settings that let retention prune a version (recorded as K_PRUNED_BY, named in every message about it).
BY_JOB_ENDS = "training.keep_job_ends"  # the optimizer state of job ends beyond the last N
BY_VERSION_WEIGHTS = "training.prune_version_weights"  # a full fine-tune's weights too (only the manifest stays)


@dataclass
class Manifest:
    run_id: str
    global_step: int
    job: Position
    job_end: bool
    identity: dict
    open_jobs: list[Position] = field(default_factory=list)
    hyperparameters: dict = field(default_factory=dict)
    libraries: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)
    branched_from: dict | None = None
    pruned: list[dict] = field(default_factory=list)
    sharded: dict | None = None  # K_SHARDED

    def position_of(self, job_id: int) -> Position | None:
        """The job's position at this step if it is under way (mid-job here, or stopped mid-way earlier)."""
        if self.job.job_id == job_id:
            return None if self.job_end else self.job
        return next((p for p in self.open_jobs if p.job_id == job_id), None)

    def under_way(self) -> list[Position]:
        """Every job of the run that has trained some but not all of its steps, as of this step."""
        return ([] if self.job_end else [self.job]) + list(self.open_jobs)

    def pruned_by(self, name: str) -> str | None:
        """The setting under which retention deleted file `name` of this checkpoint (None: not pruned)."""
        return next((r[K_PRUNED_BY] for r in self.pruned if name in r[K_PRUNED_FILES]), None)

    @property
    def weights_pruned(self) -> str | None:
        """The setting under which retention deleted this version's weights (None: they are kept)."""
        return next((r[K_PRUNED_BY] for r in self.pruned if r[K_PRUNED_BY] == BY_VERSION_WEIGHTS), None)

    @property
    def optimizer_pruned(self) -> str | None:
        """The setting under which retention deleted the optimizer state (None: kept; a resume carries it on)."""
        return next((r[K_PRUNED_BY] for r in self.pruned if any(map(is_optimizer_state, r[K_PRUNED_FILES]))), None)

    @property
    def has_optimizer(self) -> bool:
        """Whether the optimizer state is among the files (whole, or DCP's shards with their .metadata)."""
        return (OPTIMIZER in self.files if self.sharded is None
                else f"{OPTIMIZER_SHARDS}/{DCP_METADATA}" in self.files)

    def to_json(self) -> dict:
        return {K_VERSION: VERSION, K_RUN: self.run_id, K_STEP: self.global_step, K_JOB: self.job.to_json(),
                K_JOB_END: self.job_end, K_OPEN_JOBS: [p.to_json() for p in self.open_jobs],
                K_IDENTITY: self.identity, K_HPARAMS: self.hyperparameters, K_LIBRARIES: self.libraries,
                K_FILES: self.files, **({K_BRANCHED: self.branched_from} if self.branched_from else {}),
                **({K_PRUNED: self.pruned} if self.pruned else {}),
                **({K_SHARDED: self.sharded} if self.sharded else {})}

    @classmethod
    def from_json(cls, data: dict) -> "Manifest":
        data = upgrade(data)
        try:
            return cls(run_id=data[K_RUN], global_step=data[K_STEP], job=Position.from_json(data[K_JOB]),
                       job_end=bool(data[K_JOB_END]), identity=data[K_IDENTITY],
                       open_jobs=[Position.from_json(p) for p in data[K_OPEN_JOBS]],
                       hyperparameters=data.get(K_HPARAMS, {}), libraries=data.get(K_LIBRARIES, {}),
                       files=data[K_FILES], branched_from=data.get(K_BRANCHED),
                       pruned=[_pruned_record(r) for r in data.get(K_PRUNED, [])],
                       sharded=_sharded_record(data.get(K_SHARDED)))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"manifest.json is malformed ({type(e).__name__}: {e})") from None


def _pruned_record(record: dict) -> dict:
    if not isinstance(record, dict) or not isinstance(record[K_PRUNED_FILES], list) \
            or not isinstance(record[K_PRUNED_BY], str):
        raise TypeError(f"{K_PRUNED} holds {record!r}, not {{{K_PRUNED_FILES!r}: [...], {K_PRUNED_BY!r}: setting}}")
    return record


def _sharded_record(record) -> dict | None:
    if record is None:
        return None
    if not isinstance(record, dict) or record.get("format") != SHARDED_FORMAT:
        raise TypeError(f"{K_SHARDED} holds {record!r}; this conveyor reads sharded checkpoints in the "
                        f"{SHARDED_FORMAT!r} format only")
    return record


def is_optimizer_state(name: str) -> bool:
    """Whether a checkpoint file is optimizer state: the whole file, or a shard or the metadata of its DCP folder."""
    return name == OPTIMIZER or name.startswith(f"{OPTIMIZER_SHARDS}/")


def upgrade(data: dict) -> dict:
    """Bring an older manifest to VERSION, or refuse one this conveyor does not know."""
    version = data.get(K_VERSION)
    if version not in (1, VERSION):
        raise ValueError(f"manifest version {version!r} is not supported (this conveyor reads 1 and {VERSION})")
    missing = [k for k in (K_RUN, K_STEP, K_JOB, K_IDENTITY, K_FILES) if k not in data]
    if missing:
        raise ValueError(f"manifest.json lacks {', '.join(missing)}")
    if version == 1:  # v1: one segment per job, no open jobs; example counts were not recorded (0: unknown)
        job = data[K_JOB]
        data = {**data, K_VERSION: VERSION, K_OPEN_JOBS: [], K_JOB_END: data.get(K_JOB_END, False),
                K_JOB: {**job, "examples": 0, "epochs": 0, "segment_start": job["start_step"], "segment_base": 0}}
    return data


def read(folder: Path) -> Manifest:
    """Parse a checkpoint's manifest; ValueError says why it cannot be used."""
    path = folder / MANIFEST
    if not path.exists():
        raise ValueError("no manifest.json (not written by conveyor, or the write was cut off)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"manifest.json is unreadable ({e})") from None
    if not isinstance(data, dict):
        raise ValueError("manifest.json is not a JSON object")
    return Manifest.from_json(data)


def verify(folder: Path, sha256=fingerprint) -> Manifest:
    """The manifest of a checkpoint whose every file matches its sha256; ValueError names the first problem.
    `sha256` hashes a file (checkpoints.HashCache.sha256 trusts files it hashed before and that did not change)."""
    manifest = read(folder)
    for name, expected in manifest.files.items():
        path = folder / name
        if not path.exists():
            raise ValueError(f"{name} is missing")
        if sha256(path) != expected:
            raise ValueError(f"{name} does not match its sha256 in the manifest (changed or truncated)")
    return manifest


def hyperparameters(config: Config, world_size: int) -> dict:
    """Settings outside the run identity, recorded in every manifest; a change is applied to the same run."""
    t = config.training
    return {"batch_size": t.batch_size, "grad_accum": t.grad_accum, "world_size": world_size,
            "learning_rate": t.learning_rate, "schedule": t.schedule, "warmup_steps": t.warmup_steps,
            "weight_decay": t.weight_decay, "max_grad_norm": t.max_grad_norm, "seed": t.seed,
            "max_length": t.max_length, "epochs": t.epochs, "mixed_precision": t.mixed_precision,
            "gradient_checkpointing": t.gradient_checkpointing, "optimizer": t.optimizer,
            "deterministic": t.deterministic, "packing": t.packing,
            # How attention is computed, not what the weights mean: not identity (model.attn_implementation).
            "attn_implementation": config.model.attn_implementation,
            # How the weights are held across processes (ddp: whole on every rank; fsdp: sharded, DCP checkpoints).
            "strategy": config.distributed.strategy}
