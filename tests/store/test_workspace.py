"""workspace.py: a workspace is made and found by its conveyor.toml, its settings are read and checked on every call,
built-in models are made under models/, and its database is opened once per object and checked against runs/."""

from __future__ import annotations

import shutil
import sqlite3
from collections import namedtuple
from pathlib import Path

import pytest
from conftest import run_cli, set_setting, text_file

from conveyor.config import CONFIG_FILE, Config, render_config
from conveyor.errors import ConfigError, ConveyorError, WorkspaceError
from conveyor.faults import DatabaseDamaged, database_message, database_mismatch_message, database_missing_message
from conveyor.store import workspace as workspace_module
from conveyor.store.database import CURRENT_VERSION
from conveyor.store.workspace import Workspace

FOLDERS = ["data", "inbox", "logs", "rejected", "runs"]


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_create_writes_the_settings_and_makes_the_folders(tmp_path):
    """A new workspace (parents made as needed) holds conveyor.toml with every setting, and its folders; no database."""
    config = Config()
    config.training.batch_size = 3
    ws = Workspace.create(tmp_path / "a" / "b", config)
    assert ws == Workspace(tmp_path / "a" / "b") and ws.root.is_absolute()
    assert names(ws.root) == [CONFIG_FILE, *FOLDERS]
    assert ws.config_path.read_text(encoding="utf-8") == render_config(config)
    assert ws.config() == config and ws.config().training.batch_size == 3
    assert (ws.inbox, ws.data, ws.rejected, ws.runs, ws.models, ws.logs) == tuple(
        ws.root / name for name in ("inbox", "data", "rejected", "runs", "models", "logs"))
    assert ws.run_dir("run-0007") == ws.root / "runs" / "run-0007"


