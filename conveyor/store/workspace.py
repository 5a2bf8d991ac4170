"""A workspace folder: its layout, the state database and the settings, in one place."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from ..config import CONFIG_FILE, Config, load_config, render_config
from ..data.models import model_path
from ..errors import WorkspaceError
from . import database
from .consistency import open_checked


@dataclass
class Workspace:
    root: Path

    @property
    def config_path(self) -> Path:
        return self.root / CONFIG_FILE

    inbox = property(lambda self: self.root / "inbox")
    data = property(lambda self: self.root / "data")  # content-addressed copies of every enqueued file
    rejected = property(lambda self: self.root / "rejected")
    runs = property(lambda self: self.root / "runs")
    models = property(lambda self: self.root / "models")
    logs = property(lambda self: self.root / "logs")

    @classmethod
    def open(cls, root: Path) -> "Workspace":
        root = Path(root).resolve()
        if not (root / CONFIG_FILE).exists():
            raise WorkspaceError(
                f"{root} is not a conveyor workspace (no {CONFIG_FILE}); "
                "run `conveyor init` there or pass --workspace/-w"
            )
        return cls(root)

    @classmethod
    def create(cls, root: Path, config: Config) -> "Workspace":
        root = Path(root).resolve()
        if (root / CONFIG_FILE).exists():
            raise WorkspaceError(f"{root} already has {CONFIG_FILE}; edit it, or pick another folder")
        root.mkdir(parents=True, exist_ok=True)
        (root / CONFIG_FILE).write_text(render_config(config), encoding="utf-8")
        ws = cls(root)
        for folder in (ws.inbox, ws.data, ws.rejected, ws.runs, ws.logs):
            folder.mkdir(exist_ok=True)
        return ws

    def config(self) -> Config:
        return load_config(self.config_path)

    @cached_property
    def db(self):
        """The state database, checked on open: faults.DatabaseDamaged names the file, what is wrong and the fix
        when it is damaged, missing while runs/ holds checkpoints, or does not match the runs on disk (consistency.py)."""
        database.attach_log_file(self.logs)
        return open_checked(self)

    def model_path(self, name: str) -> str:
        """Where the base model's files are: a built-in model (tiny, small) is made in the workspace on first use."""
        return model_path(self.models, name)

    def run_dir(self, run_id: str) -> Path:
        return self.runs / run_id

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free
