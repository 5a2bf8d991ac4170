"""Checkpoints you can trust (laws 5, 6): identity checks, unusable checkpoints never resumed silently,
atomic writes that survive a full disk."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import audit, checkpoint_steps, ledger, run_cli, status, text_file
from conftest import set_setting as _set

from conveyor.store import checkpoints as ck
from conveyor.store import manifest as mf


def _tree_hashes(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _trained(workspace, tmp_path, n=24, **settings):
    """A workspace whose run has trained one file of n examples (3 steps at 4 × 2), checkpoints at 2 and 3."""
    ws = workspace(**settings)
    assert run_cli(ws, "train", text_file(tmp_path / "first.jsonl", n, "f"), "-q").code == 0
    return ws, status(ws)["run"]["id"]


def test_manifest_records_identity_position_and_hashes(workspace, tmp_path):
    ws, run_id = _trained(workspace, tmp_path)
    folder = ws / "runs" / run_id / "checkpoints" / "step-000002"
    data = json.loads((folder / mf.MANIFEST).read_text())
    assert data[mf.K_VERSION] == mf.VERSION and data[mf.K_RUN] == run_id and data[mf.K_STEP] == 2
    job = data[mf.K_JOB]
    assert (job["id"], job["epoch"], job["position_in_epoch"], job["position"], job["steps_done"]) == \
        (1, 0, 16, 16, 2)
    assert data[mf.K_IDENTITY]["adapter.r"] == 8 and data[mf.K_IDENTITY]["model.tokenizer_hash"]
    assert data[mf.K_HPARAMS]["batch_size"] == 4 and "torch" in data[mf.K_LIBRARIES]
    assert set(data[mf.K_FILES]) >= {"adapter_model.safetensors", "adapter_config.json", mf.OPTIMIZER,
                                     mf.SCHEDULER, mf.RNG}
    assert (ws / "runs" / run_id / "checkpoints" / mf.LATEST).read_text().strip() == "step-000003"


def test_identity_change_names_every_field_and_keeps_the_old_run(workspace, tmp_path, tiny_dir):
    ws, run_id = _trained(workspace, tmp_path)
    before = _tree_hashes(ws / "runs" / run_id)
    other_model = tmp_path / "other-model"
    shutil.copytree(tiny_dir, other_model)
    _set(ws, "adapter", "r", "16")
    _set(ws, "adapter", "target_modules", '["q_proj", "k_proj", "v_proj"]')
    _set(ws, "model", "name", f'"{other_model}"')
    r = run_cli(ws, "train", text_file(tmp_path / "second.jsonl", 8, "s"), "-q")
    assert r.code == 0, r.out + r.err
    message = r.out + r.err
    assert "adapter.r: 8 → 16" in message
    assert 'adapter.target_modules: ["q_proj", "v_proj"] → ["k_proj", "q_proj", "v_proj"]' in message
    assert f"model.name: tiny → {other_model}" in message
    assert "3 field(s)" in message
    s = status(ws)
    assert [r["id"] for r in s["runs"]] == [run_id, s["run"]["id"]] and s["run"]["id"] != run_id
    assert s["run"]["global_step"] == 1  # the new run started at step 0
    assert [r["active"] for r in s["runs"]] == [False, True]
    assert _tree_hashes(ws / "runs" / run_id) == before  # byte for byte untouched


def test_learning_rate_change_is_applied_and_stated_in_the_same_run(workspace, tmp_path):
    ws, run_id = _trained(workspace, tmp_path)
    _set(ws, "training", "learning_rate", "0.002")
    r = run_cli(ws, "train", text_file(tmp_path / "second.jsonl", 8, "s"), "-q")
    assert "training.learning_rate: 0.001 → 0.002" in r.out + r.err
    assert status(ws)["run"]["id"] == run_id and status(ws)["run"]["global_step"] == 4


@pytest.mark.parametrize("damage, reason", [
    ("foreign", "not a conveyor checkpoint folder"),
    ("no-manifest", "no manifest.json"),
    ("bad-manifest", "manifest.json is unreadable"),
    ("truncated", "does not match its sha256"),
])
def test_unusable_newest_checkpoint_is_reported_and_never_resumed(workspace, tmp_path, damage, reason):
    ws, run_id = _trained(workspace, tmp_path, n=24)
    folder = ws / "runs" / run_id / "checkpoints"
    newest = folder / "step-000003"
    if damage == "foreign":  # a plain HF Trainer checkpoint copied in; conveyor's own are intact
        shutil.copytree(newest, folder / "checkpoint-900")
        (folder / "checkpoint-900" / mf.MANIFEST).unlink()
    elif damage == "no-manifest":
        (newest / mf.MANIFEST).unlink()
    elif damage == "bad-manifest":
        (newest / mf.MANIFEST).write_text('{"version": 1, "run_id": ')  # half written
    else:
        weights = newest / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    r = run_cli(ws, "train", text_file(tmp_path / "second.jsonl", 8, "s"), "-q")
    assert r.code == 0, r.out + r.err
    assert reason in r.out + r.err
    jobs = {j["file"]: j for j in status(ws)["jobs"]}
    if damage == "foreign":
        assert jobs["second.jsonl"]["start_step"] == 4  # resumed from step-000003 as usual
    else:
        # Fell back to step 2, inside the first job: its last step trains again before the next file.
        assert "using the newest verified checkpoint, step-000002" in r.out + r.err
        assert (jobs["first.jsonl"]["start_step"], jobs["first.jsonl"]["end_step"]) == (1, 3)
        assert jobs["second.jsonl"]["start_step"] == 4
        assert [a["step"] for a in audit(ws)] == [1, 2, 3, 4]
        assert sorted(x for a in audit(ws) if a["job"] == 1 for x in a["lines"]) == list(range(1, 25))
        assert [(r["job"], r["outcome"]) for r in ledger(ws)] == [(1, "lost"), (1, "done"), (2, "done")]
        kept = list((ws / "runs" / run_id / "unusable").glob("step-000003-*[0-9]"))
        assert len(kept) == 1 and "kept for inspection" in r.out + r.err  # moved aside, never deleted
        assert reason.split()[0] in (kept[0].parent / f"{kept[0].name}.reason.txt").read_text()


def test_no_checkpoint_yet_is_a_fresh_run(workspace, tmp_path):
    ws = workspace()
    r = run_cli(ws, "train", text_file(tmp_path / "a.jsonl", 8), "-q")
    assert r.code == 0 and "started run-0001" in r.out


def test_same_dataset_at_another_path_is_recognised_and_resumed(workspace, tmp_path):
    """A job interrupted mid-way; the person moves the file and adds it again from its new place."""
    ws = workspace(training={"save_every": 1})
    original = text_file(tmp_path / "a.jsonl", 40, "a")
    run_cli(ws, "add", original)
    env_kill = {**os.environ, "CONVEYOR_FAILPOINT": "step:3"}  # killed after step 3, checkpoint at 2
    p = subprocess.run([sys.executable, "-m", "conveyor", "-w", str(ws), "run", "--drain", "-q"], env=env_kill,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode < 0
    moved = tmp_path / "moved" / "renamed.jsonl"
    moved.parent.mkdir()
    original.rename(moved)
    r = run_cli(ws, "add", moved)
    assert "same dataset" in r.out + r.err and "no new job" in r.out + r.err
    r = run_cli(ws, "run", "--drain", "-q")
    assert r.code == 0, r.out + r.err
    assert "job 1 resumes at global step 3" in r.out
    assert len(status(ws)["jobs"]) == 1 and status(ws)["run"]["global_step"] == 5
    assert sorted(x for a in audit(ws) for x in a["lines"]) == list(range(1, 41))


def test_disk_full_while_writing_keeps_the_previous_checkpoint(workspace, tmp_path, monkeypatch):
    ws, run_id = _trained(workspace, tmp_path, n=24)
    import torch

    real_save = torch.save

    def full_disk(obj, f, *a, **kw):
        if str(f).endswith(mf.RNG):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", full_disk)
    r = run_cli(ws, "train", text_file(tmp_path / "second.jsonl", 24, "s"), "-q")
    assert r.code == 1
    message = r.out + r.err
    assert "disk full while writing checkpoint step-000004" in message and "MB are free" in message
    assert "needs about" in message and "the previous checkpoint is intact" in message
    folder = ws / "runs" / run_id / "checkpoints"
    assert not list(folder.glob(".tmp-*"))
    newest, problems = ck.newest_verified(ws / "runs" / run_id)
    assert newest.step == 3 and not problems
    monkeypatch.setattr(torch, "save", real_save)
    r = run_cli(ws, "run", "--drain", "-q")  # space is back: the job trains from step 4, nothing lost
    assert r.code == 0, r.out + r.err
    assert status(ws)["run"]["global_step"] == 6
    assert [a["step"] for a in audit(ws)] == [1, 2, 3, 4, 5, 6]


def test_retention_keeps_last_k_and_each_jobs_last(workspace, tmp_path):
    ws = workspace(training={"save_every": 1, "keep_checkpoints": 2})
    run_cli(ws, "train", text_file(tmp_path / "a.jsonl", 40, "a"), text_file(tmp_path / "b.jsonl", 24, "b"), "-q")
    run_id = status(ws)["run"]["id"]
    assert checkpoint_steps(ws, run_id) == [5, 7, 8]  # job a's last (5), then the last two


def test_retention_is_bounded_by_keep_plus_job_ends(workspace, tmp_path):
    ws = workspace(training={"save_every": 1, "keep_checkpoints": 2, "keep_job_ends": 1})
    files = [text_file(tmp_path / f"{tag}.jsonl", 16, tag) for tag in "abc"]  # 2 steps each: ends at 2, 4, 6
    assert run_cli(ws, "train", *files, "-q").code == 0
    run_id = status(ws)["run"]["id"]
    assert checkpoint_steps(ws, run_id) == [2, 4, 5, 6]  # the last two (6 is also the newest job end), and v1, v2
    assert [(ws / f"runs/{run_id}/checkpoints/step-{s:06d}/optimizer.pt").exists() for s in (2, 4, 5, 6)] == [
        False, False, True, True]  # older versions keep their weights, not their optimizer state
    ws2 = workspace("ws2", training={"save_every": 1, "keep_checkpoints": 1, "keep_job_ends": 2})
    assert run_cli(ws2, "train", *files, "-q").code == 0
    assert checkpoint_steps(ws2, status(ws2)["run"]["id"]) == [2, 4, 6]  # every version; 4 and 6 kept whole


def test_each_checkpoint_file_is_hashed_once_when_written_and_not_again_at_the_next_start(
        workspace, tmp_path, monkeypatch):
    from conveyor.store import checkpoints

    hashed: list[str] = []
    real = checkpoints.fingerprint
    monkeypatch.setattr(checkpoints, "fingerprint", lambda path: hashed.append(str(path)) or real(path))
    monkeypatch.setattr(mf, "fingerprint", lambda path: hashed.append("manifest:" + str(path)) or real(path))
    ws = workspace(training={"save_every": 100})
    assert run_cli(ws, "train", text_file(tmp_path / "a.jsonl", 8), "-q").code == 0  # one checkpoint: step 1
    run_id = status(ws)["run"]["id"]
    files = [p for p in (ws / "runs" / run_id / "checkpoints" / "step-000001").iterdir() if p.name != mf.MANIFEST]
    assert sorted(hashed) == sorted(str(p).replace("step-000001", f".tmp-step-000001-{os.getpid()}")
                                    for p in files)  # each file once, in the temporary folder
    hashed.clear()
    assert run_cli(ws, "train", text_file(tmp_path / "b.jsonl", 8, "b"), "-q").code == 0  # resumes from step 1
    assert [h for h in hashed if "step-000001" in h] == []  # trusted: same size and mtime as when hashed


def test_a_change_that_keeps_size_and_mtime_is_found_by_doctor_and_doctor_deep(workspace, tmp_path):
    """Bit rot with the mtime put back: the recorded change time differs, so even the cheap check hashes it."""
    ws, run_id = _trained(workspace, tmp_path, n=24)
    weights = ws / "runs" / run_id / "checkpoints" / "step-000003" / "adapter_model.safetensors"
    st = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # bit rot: same size; the mtime is put back
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    for args in ([], ["--deep"]):
        found = json.loads(run_cli(ws, "doctor", "--json", *args).out)
        assert [f for f in found if f["level"] == "error" and "step-000003" in f["what"] and "sha256" in f["what"]]


def test_numeric_not_string_order(tmp_path):
    for step in (900, 1000):
        (tmp_path / "checkpoints" / ck.folder_name(step)).mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-99").mkdir()
    assert [p.name for p in ck.numbered(tmp_path)] == ["step-99", "step-000900", "step-001000"]


def test_doctor_finds_what_is_wrong_and_says_the_fix(workspace, tmp_path):
    ws, run_id = _trained(workspace, tmp_path)
    r = run_cli(ws, "doctor")
    assert r.code == 0, r.out + r.err
    assert f"{run_id} (active): 2 checkpoint(s) verified, newest step 3" in r.out
    folder = ws / "runs" / run_id / "checkpoints"
    weights = folder / "step-000003" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    shutil.copytree(folder / "step-000002", folder / "checkpoint-7")
    r = run_cli(ws, "doctor", "--json")
    assert r.code == 1
    findings = json.loads(r.out)
    errors = [f for f in findings if f["level"] == "error"]
    assert len(errors) == 1 and "step-000003: adapter_model.safetensors does not match its sha256" in errors[0]["what"]
    assert "falls back" in errors[0]["fix"]
    assert any("checkpoint-7 is not a conveyor checkpoint" in f["what"] for f in findings)
    assert weights.exists()  # doctor only reads


def test_export_adapter_and_merged_model(workspace, tmp_path):
    from transformers import AutoModelForCausalLM

    ws, run_id = _trained(workspace, tmp_path)
    r = run_cli(ws, "export", tmp_path / "adapter")
    assert r.code == 0 and "at global step 3 (step-000003)" in r.out, r.out + r.err
    assert (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (ws / "runs" / run_id / "checkpoints" / "step-000003" / "adapter_model.safetensors").read_bytes()
    assert (tmp_path / "adapter" / "tokenizer.json").exists()
    r = run_cli(ws, "export", tmp_path / "merged", "--merge")
    assert r.code == 0, r.out + r.err
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")  # loads without PEFT
    assert sum(p.numel() for p in merged.parameters()) > 0
    assert run_cli(ws, "export", tmp_path / "merged").code == 1  # never overwrites
