"""Content identity of a dataset file: a streaming sha256 of its bytes (law 4)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

CHUNK = 1 << 20


def fingerprint(path: Path) -> str:
    """Hex sha256 of the file's bytes, read in 1 MiB chunks so any size fits in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def copy_hashing(source: Path, target: Path, exclusive: bool = False) -> str:
    """Copy source to target in one pass, returning the sha256 of the bytes copied.

    exclusive: fail (FileExistsError) rather than overwrite an existing target."""
    digest = hashlib.sha256()
    with open(source, "rb") as src, open(target, "xb" if exclusive else "wb") as dst:
        while chunk := src.read(CHUNK):
            digest.update(chunk)
            dst.write(chunk)
        dst.flush()
        os.fsync(dst.fileno())
    return digest.hexdigest()


def short(fp: str) -> str:
    """The first 12 hex digits, enough for people to tell datasets apart."""
    return fp[:12]
