"""FSDP2 (distributed.strategy = "fsdp"): a full fine-tune sharded across CPU processes over gloo, its DCP checkpoints
sealed into the manifest, resumed exactly at the same world size and resharded at another, a shard that fails its
hash and a save cut off refused, retention of sharded folders, export as one ordinary model folder."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import audit, checkpoint_steps, make_workspace, max_abs_diff, run_cli, set_setting, status, text_file

from conveyor.store import checkpoints as ck
from conveyor.store import manifest as mf

# 78 lines, 6 held out: 72 examples, 12 a step (batch 3 × grad_accum 1 × 4 ranks): 6 steps, checkpoints at 2, 4, 6.
# Evaluated at steps 3 and 6 (held-out loss and a sample): under fsdp on every rank, each forward needing all shards.
LINES, EXAMPLES = 78, 72
SETTINGS = {"eval": {"holdout": 6, "every_steps": 3, "sample_prompts": ["the quick"], "max_new_tokens": 4},
            "training": {"batch_size": 3, "grad_accum": 1, "save_every": 2, "max_length": 48, "warmup_steps": 2,
                         "learning_rate": 1e-3},
            "adapter": {"method": "full"}, "distributed": {"strategy": "fsdp", "nproc_per_node": 4},
            "daemon": {"retry_backoff_seconds": 0.2, "min_free_mb": 0}}
# Resharded: the same 12 examples a step at another world size, so the steps are the same steps (law 1 and 2) and
# only the order in which gradients are summed differs. Measured on CPU (torch 2.13): 7e-9 at 2 ranks, 6e-8 at 3.
OTHER_WORLD = {2: {"nproc_per_node": 2, "grad_accum": 2}, 3: {"nproc_per_node": 3, "batch_size": 4}}
RESHARD_TOLERANCE = 1e-6


def weights(checkpoint: Path, scratch: Path) -> dict:
    """A sharded checkpoint's weights consolidated by torch's own DCP tool (not conveyor's code)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = scratch / f"{checkpoint.parent.parent.parent.name}-{checkpoint.name}-{time.monotonic_ns()}.pt"
    dcp_to_torch_save(checkpoint / mf.MODEL_SHARDS, out)
    return torch.load(out)


def final(ws: Path) -> Path:
    return ws / "runs" / "run-0001" / "checkpoints" / "step-000006"


def _train(ws: Path, *args: str, env: dict | None = None):
    return run_cli(ws, *args, "-q", subprocess_=True, env=env)


def _workspace(root: Path, tiny_dir: Path, **changes) -> Path:
    sections = {k: dict(v) for k, v in SETTINGS.items()}
    for section, values in changes.items():
        sections[section].update(values)
    return make_workspace(root, tiny_dir, **sections)


def _gone(ws: Path, timeout: float = 120) -> None:
    """Wait until no process of this workspace is left (the agents and ranks end with the daemon they serve)."""
    deadline = time.monotonic() + timeout
    while True:
        left = []
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and str(ws) in (entry / "cmdline").read_bytes().decode(errors="replace") \
                        and "Z" not in (entry / "stat").read_text().split(")")[-1].split()[0]:
                    left.append(entry.name)
            except OSError:
                continue
        if not left:
            return
        assert time.monotonic() < deadline, f"processes of {ws} still alive: {left}"
        time.sleep(0.2)


def _cut_after(ws: Path, file: Path, step: int, marker: Path) -> str:
    """conveyor train, rank 0 SIGKILLed right after global step `step` (the checkpoint before it is on disk), then
    the daemon and its whole session SIGKILLed too before it can retry (a power cut). Returns what it printed."""
    set_setting(ws, "daemon", "retry_backoff_seconds", "600")
    p = subprocess.Popen([sys.executable, "-m", "conveyor", "-w", str(ws), "train", str(file), "-q"],
                         env={**os.environ, "CONVEYOR_FAILPOINT": f"step:{step}:{marker}"}, start_new_session=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 600
    while not marker.exists():
        assert p.poll() is None, p.stdout.read()
        assert time.monotonic() < deadline, "the failpoint never fired"
        time.sleep(0.2)
    time.sleep(1.0)
    os.killpg(p.pid, signal.SIGKILL)
    out = p.communicate()[0]
    _gone(ws)
    set_setting(ws, "daemon", "retry_backoff_seconds", "0.2")
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_dir):
    """The uninterrupted 4-rank run: its workspace and its file."""
    root = tmp_path_factory.mktemp("fsdp")
    file = text_file(root / "a.jsonl", LINES, "a")
    ws = _workspace(root / "reference", tiny_dir)
    r = _train(ws, "train", str(file))
    assert r.code == 0, r.out + r.err
    return ws, file


@pytest.mark.slow
def test_reference_is_sharded_into_the_manifest(reference, tmp_path):
    ws, _ = reference
    jobs = status(ws)["jobs"]
    assert [(j["state"], j["start_step"], j["end_step"]) for j in jobs] == [("done", 1, 6)]
    assert checkpoint_steps(ws, "run-0001") == [2, 4, 6]
    data = mf.verify(final(ws))
    assert data.sharded["world_size"] == 4 and data.sharded["strategy"] == "fsdp"
    assert data.sharded["torch"] == torch.__version__ and data.hyperparameters["strategy"] == "fsdp"
    shards = [f"{d}/__{r}_0.distcp" for d in (mf.MODEL_SHARDS, mf.OPTIMIZER_SHARDS) for r in range(4)]
    assert set(shards) | {"model/.metadata", "optimizer/.metadata", "config.json", "scheduler.pt", "rng.pt",
                          "rng-rank3.pt"} <= set(data.files)
    assert not (final(ws) / "model.safetensors").exists()  # each rank wrote its part; no rank held the whole model
    rows = audit(ws)
    assert [len(r["lines"]) for r in rows] == [12] * 6
    trained = sorted(x for r in rows for x in r["lines"])
    assert len(set(trained)) == len(trained) == EXAMPLES and set(trained) <= set(range(1, LINES + 1))
    con = sqlite3.connect(ws / "conveyor.db")
    assert [s for (s,) in con.execute("SELECT step FROM set_evals ORDER BY step")] == [3, 6]
    assert [s for (s,) in con.execute("SELECT step FROM samples ORDER BY step")] == [3, 6]
    con.close()


@pytest.mark.slow
def test_killed_during_a_sharded_save_resumes_from_the_one_before_bitwise(reference, tmp_path, tiny_dir):
    """Rank 0 SIGKILLed after every rank wrote its shards of step 4, before the seal: the daemon retries at the same
    world size from step 2 (the cut-off folder is never resumed) and ends with the reference's weights, bitwise."""
    ref, file = reference
    ws = _workspace(tmp_path / "killed", tiny_dir)
    marker = tmp_path / "fired"
    r = _train(ws, "train", str(file), env={"CONVEYOR_FAILPOINT": f"checkpoint-write:4:{marker}"})
    out = r.out + r.err
    assert r.code == 0 and marker.exists(), out
    assert "a checkpoint write that never finished (never resumable)" in out, out
    assert "job 1 resumes at global step 3 from step-000002" in out, out
    assert audit(ws) == audit(ref)
    assert max_abs_diff(weights(final(ws), tmp_path), weights(final(ref), tmp_path)) == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_resumed_at_another_world_size_reshards(reference, tmp_path, tiny_dir, world):
    """SIGKILLed at 4 ranks after checkpoint 2, resumed at 2 (grad_accum 2) or 3 (batch 4): the same 12 examples a
    step, so the audit equals the uninterrupted run's step for step, and the weights are within float tolerance."""
    ref, file = reference
    ws = _workspace(tmp_path / f"at{world}", tiny_dir)
    _cut_after(ws, file, 3, tmp_path / "fired")
    for key, value in OTHER_WORLD[world].items():
        set_setting(ws, "distributed" if key == "nproc_per_node" else "training", key, str(value))
    r = _train(ws, "run", "--drain")
    out = r.out + r.err
    assert r.code == 0, out
    assert "job 1 resumes at global step 3 from step-000002" in out, out
    assert (f"world size 4 → {world}: job 1 re-planned from example 24 of its order; weights and optimizer state "
            "resharded from step-000002's 4 shard(s) (DCP): exactly") in out, out
    assert "within float tolerance, not bitwise" in out, out
    assert audit(ws) == audit(ref)
    assert mf.read(final(ws)).sharded["world_size"] == world
    diff = max_abs_diff(weights(final(ws), tmp_path), weights(final(ref), tmp_path))
    print(f"world size 4 → {world}: max abs diff {diff:.3g}")
    assert diff <= RESHARD_TOLERANCE


@pytest.mark.slow
def test_a_shard_that_fails_its_hash_is_refused_by_name(reference, tmp_path, tiny_dir):
    """Cut after checkpoint 4; a byte flipped in one rank's model shard of it: that checkpoint is refused by name, set
    aside, and the run resumes from step 2 at the same world size, ending bitwise equal to the reference."""
    ref, file = reference
    ws = _workspace(tmp_path / "flipped", tiny_dir)
    _cut_after(ws, file, 5, tmp_path / "fired")
    shard = ws / "runs/run-0001/checkpoints/step-000004/model/__2_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    r = _train(ws, "run", "--drain")
    out = r.out + r.err
    assert r.code == 0, out
    assert ("not resuming from step-000004: model/__2_0.distcp does not match its sha256 in the manifest "
            "(changed or truncated)") in out, out
    assert "job 1 resumes at global step 3 from step-000002" in out, out
    assert list((ws / "runs/run-0001/unusable").glob("step-000004-*"))
    assert audit(ws) == audit(ref)
    assert max_abs_diff(weights(final(ws), tmp_path), weights(final(ref), tmp_path)) == 0.0


@pytest.mark.slow
def test_export_of_a_sharded_run_is_one_ordinary_model_folder(reference, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    ws, _ = reference
    out = tmp_path / "exported"
    r = run_cli(ws, "export", out)
    assert r.code == 0 and "exported the model of run-0001 at global step 6 (step-000006)" in r.out, r.out + r.err
    assert (out / "model.safetensors").is_file() and not list(out.rglob("*.distcp"))
    assert not (out / mf.MODEL_SHARDS).exists()
    exported = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    # The trained state as torch's DCP tool consolidates it, in a model built from the checkpoint's config.
    trained = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(final(ws))).eval()
    trained.load_state_dict(weights(final(ws), tmp_path))
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46, 47, 2]])
    with torch.no_grad():
        assert torch.equal(exported(input_ids=ids).logits, trained(input_ids=ids).logits)


