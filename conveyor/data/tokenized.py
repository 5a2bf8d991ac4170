"""Tokenized jobs on disk: every example's token ids and trainable mask in flat binary arrays, memory-mapped, so a
worker's memory does not grow with the file and the resume skip stays O(1) (item i is two array slices).

One folder per (content fingerprint, tokenizer and chat template, max_length) under data/tokenized/:
ids.bin (uint16 or uint32 token ids, end to end), mask.bin (uint8: 1 where the token carries loss), index.bin
(int64 rows of offset, length, file line, rejected length, feedback label; a pair's rejected answer follows its
chosen one in ids.bin) and meta.json (counts, truncated and excluded lines, and the size and
sha256 of each array as written). It is derived data: written into a temporary folder and renamed, rebuilt when
missing, unreadable or when an array no longer matches its hash (law 4: never trained), and only numbers are
loaded from the workspace (no pickle: nothing in data/ can execute code). The arrays are checked at every load
against a record of files hashed before (fingerprint.FileHashes): a stat when nothing changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..errors import DataError
from ..fingerprint import FileHashes, fingerprint
from ..testhooks import fill_disk
from .chat import ChatError
from .formats import (
    IGNORE,
    Example,
    Tokenized,
    TokenizedFile,
    describe_template_problems,
    stream_examples,
    tokenize_example,
    trainable,
)

VERSION = 5  # 5: pairs and feedback labels; 4: meta.json records each array's size and sha256 (3: memory-mapped
# arrays; 2: a pickle)
NO_LABEL = -1  # index column 4 of an example without a feedback label
META = "meta.json"
ARRAYS = ("ids.bin", "mask.bin", "index.bin")
TRUNCATED_KEPT = 100  # truncated lines named (all are counted)
MAX_PROBLEMS = 1000  # template problems collected before giving up on a file (the report shows the first few)


class TokenizedArrays:
    """A read-only sequence of Tokenized examples backed by memory-mapped arrays."""

    def __init__(self, folder: Path, meta: dict):
        n, tokens = meta["examples"], meta["tokens"]
        self.index = _map(folder / "index.bin", np.int64, (n, 5))
        self.ids = _map(folder / "ids.bin", np.dtype(meta["dtype"]), (tokens,))
        self.mask = _map(folder / "mask.bin", np.uint8, (tokens,))

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        offset, length, line, rejected, label = (int(v) for v in self.index[i])
        example = Tokenized(line, *self._sequence(offset, length), label=None if label == NO_LABEL else bool(label))
        if rejected:
            example.rejected_ids, example.rejected_labels = self._sequence(offset + length, rejected)
        return example

    def _sequence(self, offset: int, length: int) -> tuple[list[int], list[int]]:
        ids = self.ids[offset:offset + length].astype(np.int64)
        return ids.tolist(), np.where(self.mask[offset:offset + length] == 1, ids, IGNORE).tolist()

    def __iter__(self) -> Iterator[Tokenized]:
        return (self[i] for i in range(len(self)))

    def tokens_of(self, lines: list[int]) -> int:
        """Tokens of the examples at these file lines (each counted as often as it is named)."""
        at = np.searchsorted(self.index[:, 2], np.asarray(lines, dtype=np.int64))  # lines ascend in the index
        return int(self.index[at, 1].sum() + self.index[at, 3].sum())


def _map(path: Path, dtype, shape: tuple) -> np.ndarray:
    if 0 in shape:  # numpy cannot map an empty file
        return np.zeros(shape, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=shape)


def tokens_of(data: TokenizedFile, lines: list[int]) -> int:
    """Tokens of the examples at these file lines, for in-memory and memory-mapped data alike."""
    if isinstance(data.examples, TokenizedArrays):
        return data.examples.tokens_of(lines)
    length = {e.line: e.tokens for e in data.examples}
    return sum(length[line] for line in lines)


def tokenize_cached(path: Path, name: str, tokenizer, max_length: int, cache_dir: Path, key: str,
                    hashes: FileHashes | None = None, warn: Callable[[str], None] | None = None) -> TokenizedFile:
    """The file's examples tokenized and masked as training sees them, remembered in cache_dir under `key`
    (content fingerprint, tokenizer and chat template) and max_length. Streams the file: memory stays flat.

    Arrays that no longer match their hashes are removed (they are derived) and rebuilt from `path`, which the
    caller has verified, with a `warn`ing naming the file. `hashes` trusts arrays hashed before (unchanged size and
    mtime) and records those it hashes or writes; without it, arrays found in the cache are hashed."""
    folder = cache_dir / hashlib.sha256(f"{VERSION}:{key}:{max_length}".encode()).hexdigest()[:32]
    hashes = hashes if hashes is not None else FileHashes(cache_dir, name=None)  # in memory only
    loaded, problem = _load(folder, hashes)
    if loaded is not None:
        return loaded
    if problem and warn:
        warn(f"{_shown(folder)}/{problem}; these tokenized arrays are derived data: never trained as they are, "
             f"rebuilt from the stored copy {path.name}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".tmp-{folder.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        fill_disk("tokenized", 0)
        meta = _write(tmp, stream_examples(path, name), tokenizer, max_length, name)
        meta["key"], meta["max_length"] = key, max_length
        (tmp / META).write_text(json.dumps(meta), encoding="utf-8")
        # Absent or damaged: ours goes in (if another process built it meanwhile, theirs is as good).
        if _load(folder, hashes)[0] is None:
            shutil.rmtree(folder, ignore_errors=True)
            os.rename(tmp, folder)
            for array in ARRAYS:  # hashed as written: the load below (and the next ones) is a stat
                hashes.record(folder / array, meta["files"][array][1])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    loaded, problem = _load(folder, hashes)
    if loaded is None:
        raise OSError(f"the tokenized data in {folder} could not be read right after writing it ({problem})")
    return loaded


def prune(cache_dir: Path, needed: set[str]) -> list[Path]:
    """Remove tokenized data no job needs any more: entries whose content fingerprint is not in `needed` (the
    jobs still to train), unreadable entries, and caches of earlier versions. Only derived data is removed."""
    if not cache_dir.is_dir():
        return []
    removed = []
    for entry in cache_dir.iterdir():
        if entry.name.startswith("."):
            continue  # a write under way in another process (.tmp-*)
        try:
            meta = json.loads((entry / META).read_text(encoding="utf-8"))
            content = meta["key"].split(":")[0] if meta["version"] == VERSION else None
        except (OSError, ValueError, KeyError, AttributeError, TypeError):
            content = None  # a v2 pickle, or damaged
        if content not in needed:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
            removed.append(entry)
    return removed


def problem(folder: Path, hashes: FileHashes | None = None) -> str | None:
    """What is wrong with a tokenized folder of this version (meta.json, or an array against its size and sha256),
    or None; `hashes` trusts arrays hashed before, without it every array is hashed."""
    try:
        current = json.loads((folder / META).read_text(encoding="utf-8")).get("version") == VERSION
    except (OSError, ValueError, AttributeError):
        current = True  # unreadable: _load says how
    return _load(folder, hashes)[1] if current else None  # an earlier version's is never read (prune removes it)


def _load(folder: Path, hashes: FileHashes | None) -> tuple[TokenizedFile | None, str | None]:
    """The folder's examples if its arrays match the sizes and hashes in its meta.json; else None and what is wrong
    (None too when the folder does not exist: it was never built)."""
    try:
        meta = json.loads((folder / META).read_text(encoding="utf-8"))
        problem = _unverified(folder, meta, hashes)
        if problem:
            return None, problem
        arrays = TokenizedArrays(folder, meta)
    except FileNotFoundError:
        return None, f"{META} is missing" if folder.exists() else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return None, f"{META} is unreadable ({type(e).__name__}: {e})"
    data = TokenizedFile(arrays, meta["truncated_lines"], meta["excluded_lines"], meta["tokens"], meta["truncated"])
    return data, None


def _unverified(folder: Path, meta: dict, hashes: FileHashes | None) -> str | None:
    """What is wrong with the arrays, or None if each has the size and sha256 recorded when it was written."""
    for array in ARRAYS:
        size, expected = meta["files"][array]
        path = folder / array
        try:
            found = path.stat().st_size
            if found != size:
                return f"{array} has {found} bytes instead of {size}"
            digest = hashes.sha256(path) if hashes is not None else fingerprint(path)
        except FileNotFoundError:
            return f"{array} is missing"
        if digest != expected:
            return f"{array} no longer matches its sha256 (changed: {digest[:12]} instead of {expected[:12]})"
    return None


def _shown(folder: Path) -> str:
    """data/tokenized/<folder>: the path a person finds in the workspace."""
    return "/".join(folder.parts[-3:])


def _write(folder: Path, examples: Iterator[tuple[Example, str]], tokenizer, max_length: int, name: str) -> dict:
    """Tokenize every example into the arrays; raise DataError naming the template problems, if any."""
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.uint32
    meta = {"version": VERSION, "dtype": np.dtype(dtype).name, "examples": 0, "tokens": 0, "truncated": 0,
            "truncated_lines": [], "excluded_lines": []}
    problems: list[tuple[int, ChatError]] = []
    with _Hashed(folder / "ids.bin") as ids, _Hashed(folder / "mask.bin") as mask, \
            _Hashed(folder / "index.bin") as index:
        for example, fmt in examples:
            try:
                t = tokenize_example(tokenizer, example, fmt, max_length)
            except ChatError as e:
                problems.append((example.line, e))
                if len(problems) >= MAX_PROBLEMS:
                    break
                continue
            if t.truncated:  # counted; the first lines kept to name them (all of a file may be truncated)
                meta["truncated"] += 1
                if len(meta["truncated_lines"]) < TRUNCATED_KEPT:
                    meta["truncated_lines"].append(example.line)
            if not trainable(t):
                meta["excluded_lines"].append(example.line)
                continue
            for seq, labels in ((t.input_ids, t.labels), (t.rejected_ids or [], t.rejected_labels or [])):
                ids.write(np.asarray(seq, dtype=dtype).tobytes())
                mask.write(np.asarray([label != IGNORE for label in labels], dtype=np.uint8).tobytes())
            index.write(np.asarray([meta["tokens"], len(t.input_ids), example.line, len(t.rejected_ids or ()),
                                    NO_LABEL if t.label is None else int(t.label)], dtype=np.int64).tobytes())
            meta["examples"] += 1
            meta["tokens"] += t.tokens
    if problems:
        raise DataError(describe_template_problems(name, problems))
    meta["files"] = {f.path.name: [f.size, f.digest.hexdigest()] for f in (ids, mask, index)}
    return meta


class _Hashed:
    """A file written once, end to end, hashed as it is written (no second read)."""

    def __init__(self, path: Path):
        self.path, self.size, self.digest = path, 0, hashlib.sha256()

    def __enter__(self) -> "_Hashed":
        self.file = open(self.path, "wb")
        return self

    def write(self, data: bytes) -> None:
        self.file.write(data)
        self.digest.update(data)
        self.size += len(data)

    def __exit__(self, *exc) -> None:
        self.file.close()
