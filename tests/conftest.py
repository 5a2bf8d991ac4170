"""Shared fixtures: a tiny model made once per session, workspaces in tmp_path, and the CLI runner."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from conveyor.config import Config
from conveyor.data.tiny import ensure_tiny
from conveyor.store.workspace import Workspace

ASSETS = Path(__file__).parent / "assets"


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return ensure_tiny(tmp_path_factory.mktemp("tiny") / "tiny")


@dataclass
class Result:
    code: int
    out: str
    err: str


def run_cli(ws: Path | None, *args: str, subprocess_: bool = False, env: dict | None = None) -> Result:
    """Run the real `conveyor` CLI: in-process by default (fast), or as a subprocess (with `env` added to this
    process's environment)."""
    argv = (["-w", str(ws)] if ws else []) + [str(a) for a in args]
    if subprocess_ or env:
        p = subprocess.run([sys.executable, "-m", "conveyor", *argv], capture_output=True, text=True, timeout=600,
                           env={**os.environ, **(env or {})})
        return Result(p.returncode, p.stdout, p.stderr)
    from typer.testing import CliRunner

    from conveyor import cli

    result = CliRunner().invoke(cli.app, argv, catch_exceptions=True)
    err = result.stderr if hasattr(result, "stderr") else ""
    if result.exception and not isinstance(result.exception, SystemExit):
        from conveyor.errors import ConveyorError

        if not isinstance(result.exception, ConveyorError):
            raise result.exception
        return Result(1, result.stdout, err + str(result.exception))
    return Result(result.exit_code, result.stdout, err)


def make_workspace(root: Path, tiny_dir: Path, **sections) -> Path:
    """A workspace with the tiny model copied in and the given settings, e.g. training={"batch_size": 4}.

    Held-out answers are not scored (eval.answers = 0) unless a test sets it: generating them costs more than the
    rest of an evaluation on tiny, and only the tests of answer scoring look at them."""
    config = Config()
    config.eval.answers = 0
    for section, values in sections.items():
        for key, value in values.items():
            setattr(getattr(config, section), key, value)
    ws = Workspace.create(root, config)
    shutil.copytree(tiny_dir, ws.models / "tiny")
    return root


@pytest.fixture
def workspace(tmp_path, tiny_dir):
    def make(name="ws", **sections) -> Path:
        defaults = {"training": {"batch_size": 4, "grad_accum": 2, "learning_rate": 1e-3, "save_every": 2,
                                 "max_length": 64}}
        for section, values in sections.items():
            defaults.setdefault(section, {}).update(values)
        return make_workspace(tmp_path / name, tiny_dir, **defaults)

    return make


def drain_with_requests(ws: Path, requests: str) -> Result:
    """`conveyor run --drain` with control requests arriving at given global steps (e.g. "stop@3")."""
    old = os.environ.get("CONVEYOR_TEST_REQUESTS")
    os.environ["CONVEYOR_TEST_REQUESTS"] = requests
    try:
        return run_cli(ws, "run", "--drain", "-q")
    finally:
        os.environ.pop("CONVEYOR_TEST_REQUESTS")
        if old is not None:
            os.environ["CONVEYOR_TEST_REQUESTS"] = old


def text_file(path: Path, n: int, tag: str = "ex") -> Path:
    """A `text` JSONL file of n distinct short examples; line k is example k (1-based)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(1, n + 1):
            f.write(json.dumps({"text": f"{tag} {i}: the quick brown fox {i * 7 % 13} jumps."}) + "\n")
    return path


def chat_file(path: Path, n: int) -> Path:
    """A `messages` JSONL file of n one-exchange conversations: "q<k>" answered "a<k>" (k from 0)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                                     {"role": "assistant", "content": f"a{i}"}]}) + "\n"
                            for i in range(n)), encoding="utf-8")
    return path


def status(ws: Path) -> dict:
    r = run_cli(ws, "status", "--json")
    assert r.code == 0, r.out + r.err
    return json.loads(r.out)


def audit(ws: Path) -> list[dict]:
    r = run_cli(ws, "history", "--examples", "--json")
    assert r.code == 0, r.out + r.err
    return json.loads(r.out)


def ledger(ws: Path) -> list[dict]:
    r = run_cli(ws, "history", "--json")
    assert r.code == 0, r.out + r.err
    return json.loads(r.out)


def checkpoint_steps(ws: Path, run_id: str) -> list[int]:
    folder = ws / "runs" / run_id / "checkpoints"
    return sorted(int(p.name.split("-")[1]) for p in folder.iterdir() if p.name.startswith("step-"))


def adapter_weights(checkpoint: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(checkpoint / "adapter_model.safetensors"))


def max_abs_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b), (sorted(a), sorted(b))
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def set_setting(ws: Path, section: str, key: str, value: str) -> None:
    """Edit one `key = value` line of a section of the workspace's conveyor.toml, as a person would."""
    path = ws / "conveyor.toml"
    lines = path.read_text().splitlines()
    current = None
    for i, line in enumerate(lines):
        if line.startswith("["):
            current = line.strip("[]")
        elif current == section and line.startswith(f"{key} = "):
            lines[i] = f"{key} = {value}"
    path.write_text("\n".join(lines) + "\n")