@pytest.mark.slow
def test_a_ddp_checkpoint_goes_on_sharded_at_two_ranks(tmp_path, tiny_dir):
    """Job a under ddp (whole-model files and optimizer.pt), then distributed.strategy = "fsdp" for job b: the files
    are loaded sharded, the optimizer moments mapped by parameter name onto the shards; the result equals a run that
    stayed ddp within float tolerance (a wrong moment would be far off)."""
    plain = {"eval": {"holdout": 0, "every_steps": 0, "sample_prompts": []},
             "distributed": {"nproc_per_node": 2, "strategy": "ddp"}}
    files = [text_file(tmp_path / f"{t}.jsonl", 24, t) for t in "ab"]  # 6 a step: 4 steps a job
    stayed = _workspace(tmp_path / "ddp", tiny_dir, **plain)
    switched = _workspace(tmp_path / "to-fsdp", tiny_dir, **plain)
    for ws in (stayed, switched):
        assert _train(ws, "train", str(files[0])).code == 0
    set_setting(switched, "distributed", "strategy", '"fsdp"')
    for ws in (stayed, switched):
        r = _train(ws, "train", str(files[1]))
        assert r.code == 0, r.out + r.err
    out = r.out + r.err
    assert "distributed.strategy: ddp → fsdp" in out, out
    assert "step-000004 holds whole-model files (written under ddp): they are loaded sharded" in out, out
    end = "runs/run-0001/checkpoints/step-000008"
    assert mf.read(switched / end).sharded["world_size"] == 2
    from safetensors.torch import load_file

    diff = max_abs_diff(weights(switched / end, tmp_path), load_file(stayed / end / "model.safetensors"))
    print(f"ddp → fsdp at 2 ranks: max abs diff {diff:.3g}")
    assert diff <= RESHARD_TOLERANCE


