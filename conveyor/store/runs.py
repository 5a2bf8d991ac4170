"""Runs: one model trained continuously. Its identity (base model, tokenizer, adapter, precision, quantization)
decides whether a checkpoint may be resumed (law 5)."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import Config
from .database import transaction

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                    "tokenizer.model", "vocab.json", "merges.txt")
_WEIGHT_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def _hash_files(folder: Path, names) -> str | None:
    digest = hashlib.sha256()
    found = False
    for name in names:
        path = folder / name
        if path.exists():
            found = True
            digest.update(name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16] if found else None


def _weights_hash(folder: Path) -> str | None:
    index = _hash_files(folder, _WEIGHT_INDEX_FILES)
    if index:
        return index
    single = folder / "model.safetensors"
    if single.exists():  # hash the header (names, shapes, offsets) plus the size; cheap for any size
        with open(single, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = f.read(n)
        return hashlib.sha256(header + str(single.stat().st_size).encode()).hexdigest()[:16]
    return None


def tokenizer_hash(model_path: str) -> str | None:
    folder = Path(model_path)
    return _hash_files(folder, _TOKENIZER_FILES) if folder.is_dir() else None


def identity(config: Config, model_path: str) -> dict:
    """The fields a checkpoint must match to be resumed, flattened to dotted keys."""
    folder = Path(model_path)
    local = folder.is_dir()
    ident = {
        "model.name": config.model.name,
        "model.config_hash": _hash_files(folder, ("config.json",)) if local else None,
        "model.weights_hash": _weights_hash(folder) if local else None,
        "model.tokenizer_hash": _hash_files(folder, _TOKENIZER_FILES) if local else None,
        "model.precision": config.model.precision,
        "adapter.method": config.adapter.method,
    }
    if config.model.quantization != "none":
        # The base the adapter was trained on (and means something with) is the quantized one. Absent means
        # "none", so runs started before this key existed keep resuming.
        ident["model.quantization"] = config.model.quantization
    if config.adapter.method == "lora":
        ident.update({
            "adapter.r": config.adapter.r,
            "adapter.alpha": config.adapter.alpha,
            "adapter.dropout": config.adapter.dropout,
            "adapter.target_modules": sorted(config.adapter.target_modules),
            "adapter.bias": config.adapter.bias,
        })
    return ident


def differences(old: dict, new: dict) -> list[str]:
    """Every differing field as `adapter.r: 8 → 16`."""
    keys = sorted(set(old) | set(new))
    return [f"{k}: {_show(old.get(k))} → {_show(new.get(k))}" for k in keys if old.get(k) != new.get(k)]


def _show(value) -> str:
    return "(none)" if value is None else json.dumps(value) if isinstance(value, (list, dict)) else str(value)


@dataclass
class Run:
    id: str
    identity: dict
    global_step: int
    active: bool
    created_at: float
    note: str | None
    parent_run: str | None = None  # a rollback's run: the run and version it branched from
    parent_version: int | None = None

    @classmethod
    def from_row(cls, row) -> "Run":
        return cls(row["id"], json.loads(row["identity"]), row["global_step"], bool(row["active"]),
                   row["created_at"], row["note"], row["parent_run"], row["parent_version"])

    def to_json(self) -> dict:
        lineage = {"parent_run": self.parent_run, "parent_version": f"v{self.parent_version}"} \
            if self.parent_run else {"parent_run": None, "parent_version": None}
        return {"id": self.id, "global_step": self.global_step, "active": self.active,
                "identity": self.identity, "created_at": self.created_at, "note": self.note, **lineage}


def active(con: sqlite3.Connection) -> Run | None:
    row = con.execute("SELECT * FROM runs WHERE active = 1").fetchone()
    return Run.from_row(row) if row else None


def all_runs(con: sqlite3.Connection) -> list[Run]:
    return [Run.from_row(r) for r in con.execute("SELECT * FROM runs ORDER BY created_at, id")]


def next_id(con: sqlite3.Connection) -> str:
    """run-0001, run-0002, ...: the first number after the runs recorded that neither the database nor a folder in
    the workspace's runs/ holding anything has (a run the database does not know is never trained over)."""
    known = {row[0] for row in con.execute("SELECT id FROM runs")}
    file = con.execute("PRAGMA database_list").fetchone()[2]  # the database file; its folder is the workspace's
    runs_dir = Path(file).parent / "runs" if file else None  # Workspace.runs
    n = len(known) + 1
    while f"run-{n:04d}" in known or (runs_dir and any((runs_dir / f"run-{n:04d}").glob("*"))):
        n += 1
    return f"run-{n:04d}"


def create(con: sqlite3.Connection, ident: dict, note: str | None = None, *, run_id: str | None = None,
           step: int = 0, parent_run: str | None = None, parent_version: int | None = None) -> Run:
    """A new active run, at step 0 (or, a rollback's, at its version's step and naming it); earlier runs stay,
    inactive and untouched. The one writer of run rows besides set_step."""
    with transaction(con):
        run_id = run_id or next_id(con)
        con.execute("UPDATE runs SET active = 0")
        con.execute("INSERT INTO runs (id, created_at, identity, global_step, active, note, parent_run, parent_version)"
                    " VALUES (?, ?, ?, ?, 1, ?, ?, ?)",
                    (run_id, time.time(), json.dumps(ident), step, note, parent_run, parent_version))
        return active(con)


def activate(con: sqlite3.Connection, run_id: str) -> Run:
    """Make an earlier run the active one again (the settings are its identity once more); the others stay."""
    with transaction(con):
        con.execute("UPDATE runs SET active = 0")
        con.execute("UPDATE runs SET active = 1 WHERE id = ?", (run_id,))
        return active(con)


def set_step(con: sqlite3.Connection, run_id: str, step: int) -> None:
    con.execute("UPDATE runs SET global_step = ? WHERE id = ?", (step, run_id))


def ancestry(con: sqlite3.Connection, run_id: str | None) -> list[tuple[str, int | None]]:
    """A run and the runs it branched from, newest first: (run id, the last step of it in the lineage: None for
    the run itself, else the step of the version its child branched from)."""
    out: list[tuple[str, int | None]] = []
    bound = None
    while run_id and all(run_id != seen for seen, _ in out):  # a cycle (a damaged database) ends the walk
        out.append((run_id, bound))
        parent = con.execute("SELECT r.parent_run, v.step FROM runs r LEFT JOIN versions v ON v.id = r.parent_version"
                             " WHERE r.id = ?", (run_id,)).fetchone()
        run_id, bound = (parent["parent_run"], parent["step"]) if parent else (None, None)
    return out
