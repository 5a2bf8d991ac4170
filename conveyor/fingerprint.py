"""Content identity of a dataset file: a streaming sha256 of its bytes (law 4), and the record of files hashed
before, so that checking a file that did not change costs a stat."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

CHUNK = 1 << 20
HASHES = ".hashes.json"  # in a folder: "relative/path" -> [size, mtime_ns, sha256] of files hashed before


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


def hash_entry(st: os.stat_result, digest: str) -> list:
    """What a hash cache records of a file hashed: its size, modification time, the digest, its change time and
    inode. A later stat that matches all of them trusts the digest (see trusted)."""
    return [st.st_size, st.st_mtime_ns, digest, st.st_ctime_ns, st.st_ino]


def trusted(entry, st: os.stat_result) -> str | None:
    """The recorded digest, if the file is the one hashed and unchanged since: the same size, modification time,
    change time and inode. An edit that sets the modification time back (os.utime, `touch -d`) cannot set the change
    time back, and a file replaced by another is another inode. An entry of an older conveyor (no change time) is
    not trusted: the file is hashed again, once."""
    if isinstance(entry, list) and len(entry) == 5 and entry[:2] == [st.st_size, st.st_mtime_ns] \
            and entry[3:] == [st.st_ctime_ns, st.st_ino]:
        return entry[2]
    return None


class FileHashes:
    """sha256 of the files under a folder, each hashed once: a file as it was when hashed (at its write, or at an
    earlier check; `trusted`) costs a stat; any other is hashed again. `conveyor doctor --deep` hashes everything.

    Kept in <root>/.hashes.json; several processes may use one (the daemon stores files, a worker checks them):
    save() merges, and a lost write only costs a re-hash. The same idea as checkpoints.HashCache, for any folder."""

    def __init__(self, root: Path, name: str | None = HASHES):
        self.root, self.path = root, root / name if name else None  # None: kept in memory only
        self.entries = self._read()
        self.changed: dict[str, list] = {}

    def _read(self) -> dict:
        if self.path is None:
            return {}
        try:
            entries = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}  # none yet, or unreadable: every file is hashed again
        return entries if isinstance(entries, dict) else {}

    def key(self, path: Path) -> str:
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return str(path)

    def sha256(self, path: Path) -> str:
        """The file's sha256; FileNotFoundError (an OSError) if it is gone."""
        st = path.stat()  # before hashing: a change while it is read gives another mtime, so no false trust
        known = trusted(self.entries.get(self.key(path)), st)
        if known is not None:
            return known
        digest = fingerprint(path)
        self.record(path, digest, st)
        return digest

    def record(self, path: Path, digest: str, st: os.stat_result | None = None) -> None:
        """Remember a hash taken of the file as it is now (e.g. while writing it)."""
        st = st or path.stat()
        key = self.key(path)
        self.entries[key] = self.changed[key] = hash_entry(st, digest)

    def save(self) -> None:
        """Write what was hashed here over what is recorded now (another process may have saved meanwhile),
        without the files that are gone; atomically (a temporary file, then a rename). A write that fails (a full
        disk) is dropped: it is a cache, the next check hashes again."""
        if not self.changed or self.path is None or not self.root.is_dir():
            return
        entries = {**self._read(), **self.changed}
        entries = {k: v for k, v in entries.items() if (self.root / k).exists()}
        tmp = self.root / f".{self.path.name}.{os.getpid()}.tmp"
        try:
            tmp.write_text(json.dumps(entries), encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError:
            tmp.unlink(missing_ok=True)
        self.changed = {}


def fsync_dir(path) -> None:
    """Flush a folder's entries (a rename or a new file in it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