# One process (distributed.strategy = "fsdp" with nproc_per_node = 1): nothing to shard across, so the whole model
# trains, but its checkpoints are DCP folders, so the run can go on at any world size. Fast: in-process CLI.
ALONE = {"training": {"batch_size": 4, "grad_accum": 1, "save_every": 2, "max_length": 48, "learning_rate": 1e-3,
                      "keep_checkpoints": 1, "keep_job_ends": 1},
         "adapter": {"method": "full"}, "distributed": {"strategy": "fsdp"}, "daemon": {"min_free_mb": 0}}


@pytest.mark.slow
def test_alone_trains_whole_and_writes_dcp_checkpoints_that_retention_trims(workspace, tmp_path):
    ws = workspace("alone", **ALONE)
    for tag in "abc":  # 12 examples, 3 steps a job: versions at 3, 6, 9
        r = run_cli(ws, "train", text_file(tmp_path / f"{tag}.jsonl", 12, tag), "-q")
        assert r.code == 0, r.out + r.err
    root = ws / "runs/run-0001/checkpoints"
    v1 = root / "step-000003"
    data = mf.verify(v1)
    assert data.sharded["world_size"] == 1
    # keep_job_ends = 1: v1 lost its optimizer shards (recorded), never its model shards (the version's weights).
    assert [(sorted(r["files"]), r["by"]) for r in data.pruned] == [
        (["optimizer/.metadata", "optimizer/__0_0.distcp"], "training.keep_job_ends")]
    assert not (v1 / mf.OPTIMIZER_SHARDS).exists() and (v1 / "model/__0_0.distcp").is_file()
    assert data.optimizer_pruned == "training.keep_job_ends" and not data.has_optimizer
    assert mf.read(root / "step-000009").has_optimizer
    versions = json.loads(run_cli(ws, "versions", "--json").out)
    assert [(v["version"], v["weights"], v["optimizer"]) for v in versions] == [
        ("v1", "kept", "pruned"), ("v2", "kept", "pruned"), ("v3", "kept", "kept")]

    # export --version v1: consolidated in this one process, the logits of v1's own shards.
    from transformers import AutoModelForCausalLM

    r = run_cli(ws, "export", tmp_path / "v1", "--version", "v1")
    assert r.code == 0, r.out + r.err
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "v1")).eval()
    assert max_abs_diff(exported.state_dict(), weights(v1, tmp_path)) == 0.0

    r = run_cli(ws, "generate", "a 1:", "--version", "v1", "--max-new-tokens", "4")  # generate consolidates too
    assert r.code == 0, r.out + r.err

    # A rollback to v1 copies its shards; training on from it restarts the moments (pruned) and says so.
    r = run_cli(ws, "rollback", "v1")
    assert r.code == 0, r.out + r.err
    r = run_cli(ws, "train", text_file(tmp_path / "d.jsonl", 8, "d"))
    assert r.code == 0, r.out + r.err
    assert "has no optimizer state: optimizer state pruned by retention (training.keep_job_ends)" in r.out + r.err
    s = status(ws)
    assert s["run"]["id"] == "run-0002" and s["run"]["global_step"] == 5