def test_create_resolves_a_relative_folder_and_keeps_what_is_already_in_it(tmp_path, monkeypatch):
    """A relative path becomes absolute; a folder with files but no conveyor.toml becomes a workspace, files kept."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "here" / "inbox").mkdir(parents=True)
    (tmp_path / "here" / "inbox" / "a.jsonl").write_text('{"text": "a"}\n')
    ws = Workspace.create(Path("here"), Config())
    assert ws.root == tmp_path.resolve() / "here"
    assert names(ws.root) == [CONFIG_FILE, *FOLDERS] and names(ws.inbox) == ["a.jsonl"]


def test_create_refuses_a_folder_that_is_already_a_workspace(tmp_path):
    """A second create names the file and leaves the settings a person edited as they are."""
    ws = Workspace.create(tmp_path / "ws", Config())
    set_setting(ws.root, "training", "batch_size", "6")
    edited = ws.config_path.read_text()
    with pytest.raises(WorkspaceError) as e:
        Workspace.create(tmp_path / "ws", Config())
    assert str(e.value) == f"{ws.root} already has {CONFIG_FILE}; edit it, or pick another folder"
    assert ws.config_path.read_text() == edited and ws.config().training.batch_size == 6


@pytest.mark.parametrize("made", [False, True])
def test_open_refuses_a_folder_that_is_not_a_workspace(tmp_path, made):
    """A missing folder, or one without conveyor.toml, is named with what to do; nothing is created there."""
    root = tmp_path / "elsewhere"
    if made:
        root.mkdir()
        (root / "conveyor.db").write_bytes(b"")
    with pytest.raises(WorkspaceError) as e:
        Workspace.open(root)
    assert str(e.value) == (f"{root.resolve()} is not a conveyor workspace (no {CONFIG_FILE}); run `conveyor init` "
                            "there or pass --workspace/-w")
    assert names(root) == ["conveyor.db"] if made else not root.exists()


def test_open_finds_a_workspace_by_a_relative_path(tmp_path, monkeypatch):
    """open resolves the folder; the workspace it returns is the one create made."""
    made = Workspace.create(tmp_path / "ws", Config())
    monkeypatch.chdir(tmp_path / "ws" / "inbox")
    assert Workspace.open(Path("..")) == made


def test_settings_are_read_and_checked_at_every_call(tmp_path):
    """An edit shows at the next call; a bad value or an unknown key is named; a missing file says how to make one."""
    ws = Workspace.create(tmp_path / "ws", Config())
    set_setting(ws.root, "training", "batch_size", "7")
    assert ws.config().training.batch_size == 7
    set_setting(ws.root, "training", "batch_size", "0")
    with pytest.raises(ConfigError, match=r"training\.batch_size: Input should be greater than or equal to 1 "
                                          r"\(found 0\)"):
        ws.config()
    ws.config_path.write_text(render_config(Config()).replace("[training]", "[training]\ncolour = 3"))
    with pytest.raises(ConfigError, match=r"training\.colour: unknown key \(value 3\); remove it or check its "
                                          "spelling"):
        ws.config()
    ws.config_path.unlink()
    with pytest.raises(ConfigError) as e:
        ws.config()
    assert str(e.value) == f"{ws.config_path} not found; run `conveyor init` to create a workspace"


def test_the_built_in_tiny_model_is_made_under_models_once(tmp_path, tiny_dir):
    """model_path("tiny") makes models/tiny (the same seeded files as anywhere else) and reuses it after."""
    ws = Workspace.create(tmp_path / "ws", Config())
    path = ws.model_path("tiny")
    assert path == str(ws.models / "tiny")
    assert names(ws.models / "tiny") == names(tiny_dir)
    assert all((ws.models / "tiny" / name).read_bytes() == (tiny_dir / name).read_bytes() for name in names(tiny_dir))
    made = {name: (ws.models / "tiny" / name).stat().st_mtime_ns for name in names(tiny_dir)}
    assert ws.model_path("tiny") == path
    assert {name: (ws.models / "tiny" / name).stat().st_mtime_ns for name in names(tiny_dir)} == made


def test_another_model_name_is_used_as_it_is(tmp_path, monkeypatch):
    """A hub id (where conveyor may download: HF_HUB_OFFLINE=0) or a local model folder is returned unchanged, and
    nothing is made under models/; offline, a hub id that is not cached is refused by name."""
    ws = Workspace.create(tmp_path / "ws", Config())
    local = tmp_path / "my-model"
    local.mkdir()
    (local / "config.json").write_text("{}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert ws.model_path("org/some-model") == "org/some-model"
    assert ws.model_path(str(local)) == str(local)
    assert not ws.models.exists() and names(local) == ["config.json"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConveyorError, match="model.name = 'org/some-model': no such file or folder, nor a model"):
        ws.model_path("org/some-model")


def test_the_database_is_opened_once_per_workspace_object(tmp_path):
    """ws.db is one connection for the object's life (made on first use, with the schema and the log file); another
    object of the same folder opens its own and sees the same rows."""
    ws = Workspace.create(tmp_path / "ws", Config())
    assert not (ws.root / "conveyor.db").exists()
    con = ws.db
    assert ws.db is con and (ws.root / "conveyor.db").exists() and (ws.logs / "conveyor.log").exists()
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"runs", "jobs", "ledger", "versions", "events", "controls", "metrics_rollup"} <= tables
    assert con.execute("PRAGMA user_version").fetchone()[0] == CURRENT_VERSION
    other = Workspace.open(ws.root)
    assert other.db is not con
    con.execute("INSERT INTO events (ts, level, kind, message) VALUES (1, 'info', 'message', 'hello')")
    assert [tuple(r) for r in other.db.execute("SELECT kind, message FROM events")] == [("message", "hello")]
    other.db.close()
    con.close()


def test_a_run_folder_without_checkpoints_is_no_reason_to_refuse_the_database(tmp_path):
    """Folders in runs/ with no checkpoint (an empty run, a person's notes) do not stop a new database."""
    ws = Workspace.create(tmp_path / "ws", Config())
    (ws.runs / "run-0001" / "checkpoints").mkdir(parents=True)
    (ws.runs / "notes").mkdir()
    ws.db.close()
    assert (ws.root / "conveyor.db").exists()


def test_a_file_that_is_not_a_database_is_named_as_damaged(tmp_path):
    """conveyor.db holding anything but SQLite is DatabaseDamaged naming the file, the fault and the fix."""
    ws = Workspace.create(tmp_path / "ws", Config())
    (ws.root / "conveyor.db").write_bytes(b"not sqlite!")
    with pytest.raises(DatabaseDamaged) as e:
        _ = ws.db
    assert str(e.value) == database_message(ws.root / "conveyor.db", "its 11 bytes do not start with an SQLite "
                                                                     "header: not a database, or cut short")
    assert (ws.root / "conveyor.db").read_bytes() == b"not sqlite!"


@pytest.fixture
def trained(workspace, tmp_path) -> Workspace:
    """A workspace whose run-0001 trained a.jsonl in 2 steps (one checkpoint, step 2)."""
    root = workspace()
    assert run_cli(root, "train", text_file(tmp_path / "a.jsonl", 16, "a"), "-q").code == 0
    con = sqlite3.connect(root / "conveyor.db")
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    return Workspace.open(root)


def test_a_missing_database_beside_checkpoints_is_refused_and_not_made_anew(trained):
    """With conveyor.db gone and runs/ holding checkpoints, ws.db raises (every time) and makes no empty database."""
    for suffix in ("", "-wal", "-shm"):
        (trained.root / f"conveyor.db{suffix}").unlink(missing_ok=True)
    expected = database_missing_message(trained.root / "conveyor.db", [
        "runs/run-0001 holds 1 checkpoint(s) (newest step 2) that conveyor.db does not know"])
    for _ in range(2):
        with pytest.raises(DatabaseDamaged) as e:
            _ = trained.db
        assert str(e.value) == expected
    assert not (trained.root / "conveyor.db").exists() and "db" not in trained.__dict__


def test_a_database_that_does_not_know_a_run_folder_is_refused(trained):
    """A run folder with checkpoints the database has no run for is a mismatch, named with the folder."""
    assert [r["id"] for r in trained.db.execute("SELECT id FROM runs")] == ["run-0001"]
    shutil.copytree(trained.run_dir("run-0001"), trained.run_dir("run-0002"))
    with pytest.raises(DatabaseDamaged) as e:
        _ = Workspace.open(trained.root).db
    assert str(e.value) == database_mismatch_message(trained.root / "conveyor.db", [
        "runs/run-0002 holds 1 checkpoint(s) (newest step 2) that conveyor.db does not know"])


def test_free_bytes_is_the_free_space_of_the_workspaces_disk(tmp_path, monkeypatch):
    """free_bytes asks the disk the workspace is on."""
    ws = Workspace.create(tmp_path / "ws", Config())
    asked = []

    def disk_usage(path):
        asked.append(Path(path))
        return namedtuple("usage", "total used free")(1000, 400, 600)

    monkeypatch.setattr(workspace_module.shutil, "disk_usage", disk_usage)
    assert ws.free_bytes() == 600 and asked == [ws.root]
    monkeypatch.undo()
    assert 0 < ws.free_bytes() <= shutil.disk_usage(ws.root).total
