"""Kept copies of people's files (claimed/, finished/, rejected/, removed/): names that fit the file system and
never overwrite anything, and moves that cannot lose a file (law 6)."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

from ..errors import DataError
from ..fingerprint import copy_hashing

NAME_MAX = 255  # bytes in one file name (ext4, xfs, btrfs, apfs)
REASON = ".reason.txt"  # beside a kept copy: its name must fit too
MAX_EXTENSION = 16  # a longer "extension" is part of the name, shortened with it


def printable(name: str) -> str:
    """A name as valid UTF-8 text: bytes that are not UTF-8 (kept by the OS as surrogates) become `\\xNN`,
    so the database, the log and the terminal can all take it."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def kept_path(folder: Path, job_id: int, name: str) -> Path:
    """A free path in `folder` for a kept copy of job `job_id`'s file: `00012-<name>`, shortened to fit NAME_MAX
    with room for a `.reason.txt` beside it (keeping the extension), then `-2`, `-3`, ... until neither it nor
    its reason file exists. Never an existing file."""
    folder.mkdir(parents=True, exist_ok=True)
    stem, ext = _split_extension(printable(name))
    prefix = f"{job_id:05d}-"
    for n in itertools.count(1):
        tail = f"-{n}" if n > 1 else ""
        room = NAME_MAX - len(REASON) - len(prefix) - len(tail) - len(ext.encode())
        path = folder / f"{prefix}{_cut(stem, room)}{tail}{ext}"
        if not os.path.lexists(path) and not os.path.lexists(folder / (path.name + REASON)):
            return path


def _split_extension(name: str) -> tuple[str, str]:
    dot = name.rfind(".")
    if dot <= 0 or len(name[dot:].encode()) > MAX_EXTENSION:
        return name, ""
    return name[:dot], name[dot:]


def _cut(text: str, limit: int) -> str:
    """At most `limit` UTF-8 bytes of text, never splitting a character."""
    return text.encode()[:limit].decode("utf-8", "ignore")


def _move_new(source: Path, target: Path, fp: str) -> None:
    """Move a file to a path that must not exist yet. A hard link fails rather than overwrite (a rename would
    not); where links are impossible the copy is made exclusively and checked against `fp` before the source goes."""
    try:
        os.link(source, target)
    except FileExistsError:
        raise
    except OSError:  # another file system, or one without hard links
        if copy_hashing(source, target, exclusive=True) != fp:
            target.unlink()
            raise DataError(f"{printable(source.name)} changed while it was being moved; it stays where it is")
    os.unlink(source)