def test_strategy_changed_between_jobs_converts_the_checkpoint_exactly(workspace, tmp_path):
    """ddp → fsdp → ddp at one process: whole-model files are loaded into the sharded path and shards back into
    whole files; the weights carry over exactly, each change is said."""
    ws = workspace("switch", **{**ALONE, "distributed": {"strategy": "ddp"}})
    assert run_cli(ws, "train", text_file(tmp_path / "a.jsonl", 8, "a"), "-q").code == 0
    set_setting(ws, "distributed", "strategy", '"fsdp"')
    r = run_cli(ws, "train", text_file(tmp_path / "b.jsonl", 8, "b"))
    assert r.code == 0, r.out + r.err
    assert "distributed.strategy: ddp → fsdp" in r.out + r.err
    assert "step-000002 holds whole-model files (written under ddp): they are loaded sharded" in r.out + r.err
    assert mf.read(ws / "runs/run-0001/checkpoints/step-000004").sharded is not None
    set_setting(ws, "distributed", "strategy", '"ddp"')
    r = run_cli(ws, "train", text_file(tmp_path / "c.jsonl", 8, "c"))
    assert r.code == 0, r.out + r.err
    assert "step-000004 is sharded (written under fsdp): every rank loads it whole (DCP)" in r.out + r.err
    assert (ws / "runs/run-0001/checkpoints/step-000006/model.safetensors").is_file()


def test_fsdp_with_a_4bit_base_is_a_settings_error():
    from conveyor.config import parse_config
    from conveyor.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        parse_config({"distributed": {"strategy": "fsdp"}, "model": {"quantization": "nf4"}})
    assert 'distributed.strategy = "fsdp"' in str(e.value) and 'model.quantization = "none"' in str(e.value)
    assert parse_config({"distributed": {"strategy": "fsdp"}}).adapter.method == "lora"  # LoRA on a sharded base


# LoRA on a base sharded across 2 ranks: 28 lines, 4 held out, 6 examples a step (batch 3 × 2 ranks): 4 steps,
# checkpoints at 2 and 4, held-out loss and a sample at step 3 and 4 (every rank: a forward needs the shards).
LORA = {**SETTINGS, "eval": {**SETTINGS["eval"], "holdout": 4}, "adapter": {"method": "lora"},
        "distributed": {"strategy": "fsdp", "nproc_per_node": 2},
        "training": {**SETTINGS["training"], "learning_rate": 1e-2}}
