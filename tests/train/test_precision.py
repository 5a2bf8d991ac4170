"""Precision and memory settings: each validated with its key named, stated in status and the manifest, trained
on CPU; gradient checkpointing changes nothing in the weights; QLoRA and the others resume exactly (law 3);
identity settings start a new run (law 5), the others are applied to the same run and said."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from conftest import adapter_weights, audit, max_abs_diff, run_cli, status, text_file

from conveyor.config import Config, installed, load_config, parse_config, render_config
from conveyor.errors import ConfigError

needs_bnb = pytest.mark.skipif(not installed("bitsandbytes"),
                               reason="bitsandbytes is not installed (pip install 'conveyor[qlora]')")
EXAMPLES, STEPS = 24, 6  # batch 2 × grad_accum 2
SETTINGS = {"training": {"batch_size": 2, "grad_accum": 2, "save_every": 2, "max_length": 48, "learning_rate": 1e-3},
            "adapter": {"dropout": 0.1}}  # dropout on: its RNG must be the same with every setting and on resume


def _ws(workspace, name: str, extra: dict | None = None) -> Path:
    sections = {k: dict(v) for k, v in SETTINGS.items()}
    for section, values in (extra or {}).items():
        sections.setdefault(section, {}).update(values)
    return workspace(name, **sections)


def _set(ws: Path, **sections) -> None:
    config = load_config(ws / "conveyor.toml")
    for section, values in sections.items():
        for key, value in values.items():
            setattr(getattr(config, section), key, value)
    (ws / "conveyor.toml").write_text(render_config(config), encoding="utf-8")


def _train(ws: Path, *files: Path) -> str:
    r = run_cli(ws, "train", *files, "-q")
    assert r.code == 0, r.out + r.err
    return r.out + r.err


def _checkpoint(ws: Path, step: int) -> Path:
    return ws / "runs" / status(ws)["run"]["id"] / "checkpoints" / f"step-{step:06d}"


def _manifest(ws: Path, step: int) -> dict:
    return json.loads((_checkpoint(ws, step) / "manifest.json").read_text())


def _problems(data: dict) -> str:
    with pytest.raises(ConfigError) as e:
        parse_config(data)
    return str(e.value)


# Validation -------------------------------------------------------------------------------------------

def test_bad_values_are_named_by_key_with_what_would_be_valid():
    message = _problems({"model": {"quantization": "int3", "attn_implementation": "fast"},
                         "training": {"mixed_precision": "fp8", "optimizer": "sgd", "gradient_checkpointing": "maybe"}})
    assert "5 problem(s)" in message
    for key, valid in (("model.quantization", "'none' or 'nf4'"), ("model.attn_implementation", "'eager'"),
                       ("training.mixed_precision", "'bf16'"), ("training.optimizer", "'adamw_8bit'"),
                       ("training.gradient_checkpointing", "boolean")):
        assert any(line.startswith(f"  - {key}:") and valid in line for line in message.splitlines()), (key, message)


@pytest.mark.skipif(installed("flash_attn"), reason="flash-attn is installed here")
def test_flash_attention_is_refused_when_not_installed():
    message = _problems({"model": {"attn_implementation": "flash_attention_2"}})
    assert "model.attn_implementation: flash_attention_2 needs the flash-attn package" in message
    assert 'use "sdpa"' in message


def test_fp16_autocast_is_refused_on_cpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: fp16 autocast is valid here")
    message = _problems({"training": {"mixed_precision": "fp16"}})
    assert "training.mixed_precision: fp16 autocast needs a CUDA GPU" in message and 'use "bf16"' in message


def test_bitsandbytes_settings_are_refused_without_it(monkeypatch):
    import conveyor.config

    monkeypatch.setattr(conveyor.config, "installed", lambda package: False)
    message = _problems({"model": {"quantization": "nf4"}, "training": {"optimizer": "adamw_8bit"}})
    assert "model.quantization: nf4 needs bitsandbytes (pip install 'conveyor[qlora]')" in message
    assert "training.optimizer: adamw_8bit needs bitsandbytes" in message


@needs_bnb
def test_qlora_is_lora_only():
    message = _problems({"model": {"quantization": "nf4"}, "adapter": {"method": "full"}})
    assert 'model.quantization = "nf4" trains a LoRA adapter' in message and 'adapter.method is "full"' in message


# Gradient checkpointing and autocast ----------------------------------------------------------------

def test_gradient_checkpointing_gives_the_same_weights_with_lora_dropout(workspace, tmp_path, monkeypatch):
    """Non-reentrant checkpointing replays each layer with the RNG state of its forward (so the same dropout
    masks) and leaves the RNG stream as it found it, so the run is the same run, recomputed."""
    import transformers.modeling_utils as mu

    calls = Counter()
    real = mu.checkpoint

    def counting(*args, **kwargs):
        calls["checkpoint"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(mu, "checkpoint", counting)
    data = text_file(tmp_path / "d.jsonl", EXAMPLES)
    plain = _ws(workspace, "plain")
    _train(plain, data)
    assert calls["checkpoint"] == 0
    recomputed = _ws(workspace, "recomputed", {"training": {"gradient_checkpointing": True}})
    _train(recomputed, data)
    assert calls["checkpoint"] >= STEPS * 2 * 2  # every layer (2) of every micro-batch (2 per step)
    a, b = adapter_weights(_checkpoint(plain, STEPS)), adapter_weights(_checkpoint(recomputed, STEPS))
    assert max_abs_diff(a, b) <= 1e-5
    assert max(float(v.abs().max()) for k, v in a.items() if "lora_B" in k) > 1e-4  # training moved the weights
    assert _manifest(recomputed, STEPS)["hyperparameters"]["gradient_checkpointing"] is True


def test_bf16_autocast_keeps_fp32_master_weights(workspace, tmp_path):
    data = text_file(tmp_path / "d.jsonl", EXAMPLES)
    fp32 = _ws(workspace, "fp32")
    _train(fp32, data)
    bf16 = _ws(workspace, "bf16", {"training": {"mixed_precision": "bf16"}})
    _train(bf16, data)
    a, b = adapter_weights(_checkpoint(fp32, STEPS)), adapter_weights(_checkpoint(bf16, STEPS))
    assert {v.dtype for v in b.values()} == {__import__("torch").float32}
    assert 0 < max_abs_diff(a, b) < 1e-2  # autocast really ran in bf16, and it trained the same way
    assert _manifest(bf16, STEPS)["hyperparameters"]["mixed_precision"] == "bf16"
    assert "model.precision" in _manifest(bf16, STEPS)["identity"]  # the load dtype, float32, is identity
    s = status(bf16)
    assert s["precision"]["training.mixed_precision"] == "bf16"
    r = run_cli(bf16, "status")
    assert "precision and memory: base float32, bf16 autocast, attention sdpa, gradient checkpointing off, " \
           "optimizer adamw_torch" in r.out


def test_settings_outside_the_identity_apply_to_the_same_run_and_are_said(workspace, tmp_path):
    ws = _ws(workspace, "ws")
    _train(ws, text_file(tmp_path / "a.jsonl", 8, "a"))
    _set(ws, training={"mixed_precision": "bf16", "gradient_checkpointing": True},
         model={"attn_implementation": "eager"})
    out = _train(ws, text_file(tmp_path / "b.jsonl", 8, "b"))
    assert "settings changed since step-000002" in out
    for change in ("mixed_precision: no → bf16", "gradient_checkpointing: False → True",
                   "attn_implementation: sdpa → eager"):
        assert change in out, out
    s = status(ws)
    assert len(s["runs"]) == 1 and s["run"]["global_step"] == 4
    assert _manifest(ws, 4)["hyperparameters"]["attn_implementation"] == "eager"


@needs_bnb
def test_qlora_still_trains_after_an_evaluation_forward(tiny_dir):
    """An eval-mode forward without gradients (evaluation, samples, the packing probe) must not leave the 4-bit
    layers in bitsandbytes' inference-only CPU layout, which computes no gradient afterwards."""
    import torch

    from conveyor.train.precision import build_model

    config = Config()
    config.model.quantization = "nf4"
    ids = torch.arange(3, 40)[None] % 200

    def lora_grads(evaluate_first: bool) -> dict:
        model = build_model(config, str(tiny_dir), None)
        if evaluate_first:
            model.eval()
            with torch.no_grad():
                model(input_ids=ids)
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}

    plain, after_eval = lora_grads(False), lora_grads(True)
    assert len(after_eval) == len(plain) == 8  # lora_A and lora_B of q_proj and v_proj in 2 layers
    assert max(float((plain[k] - after_eval[k]).abs().max()) for k in plain) == 0.0


