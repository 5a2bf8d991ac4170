"""The built-in models: `small` (26M parameters, BPE with merges, ChatML with generation marks) is made offline, the
same bytes every time, and trains a chat file exactly on its replies through the real CLI; the GPU benchmark script
keeps working on CPU until a GPU is attached."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli, status

from conveyor.config import Config
from conveyor.data.models import SMALL, ensure_small
from conveyor.store.workspace import Workspace

ROOT = Path(__file__).resolve().parents[2]
CHATS = [
    [{"role": "system", "content": "You answer in one short sentence."},
     {"role": "user", "content": "What colour is the sky?"},
     {"role": "assistant", "content": "The sky is blue."},
     {"role": "user", "content": "And grass?"},
     {"role": "assistant", "content": "Grass is green."}],
    [{"role": "user", "content": "Name one fruit."}, {"role": "assistant", "content": "An apple."}],
]


def _digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory) -> Path:
    return ensure_small(tmp_path_factory.mktemp("small") / SMALL)


def _small_workspace(root: Path, small_dir: Path, **training) -> Path:
    config = Config()
    config.model.name = SMALL
    for key, value in {"batch_size": 2, "grad_accum": 1, "max_length": 96, "save_every": 1, **training}.items():
        setattr(config.training, key, value)
    Workspace.create(root, config)
    (root / "models").mkdir(exist_ok=True)
    (root / "models" / SMALL).symlink_to(small_dir)  # made once per module; a real workspace makes its own
    return root


def test_small_is_a_25m_llama_with_a_merged_bpe_tokenizer_and_generation_marks(small_dir):
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(small_dir)
    tokenizer = AutoTokenizer.from_pretrained(small_dir)
    merges = json.loads((small_dir / "tokenizer.json").read_text())["model"]["merges"]
    weights = (small_dir / "model.safetensors").stat().st_size
    assert config.model_type == "llama" and config.num_hidden_layers == 8 and config.hidden_size == 512
    assert 20e6 < weights / 4 < 40e6  # float32 parameters
    assert len(merges) > 2000 and config.vocab_size == len(tokenizer)
    assert "{% generation %}" in tokenizer.chat_template
    assert len(tokenizer.tokenize(" training checkpoints")) < len(" training checkpoints") / 3


@pytest.mark.slow
def test_small_is_the_same_bytes_every_time_it_is_made(small_dir, tmp_path):
    assert _digest(ensure_small(tmp_path / "again")) == _digest(small_dir)


def test_small_trains_a_chat_file_on_exactly_its_replies(small_dir, tmp_path):
    ws = _small_workspace(tmp_path / "ws", small_dir)
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CHATS * 2), encoding="utf-8")
    r = run_cli(ws, "preview", data, "--json")
    assert r.code == 0, r.out + r.err
    shown = json.loads(r.out)
    assert [s["trainable"] for s in shown] == [["The sky is blue.<|im_end|>", "Grass is green.<|im_end|>"],
                                               ["An apple.<|im_end|>"]] * 2
    assert all(s["tokens"] < len(s["text"]) / 2 for s in shown)  # merges: far fewer tokens than bytes
    r = run_cli(ws, "train", data, "-q")
    assert r.code == 0, r.out + r.err
    s = status(ws)
    assert [(j["state"], j["start_step"], j["end_step"]) for j in s["jobs"]] == [("done", 1, 2)]
    assert s["run"]["global_step"] == 2


def test_deterministic_kernels_are_a_stated_setting_that_changes_no_weights_on_cpu(workspace, tmp_path):
    from conftest import adapter_weights, max_abs_diff, text_file

    data = text_file(tmp_path / "d.jsonl", 16)
    weights = {}
    for flag in (False, True):
        ws = workspace(f"ws-{flag}", training={"deterministic": flag})
        assert run_cli(ws, "train", data, "-q").code == 0
        s = status(ws)
        assert s["precision"]["training.deterministic"] is flag
        weights[flag] = adapter_weights(ws / "runs" / s["run"]["id"] / "checkpoints" / "step-000002")
        manifest = json.loads((ws / "runs" / s["run"]["id"] / "checkpoints" / "step-000002" / "manifest.json")
                              .read_text())
        assert manifest["hyperparameters"]["deterministic"] is flag
        assert ("deterministic kernels" in run_cli(ws, "status").out) is flag
    assert max_abs_diff(weights[False], weights[True]) == 0.0


def test_the_gpu_benchmark_says_what_it_would_measure_without_cuda():
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py")], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    assert "No CUDA device: nothing measured" in p.stdout and "tokens/s, peak CUDA memory and MFU" in p.stdout


@pytest.mark.slow
def test_the_gpu_benchmark_runs_both_sides_on_cpu_in_smoke_mode():
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--smoke", "--examples", "16"],
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout + p.stderr
    for setting in ("lora", "qlora"):
        assert f"{setting}: conveyor tokens/s ÷ plain HF tokens/s" in p.stdout, p.stdout
    assert p.stdout.count("conveyor") >= 4 and p.stdout.count("plain HF") >= 4