LORA_LINES, LORA_STEPS = 28, 4


def _adapter(ws: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(ws / f"runs/run-0001/checkpoints/step-{LORA_STEPS:06d}/adapter_model.safetensors")


def _lora_workspace(root: Path, tiny_dir: Path, **distributed) -> Path:
    sections = {k: dict(v) for k, v in LORA.items()}
    sections["distributed"].update(distributed)
    return make_workspace(root, tiny_dir, **sections)


@pytest.mark.slow
def test_lora_on_a_sharded_base_trains_as_ddp_does_and_resumes_bitwise(tmp_path, tiny_dir):
    """distributed.strategy = "fsdp" under LoRA at 2 ranks: the base is sharded at load (sharding.load_model refuses
    to leave any weight whole), the adapter is whole on every rank (the Trainer broadcasts it and averages its
    gradients), its checkpoints are the ones ddp writes. Against ddp at 2 ranks: the same audit and the same adapter
    (measured: bitwise); SIGKILLed after step 3 and resumed at 2 ranks: bitwise the uninterrupted run; resumed at one
    process (grad_accum 2, the same 6 examples a step): within float tolerance, and said; exported, the adapter
    loads with peft and answers as generate does."""
    file = text_file(tmp_path / "a.jsonl", LORA_LINES, "a")
    ddp = _lora_workspace(tmp_path / "ddp", tiny_dir, strategy="ddp")
    fsdp = _lora_workspace(tmp_path / "fsdp", tiny_dir)
    for ws in (ddp, fsdp):
        r = _train(ws, "train", str(file))
        assert r.code == 0, r.out + r.err
    # tiny: 2 layers × 9 weights + embeddings, final norm and head = 21 sharded; LoRA A and B on q and v = 8 whole
    assert ("job 1: the base model sharded across 2 ranks (FSDP2, 21 tensors), the adapter whole on every rank "
            "(8 tensors, its gradients averaged)") in (fsdp / "logs/conveyor.log").read_text()
    rows = audit(fsdp)
    assert [len(r["lines"]) for r in rows] == [6] * LORA_STEPS and rows == audit(ddp)
    trained = sorted(x for r in rows for x in r["lines"])
    assert len(set(trained)) == len(trained) == LORA_LINES - 4
    data = mf.verify(fsdp / f"runs/run-0001/checkpoints/step-{LORA_STEPS:06d}")
    assert data.sharded is None and data.hyperparameters["strategy"] == "fsdp"
    assert {"adapter_model.safetensors", "optimizer.pt", "rng.pt", "rng-rank1.pt"} <= set(data.files)
    reference = _adapter(fsdp)
    assert max(float(v.abs().max()) for k, v in reference.items() if "lora_B" in k) > 0  # the adapter trained
    assert max_abs_diff(reference, _adapter(ddp)) <= 1e-6
    con = sqlite3.connect(fsdp / "conveyor.db")
    assert [s for (s,) in con.execute("SELECT step FROM samples ORDER BY step")] == [3, 4]
    assert [s for (s,) in con.execute("SELECT DISTINCT step FROM set_evals ORDER BY step")] == [3, 4]
    con.close()

    cut = _lora_workspace(tmp_path / "cut", tiny_dir)
    _cut_after(cut, file, 3, tmp_path / "fired")
    r = _train(cut, "run", "--drain")
    assert r.code == 0 and "job 1 resumes at global step 3 from step-000002" in r.out + r.err, r.out + r.err
    assert audit(cut) == rows and max_abs_diff(_adapter(cut), reference) == 0.0

    alone = _lora_workspace(tmp_path / "alone", tiny_dir)
    _cut_after(alone, file, 3, tmp_path / "fired-alone")
    set_setting(alone, "distributed", "nproc_per_node", "1")
    set_setting(alone, "training", "grad_accum", "2")
    r = _train(alone, "run", "--drain")
    out = r.out + r.err
    assert r.code == 0, out
    assert ("world size 2 → 1: job 1 re-planned from example 12 of its order; the adapter and its optimizer state are "
            "whole in step-000002; the base model is loaded whole: exactly") in out, out
    assert audit(alone) == rows
    diff = max_abs_diff(_adapter(alone), reference)
    print(f"LoRA on a sharded base, world size 2 → 1: max abs diff {diff:.3g}")
    assert diff <= RESHARD_TOLERANCE

    out_dir = tmp_path / "exported"
    r = run_cli(fsdp, "export", out_dir)
    assert r.code == 0 and "exported the adapter of run-0001 at global step 4" in r.out, r.out + r.err
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(fsdp / "models/tiny")),
                                      str(out_dir)).eval()
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46, 47, 2]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    base = AutoModelForCausalLM.from_pretrained(str(fsdp / "models/tiny")).eval()
    with torch.no_grad():
        assert not torch.equal(logits, base(input_ids=ids).logits)  # the adapter is in the export