@needs_bnb
def test_a_quantization_change_starts_a_new_run_and_keeps_the_old(workspace, tmp_path):
    ws = _ws(workspace, "ws")
    _train(ws, text_file(tmp_path / "a.jsonl", 8, "a"))
    old = _checkpoint(ws, 2)
    before = adapter_weights(old)
    _set(ws, model={"quantization": "nf4"})
    out = _train(ws, text_file(tmp_path / "b.jsonl", 8, "b"))
    assert "model.quantization: (none) → nf4" in out and "run-0001 is kept untouched" in out, out
    s = status(ws)
    assert s["run"]["id"] == "run-0002" and s["run"]["global_step"] == 2
    assert s["run"]["identity"]["model.quantization"] == "nf4"
    assert max_abs_diff(adapter_weights(old), before) == 0
    assert "(float32, nf4)" in run_cli(ws, "status").out


@needs_bnb
def test_an_optimizer_change_restarts_the_moments_and_says_so(workspace, tmp_path):
    ws = _ws(workspace, "ws")
    _train(ws, text_file(tmp_path / "a.jsonl", 8, "a"))
    _set(ws, training={"optimizer": "adamw_8bit"})
    out = _train(ws, text_file(tmp_path / "b.jsonl", 8, "b"))
    assert "optimizer: adamw_torch → adamw_8bit" in out
    assert "training.optimizer changed from adamw_torch to adamw_8bit since step-000002" in out
    assert "start from zero at step 3" in out
    s = status(ws)
    assert len(s["runs"]) == 1 and [j["state"] for j in s["jobs"]] == ["done", "done"]
    assert _manifest(ws, 4)["hyperparameters"]["optimizer"] == "adamw_8bit"


