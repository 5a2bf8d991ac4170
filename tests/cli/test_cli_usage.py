"""Usage errors, `--version`, `-w` placement and machine faults, through the installed `conveyor` command (the console
script, as a person runs it): one message, the right exit code, never a traceback. No training: each call is fast."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import conveyor


def _command() -> list[str]:
    found = shutil.which("conveyor") or shutil.which("conveyor", path=os.path.dirname(sys.executable))
    assert found, "the `conveyor` console script is not installed beside this Python (pip install -e .)"
    return [found]


def conveyor_(*args, cwd: Path | None = None) -> subprocess.CompletedProcess:
    p = subprocess.run([*_command(), *map(str, args)], capture_output=True, text=True, timeout=120, cwd=cwd)
    assert "Traceback" not in p.stdout + p.stderr, p.stdout + p.stderr
    return p


@pytest.fixture
def ws(tmp_path) -> Path:
    assert conveyor_("init", tmp_path / "ws").returncode == 0
    return tmp_path / "ws"


@pytest.mark.parametrize("args, names", [
    (["statsu"], "statsu"),
    (["--bogus"], "--bogus"),
    (["status", "--bogus"], "--bogus"),
    (["add"], "files"),
    (["queue", "move"], "job"),
    (["add", "--epochs", "0", "x.jsonl"], "--epochs"),
    (["add", "--epochs", "-1", "x.jsonl"], "--epochs"),
    (["add", "--epochs", "2.5", "x.jsonl"], "--epochs"),
    (["train", "--epochs", "0", "x.jsonl"], "--epochs"),
    (["status", "-w"], "-w"),
    (["-w"], "-w"),
])
def test_usage_error_is_one_message_and_the_help_hint(tmp_path, args, names):
    p = conveyor_(*args, cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    assert names in p.stderr and "--help" in p.stderr
    assert len(p.stderr.strip().splitlines()) <= 4, p.stderr  # usage line, hint, blank line, error
    assert list(tmp_path.iterdir()) == []  # nothing was made


def test_bare_command_prints_the_help_and_exits_2(tmp_path):
    p = conveyor_(cwd=tmp_path)
    assert p.returncode == 2
    assert "Usage: conveyor" in p.stdout + p.stderr and "status" in p.stdout + p.stderr


def test_version():
    p = conveyor_("--version")
    assert p.returncode == 0
    assert p.stdout.strip() == f"conveyor {conveyor.__version__}"


@pytest.mark.parametrize("args", [
    ["status", "-w", "{ws}"], ["-w", "{ws}", "status"], ["status", "--workspace={ws}"],
    ["status", "--workspace", "{ws}", "--debug"], ["-w", "/nonexistent", "status", "-w", "{ws}"],
    ["queue", "-w", "{ws}", "--json"], ["queue", "--json", "-w", "{ws}"],
])
def test_workspace_before_or_after_the_subcommand(ws, tmp_path, args):
    p = conveyor_(*[a.format(ws=ws) for a in args], cwd=tmp_path)  # cwd is no workspace: -w must be used
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip()


def test_workspace_after_a_queue_subcommand(ws, tmp_path):
    p = conveyor_("queue", "remove", "7", "-w", ws, cwd=tmp_path)
    assert p.returncode == 1
    assert p.stderr.startswith("error:") and "no job 7" in p.stderr  # reached the workspace, not "not a workspace"


def test_a_package_error_is_one_error_line(tmp_path):
    p = conveyor_("-w", tmp_path / "nonexistent", "status")
    assert p.returncode == 1
    assert p.stderr.startswith("error:") and "nonexistent" in p.stderr
    assert p.stdout == ""


def test_debug_shows_the_traceback_of_a_package_error(tmp_path):
    p = subprocess.run([*_command(), "status", "-w", tmp_path / "nonexistent", "--debug"], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 1
    assert "Traceback" in p.stdout + p.stderr and "WorkspaceError" in p.stdout + p.stderr  # --debug after status


@pytest.mark.parametrize("damage", ["garbage in the middle", "not a database"])
def test_a_damaged_database_is_named_without_a_traceback(ws, damage):
    assert conveyor_("-w", ws, "status").returncode == 0
    db = ws / "conveyor.db"
    if damage == "not a database":
        for extra in ws.glob("conveyor.db-*"):
            extra.unlink()
        db.write_text("these are not the bytes of an SQLite database\n" * 100)
    else:
        data = bytearray(db.read_bytes())
        quarter = len(data) // 4
        data[quarter:3 * quarter] = b"\xde\xad\xbe\xef" * (2 * quarter // 4) + b"\0" * (2 * quarter % 4)
        db.write_bytes(bytes(data))
    p = conveyor_("-w", ws, "status")
    assert p.returncode != 0
    assert "conveyor.db" in p.stderr and p.stderr.startswith("error:")