def test_hash_cache_keys_sharded_files_by_their_folder(tmp_path):
    """model/__0_0.distcp and optimizer/__0_0.distcp (and the same names in every checkpoint) are cached apart: a
    flipped shard is found even when another file of the same name and size was hashed before."""
    from conveyor.data.plan import Position

    run_dir = tmp_path / "run"
    pos = Position(job_id=1, fingerprint="f" * 64, examples=8, epochs=1, planned_steps=4, steps_done=2, position=8,
                   start_step=1, segment_start=1)

    def shards(step):
        def save(folder: Path) -> None:
            for d in (mf.MODEL_SHARDS, mf.OPTIMIZER_SHARDS):
                (folder / d).mkdir()
                (folder / d / mf.DCP_METADATA).write_bytes(b"meta")
                (folder / d / "__0_0.distcp").write_bytes(bytes([step]) * 64 + d.encode())
        return save

    for step in (2, 4):
        manifest = mf.Manifest(run_id="run-0001", global_step=step, job=pos, job_end=False,
                               identity={"adapter.method": "full"}, sharded={"format": mf.SHARDED_FORMAT})
        ck.write(run_dir, step, shards(step), manifest, keep=3, job_ends=1)
    cache = json.loads((run_dir / "checkpoints" / ck.HASHES).read_text())
    assert {"step-000004/model/__0_0.distcp", "step-000004/optimizer/__0_0.distcp"} <= set(cache)
    shard = run_dir / "checkpoints/step-000004/optimizer/__0_0.distcp"
    shard.write_bytes(b"\x09" * 64 + b"optimizer")  # same size
    found, problems = ck.newest_verified(run_dir)
    assert found.step == 2
    assert [p.reason for p in problems] == [
        "optimizer/__0_0.distcp does not match its sha256 in the manifest (changed or truncated)"]


def test_a_changed_world_size_or_strategy_is_said_with_its_exactness(tmp_path):
    from conveyor.data.plan import Position
    from conveyor.store.reconcile import layout_change

    pos = Position(job_id=1, fingerprint="f" * 64, examples=72, epochs=1, planned_steps=6, steps_done=2, position=24,
                   start_step=1, segment_start=1)
    hp = lambda world, accum=1, strategy="fsdp": {"batch_size": 3, "grad_accum": accum, "world_size": world,
                                                   "strategy": strategy}
    sharded = ck.Checkpoint(tmp_path / "step-000002", 2, mf.Manifest(
        run_id="run-0001", global_step=2, job=pos, job_end=False, identity={}, hyperparameters=hp(4),
        sharded={"format": mf.SHARDED_FORMAT, "world_size": 4}))
    assert layout_change(sharded, hp(4), hp(4)) is None
    said = layout_change(sharded, hp(4), hp(2, accum=2))
    assert said.startswith("world size 4 → 2: job 1 re-planned from example 24 of its order; weights and optimizer "
                           "state resharded from step-000002's 4 shard(s) (DCP): exactly") and "not bitwise" in said
    said = layout_change(sharded, hp(4), hp(2))  # 6 examples a step instead of 12: other steps, said so
    assert "now 6 examples a step (was 12" in said and "another trajectory" in said
    said = layout_change(sharded, hp(4), hp(4, strategy="ddp"))
    assert said.startswith("distributed.strategy fsdp → ddp: job 1 re-planned from example 24 of its order; "
                           "step-000002 is sharded (written under fsdp): every rank loads it whole (DCP): exactly")
    adapter = ck.Checkpoint(tmp_path / "step-000002", 2, mf.Manifest(
        run_id="run-0001", global_step=2, job=pos, job_end=False, identity={"adapter.method": "lora"},
        hyperparameters=hp(4, strategy="ddp")))
    said = layout_change(adapter, hp(4, strategy="ddp"), hp(2, accum=2))
    assert said.startswith("world size 4 → 2: job 1 re-planned from example 24 of its order; the adapter and its "
                           "optimizer state are whole in step-000002; the base model is loaded sharded across the "
                           "ranks: exactly") and "not bitwise" in said