# Exact resume with each setting -----------------------------------------------------------------------

RESUMABLE = {
    "qlora-nf4": pytest.param({"model": {"quantization": "nf4"}}, marks=needs_bnb),
    "qlora-nf4-padded": pytest.param({"model": {"quantization": "nf4"}, "training": {"packing": False}},
                                     marks=[needs_bnb, pytest.mark.slow]),
    "bf16-autocast": pytest.param({"training": {"mixed_precision": "bf16"}}, marks=pytest.mark.slow),
    "gradient-checkpointing": pytest.param({"training": {"gradient_checkpointing": True}}, marks=pytest.mark.slow),
    "adamw-8bit": pytest.param({"training": {"optimizer": "adamw_8bit"}}, marks=[needs_bnb, pytest.mark.slow]),
}


@pytest.mark.parametrize("extra", list(RESUMABLE.values()), ids=list(RESUMABLE))
def test_sigkill_mid_job_then_resume_gives_the_uninterrupted_weights(workspace, tmp_path, extra):
    data = text_file(tmp_path / "d.jsonl", EXAMPLES)
    reference = _ws(workspace, "reference", extra)
    _train(reference, data)
    ws = _ws(workspace, "killed", extra)
    assert run_cli(ws, "add", data).code == 0
    # A power cut after step 3 (checkpoint 2 is the newest): a real process, really killed.
    p = subprocess.run([sys.executable, "-m", "conveyor", "-w", str(ws), "run", "--drain", "-q"],
                       env={**os.environ, "CONVEYOR_FAILPOINT": "step:3"}, capture_output=True, text=True, timeout=600)
    assert p.returncode == -signal.SIGKILL, p.stdout + p.stderr
    r = run_cli(ws, "run", "--drain", "-q")
    assert r.code == 0, r.out + r.err
    assert "resumes at global step 3 from step-000002" in r.out + r.err
    rows = audit(ws)
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
    assert Counter(line for row in rows for line in row["lines"]) == Counter(range(1, EXAMPLES + 1))
    diff = max_abs_diff(adapter_weights(_checkpoint(ws, STEPS)), adapter_weights(_checkpoint(reference, STEPS)))
    assert diff <= 1e-6, diff


# The memory estimate (a GPU is not needed to compute it) ----------------------------------------------

def test_memory_estimate_warns_when_the_job_would_not_fit(tiny_dir):
    from conveyor.train import memory
    from conveyor.train.precision import build_model

    config = Config()
    model = build_model(config, str(tiny_dir), None)
    said = []
    need = memory.check_fits(config, model, 7, lambda level, text: said.append((level, text)), free=10_000)
    assert said[0][0] == "warning" and "job 7 may not fit in GPU memory" in said[0][1]
    for lever in ("training.batch_size", "training.grad_accum", "training.max_length",
                  "training.gradient_checkpointing", "model.quantization"):
        assert lever in said[0][1]
    said.clear()
    memory.check_fits(config, model, 7, lambda level, text: said.append((level, text)), free=need.total * 2)
    assert said[0][0] == "info" and "memory estimate" in said[0][1]
    config.training.gradient_checkpointing = True
    assert memory.estimate(config, model).activations < need.activations
    if not __import__("torch").cuda.is_available():  # without a GPU there is nothing to compare with
        assert memory.check_fits(config, model, 7, lambda *a: said.append(a)) is None
