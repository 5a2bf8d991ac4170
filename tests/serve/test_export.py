"""Export builds the model from the run's identity and checkpoint files, whatever conveyor.toml says now."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import run_cli, status, text_file
from conftest import set_setting as _set

from conveyor.errors import ConfigError
from conveyor.store import checkpoints as ck
from conveyor.store.workspace import Workspace


def _train(ws: Path, file: Path) -> None:
    r = run_cli(ws, "train", file, "-q")
    assert r.code == 0, r.out + r.err


def _newest(ws: Path, run_id: str) -> Path:
    found, problems = ck.newest_verified(ws / "runs" / run_id)
    assert found is not None and not problems
    return found.path


def _same_weights(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and bool((sa[key] == sb[key]).all()), key


def test_full_run_exports_after_the_config_switched_to_lora(workspace, tmp_path):
    from transformers import AutoModelForCausalLM

    ws = workspace(adapter={"method": "full"})
    _train(ws, text_file(tmp_path / "a.jsonl", 8, "a"))
    _set(ws, "adapter", "method", '"lora"')
    _set(ws, "adapter", "r", "16")
    _train(ws, text_file(tmp_path / "b.jsonl", 8, "b"))
    assert [r["id"] for r in status(ws)["runs"]] == ["run-0001", "run-0002"]  # the switch started a new run

    out = tmp_path / "full-export"
    r = run_cli(ws, "export", out, "--run", "run-0001")
    assert r.code == 0, r.out + r.err
    assert "exported the model of run-0001 at global step 1 (step-000001)" in r.out
    exported = AutoModelForCausalLM.from_pretrained(out)
    _same_weights(exported, AutoModelForCausalLM.from_pretrained(_newest(ws, "run-0001")))
    record = json.loads((out / "conveyor-export.json").read_text())
    assert (record["run"], record["global_step"], record["merged"]) == ("run-0001", 1, False)
    assert record["identity"]["adapter.method"] == "full" and (out / "tokenizer.json").exists()

    r = run_cli(ws, "export", tmp_path / "full-merge", "--run", "run-0001", "--merge")
    assert r.code == 0, r.out + r.err
    assert "run-0001 is a full fine-tune: its checkpoint is already a full model" in r.err
    assert json.loads((tmp_path / "full-merge" / "conveyor-export.json").read_text())["merged"] is False


def test_lora_run_merges_under_a_full_config_and_exports_under_an_invalid_one(workspace, tmp_path, tiny_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ws = workspace()
    _train(ws, text_file(tmp_path / "a.jsonl", 8, "a"))
    checkpoint = _newest(ws, "run-0001")
    _set(ws, "adapter", "method", '"full"')
    out = tmp_path / "merged"
    r = run_cli(ws, "export", out, "--merge")
    assert r.code == 0, r.out + r.err
    assert "exported the merged model of run-0001" in r.out
    assert not (out / "adapter_config.json").exists()
    expected = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), checkpoint)
    _same_weights(AutoModelForCausalLM.from_pretrained(out), expected.merge_and_unload())

    _set(ws, "adapter", "r", "0")  # invalid: r must be at least 1
    with pytest.raises(ConfigError):
        Workspace.open(ws).config()
    r = run_cli(ws, "export", tmp_path / "adapter")
    assert r.code == 0, r.out + r.err
    assert (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (checkpoint / "adapter_model.safetensors").read_bytes()
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 8


def test_mistakes_are_named_with_what_to_do(workspace, tmp_path, tiny_dir):
    base = tmp_path / "base-model"
    shutil.copytree(tiny_dir, base)
    ws = workspace(model={"name": str(base)})
    _train(ws, text_file(tmp_path / "a.jsonl", 8, "a"))
    out = tmp_path / "out"

    r = run_cli(ws, "export", out, "--run", "run-0009")
    assert r.code == 1 and "--run 'run-0009': no such run; the runs are run-0001" in r.err

    out.mkdir()
    r = run_cli(ws, "export", out)
    assert r.code == 1 and "already exists; pick a new folder" in r.err
    out.rmdir()

    base.rename(tmp_path / "moved-away")
    r = run_cli(ws, "export", out)
    assert r.code == 1 and f"trained on the base model at {base}, which is missing" in r.err
    assert "put the model folder back" in r.err and not out.exists()
    (tmp_path / "moved-away").rename(base)

    for folder in ck.numbered(ws / "runs" / "run-0001"):
        weights = folder / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    r = run_cli(ws, "export", out)
    assert r.code == 1 and "run-0001 has no verified checkpoint to export" in r.err
    assert "does not match its sha256" in r.err and "conveyor doctor" in r.err
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


@pytest.mark.parametrize("command", [["generate", "hi", "--version", "v9"], ["export", "OUT", "--version", "v9"],
                                     ["chat", "--version", "v9"]])
def test_a_refusal_comes_before_torch_is_imported(workspace, tmp_path, command):
    """A wrong version is said at once: torch and transformers (seconds to import) load only for a model."""
    import subprocess
    import sys

    ws = workspace()
    probe = ("import sys\nfrom conveyor.cli import main\nsys.argv = sys.argv[1:]\ntry:\n    main()\n"
             "except SystemExit as e:\n    print('exit', e.code, 'torch' in sys.modules, 'transformers' in sys.modules)")
    args = [str(tmp_path / "out") if a == "OUT" else a for a in command]
    r = subprocess.run([sys.executable, "-c", probe, "conveyor", "-w", str(ws), *args], capture_output=True, text=True,
                       input="", timeout=120)
    assert "no version 'v9'" in r.stderr, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "exit 1 False False", r.stdout + r.stderr
