"""The manifest in every checkpoint: names of checkpoint files and manifest keys live here, and nowhere else."""

from __future__ import annotations

import json
from pathlib import Path

from .fingerprint import fingerprint

VERSION = 1

# Checkpoint file names.
MANIFEST = "manifest.json"
OPTIMIZER = "optimizer.pt"
SCHEDULER = "scheduler.pt"
RNG = "rng.pt"
STEP_PREFIX = "step-"
LATEST = "LATEST"  # the run's pointer to its newest verified checkpoint

# Manifest keys.
K_VERSION = "version"
K_RUN = "run_id"
K_STEP = "global_step"
K_JOB = "job"
K_IDENTITY = "identity"
K_HPARAMS = "hyperparameters"
K_LIBRARIES = "libraries"
K_FILES = "files"
K_JOB_END = "job_end"  # true when this checkpoint closes its job

# Keys inside K_JOB.
J_ID = "id"
J_FINGERPRINT = "fingerprint"
J_EPOCH = "epoch"
J_EPOCH_POSITION = "position_in_epoch"
J_POSITION = "position"  # examples of the job consumed so far, epochs laid end to end
J_STEPS_DONE = "steps_done"
J_PLANNED = "planned_steps"
J_START_STEP = "start_step"



def read(folder: Path) -> dict:
    """Parse a checkpoint's manifest; ValueError says why it cannot be used."""
    path = folder / MANIFEST
    if not path.exists():
        raise ValueError("no manifest.json (not written by conveyor, or the write was cut off)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"manifest.json is unreadable ({e})") from None
    if not isinstance(data, dict):
        raise ValueError("manifest.json is not a JSON object")
    return upgrade(data)


def upgrade(data: dict) -> dict:
    """Bring an older manifest to VERSION, or refuse one this conveyor does not know."""
    version = data.get(K_VERSION)
    if version != VERSION:
        raise ValueError(f"manifest version {version!r} is not supported (this conveyor reads version {VERSION})")
    missing = [k for k in (K_RUN, K_STEP, K_JOB, K_IDENTITY, K_FILES) if k not in data]
    if missing:
        raise ValueError(f"manifest.json lacks {', '.join(missing)}")
    return data


def verify(folder: Path) -> dict:
    """The manifest of a checkpoint whose every file matches its sha256; ValueError names the first problem."""
    data = read(folder)
    for name, expected in data[K_FILES].items():
        path = folder / name
        if not path.exists():
            raise ValueError(f"{name} is missing")
        if fingerprint(path) != expected:
            raise ValueError(f"{name} does not match its sha256 in the manifest (changed or truncated)")
    return data
