"""Retention never deletes a version's weights unless a setting says so (law 6): older job ends lose their optimizer
state only, recorded in their manifest, and stay exportable, tryable and a rollback's starting point."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import adapter_weights, checkpoint_steps, max_abs_diff, run_cli, status, text_file

from conveyor.data.plan import Position
from conveyor.fingerprint import fingerprint
from conveyor.store import checkpoints as ck
from conveyor.store import manifest as mf


def _versions(ws) -> list[dict]:
    r = run_cli(ws, "versions", "--json")
    assert r.code == 0, r.out + r.err
    return json.loads(r.out)


def _events(ws) -> str:
    from conveyor.store.workspace import Workspace

    return "\n".join(r["message"] for r in Workspace(ws).db.execute("SELECT message FROM events ORDER BY id"))


@pytest.mark.slow
def test_six_jobs_with_default_retention_keep_every_versions_adapter(workspace, tmp_path):
    ws = workspace()  # keep_checkpoints = 3, keep_job_ends = 3 (the defaults); save_every = 2
    v1 = None
    for n, tag in enumerate("abcdef"):  # 24 examples: 3 steps a job, ends at 3, 6, 9, 12, 15, 18
        assert run_cli(ws, "train", text_file(tmp_path / f"{tag}.jsonl", 24, tag), "-q").code == 0
        if n == 0:  # v1 as written, before any retention touched it
            v1_folder = ws / "runs/run-0001/checkpoints/step-000003"
            v1 = adapter_weights(v1_folder), fingerprint(v1_folder / "adapter_model.safetensors")
    assert checkpoint_steps(ws, "run-0001") == [3, 6, 9, 12, 15, 16, 18]  # every version, and the last 3
    got = _versions(ws)
    assert [(v["version"], v["step"], v["weights"], v["optimizer"]) for v in got] == [
        ("v1", 3, "kept", "pruned"), ("v2", 6, "kept", "pruned"), ("v3", 9, "kept", "pruned"),
        ("v4", 12, "kept", "kept"), ("v5", 15, "kept", "kept"), ("v6", 18, "kept", "kept")]
    table = run_cli(ws, "versions").out
    assert "pruned" in table and "training.keep_job_ends" in table

    # v1's checkpoint: the optimizer state went (recorded, why and by which setting); the rest verifies.
    manifest = mf.verify(v1_folder)
    assert [(r["files"], r["by"]) for r in manifest.pruned] == [(["optimizer.pt"], "training.keep_job_ends")]
    assert sorted(p.name for p in v1_folder.iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "manifest.json", "rng.pt", "scheduler.pt"]
    assert fingerprint(v1_folder / "adapter_model.safetensors") == v1[1]

    # export --version v1: the adapter exactly as v1 was trained, and it loads.
    r = run_cli(ws, "export", tmp_path / "v1-out", "--version", "v1")
    assert r.code == 0 and "exported the adapter of v1 (run-0001, global step 3, step-000003)" in r.out, r.out + r.err
    assert max_abs_diff(adapter_weights(tmp_path / "v1-out"), v1[0]) == 0.0
    from conveyor.serve.export import load_trained

    identity = json.loads((tmp_path / "v1-out/conveyor-export.json").read_text())["identity"]
    model = load_trained(identity, str(ws / "models/tiny"), tmp_path / "v1-out")
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) > 0

    r = run_cli(ws, "generate", "the quick", "--version", "v1", "--max-new-tokens", "4", "--json")
    assert r.code == 0 and json.loads(r.out)["version"] == "v1", r.out + r.err

    # rollback v1, then a drain: the new run trains on from v1's weights with fresh moments, and says so.
    r = run_cli(ws, "rollback", "v1")
    assert r.code == 0 and "run-0002 branches from v1" in r.out, r.out + r.err
    assert run_cli(ws, "add", text_file(tmp_path / "g.jsonl", 24, "g")).code == 0
    r = run_cli(ws, "run", "--drain", "-q")
    assert r.code == 0, r.out + r.err
    said = ("step-000003 of run-0002 (a copy of v1 of run-0001) has no optimizer state: optimizer state pruned by "
            "retention (training.keep_job_ends). The optimizer moments start from zero at step 4")
    assert said in _events(ws)
    assert status(ws)["run"]["id"] == "run-0002" and status(ws)["run"]["global_step"] == 6
    assert checkpoint_steps(ws, "run-0002") == [3, 4, 6]
    last = _versions(ws)[-1]
    assert [last[k] for k in ("version", "run", "job", "step", "weights", "optimizer")] == [
        "v7", "run-0002", 7, 6, "kept", "kept"]

    # A version folder deleted by hand is named as such, never "no manifest".
    shutil.rmtree(ws / "runs/run-0001/checkpoints/step-000006")
    assert _versions(ws)[1]["weights"] == "missing"
    for args in (["export", tmp_path / "v2-out", "--version", "v2"], ["rollback", "v2"],
                 ["generate", "hi", "--version", "v2"], ["pin", "v2"]):
        r = run_cli(ws, *args)
        assert r.code != 0 and "v2's checkpoint step-000006 is missing from runs/run-0001/checkpoints (deleted " \
            "outside conveyor?)" in r.err and "no manifest" not in r.err, (args, r.out + r.err)


@pytest.mark.slow
def test_a_pinned_version_keeps_its_optimizer_state(workspace, tmp_path):
    ws = workspace(training={"keep_checkpoints": 1, "keep_job_ends": 0})
    assert run_cli(ws, "train", text_file(tmp_path / "a.jsonl", 16, "a"), "-q").code == 0  # v1 at step 2
    assert run_cli(ws, "pin", "v1").code == 0
    for tag in "bc":  # v2 at 4, v3 at 6
        assert run_cli(ws, "train", text_file(tmp_path / f"{tag}.jsonl", 16, tag), "-q").code == 0
    assert [(v["version"], v["optimizer"]) for v in _versions(ws)] == [("v1", "kept"), ("v2", "pruned"),
                                                                       ("v3", "kept")]
    r = run_cli(ws, "pin", "v2")
    assert r.code == 0 and "optimizer state was already pruned by retention (training.keep_job_ends)" in r.out


def _full(workspace, name: str, **training):
    return workspace(name, adapter={"method": "full"},
                     training={"keep_checkpoints": 1, "keep_job_ends": 1, **training})


@pytest.mark.parametrize("prune", [pytest.param(False, marks=pytest.mark.slow), True],
                         ids=["weights-kept", "prune_version_weights"])
def test_a_full_fine_tune_prunes_a_versions_weights_only_when_a_setting_says_so(workspace, tmp_path, prune):
    ws = _full(workspace, "full", prune_version_weights=prune)
    files = [text_file(tmp_path / f"{tag}.jsonl", 16, tag) for tag in "abc"]  # 2 steps each: ends at 2, 4, 6
    assert run_cli(ws, "train", *files, "-q").code == 0
    assert checkpoint_steps(ws, "run-0001") == [2, 4, 6]
    v1 = ws / "runs/run-0001/checkpoints/step-000002"
    if not prune:  # the weights stay; only the optimizer state of v1 and v2 went
        assert [(v["weights"], v["optimizer"]) for v in _versions(ws)] == [("kept", "pruned")] * 2 + [
            ("kept", "kept")]
        assert (v1 / "model.safetensors").is_file() and not (v1 / "optimizer.pt").exists()
        r = run_cli(ws, "export", tmp_path / "out", "--version", "v1")
        assert r.code == 0 and "exported the model of v1" in r.out, r.out + r.err
        r = run_cli(ws, "rollback", "v1")
        assert r.code == 0, r.out + r.err
        assert run_cli(ws, "add", text_file(tmp_path / "d.jsonl", 16, "d")).code == 0
        assert run_cli(ws, "run", "--drain", "-q").code == 0
        assert status(ws)["run"]["global_step"] == 4 and "optimizer state pruned by retention" in _events(ws)
        return
    # training.prune_version_weights: v1 and v2 keep their manifest only, and every command says so.
    assert [(v["weights"], v["optimizer"]) for v in _versions(ws)] == [("pruned", "pruned")] * 2 + [
        ("kept", "kept")]
    assert sorted(p.name for p in v1.iterdir()) == ["manifest.json"]
    assert mf.verify(v1).weights_pruned == "training.prune_version_weights"
    assert "training.prune_version_weights" in run_cli(ws, "versions").out
    for args in (["export", tmp_path / "out", "--version", "v1"], ["rollback", "v1"],
                 ["generate", "hi", "--version", "v1"], ["pin", "v2"]):
        r = run_cli(ws, *args)
        version = "v2" if "v2" in args else "v1"
        assert r.code != 0 and f"{version}'s weights were pruned by retention (training.prune_version_weights)" \
            in r.err and "no manifest" not in r.err, (args, r.out + r.err)
    assert run_cli(ws, "export", tmp_path / "v3", "--version", "v3").code == 0
    assert run_cli(ws, "add", text_file(tmp_path / "d.jsonl", 16, "d")).code == 0  # trains on from step 6
    assert run_cli(ws, "run", "--drain", "-q").code == 0 and status(ws)["run"]["global_step"] == 8


# Retention on synthetic checkpoint folders ---------------------------------------------------------------------

def _write(run_dir, step: int, job_end: bool, method: str = "lora", **retention):
    def save(folder):
        weights = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
        (folder / weights).write_bytes(b"w" * 64 + bytes([step]))
        for name in (mf.OPTIMIZER, mf.SCHEDULER, mf.RNG):
            (folder / name).write_bytes(name.encode() + bytes([step]))

    pos = Position(job_id=step, fingerprint="f", examples=8, epochs=1, planned_steps=1, steps_done=1, position=8,
                   start_step=step, segment_start=step)
    content = mf.Manifest(run_id="run-0001", global_step=step, job=pos, job_end=job_end,
                          identity={"adapter.method": method})
    return ck.write(run_dir, step, save, content, retention.get("keep", 1), retention.get("job_ends", 1),
                    retention.get("prune_weights", False))


def test_prune_rewrites_the_manifest_before_deleting_so_a_crash_between_leaves_a_verifiable_checkpoint(
        tmp_path, monkeypatch):
    run_dir = tmp_path / "run-0001"
    _write(run_dir, 1, job_end=False)
    _write(run_dir, 2, job_end=True)
    _write(run_dir, 3, job_end=False)
    assert [p.name for p in ck.numbered(run_dir)] == ["step-000002", "step-000003"]  # 1 went; 2 is the newest end

    def power_cut(name, step):  # the process dies right after the manifest rewrite, before any delete
        if name == "checkpoint-pruned":
            raise KeyboardInterrupt(f"{name}:{step}")

    monkeypatch.setattr(ck, "failpoint", power_cut)
    with pytest.raises(KeyboardInterrupt, match="checkpoint-pruned:2"):
        _write(run_dir, 4, job_end=True)  # step 2 is now an older version: its optimizer state goes
    v1 = run_dir / "checkpoints/step-000002"
    manifest = mf.verify(v1)  # verifiable: optimizer.pt is still there, but no longer listed
    assert (v1 / mf.OPTIMIZER).exists() and mf.OPTIMIZER not in manifest.files
    assert manifest.optimizer_pruned == "training.keep_job_ends" and not manifest.weights_pruned
    assert sorted(manifest.files) == ["adapter_model.safetensors", "rng.pt", "scheduler.pt"]
    newest, problems = ck.newest_verified(run_dir)
    assert newest.step == 4 and not problems

    monkeypatch.undo()
    _write(run_dir, 5, job_end=False)  # the next retention finishes the cut-off prune
    assert not (v1 / mf.OPTIMIZER).exists() and len(mf.verify(v1).pruned) == 1
    assert [p.name for p in ck.numbered(run_dir)] == ["step-000002", "step-000004", "step-000005"]


def test_prune_of_a_full_fine_tunes_weights_leaves_its_manifest_which_is_never_resumed(tmp_path):
    run_dir = tmp_path / "run-0001"
    for step in (1, 2, 3):
        _write(run_dir, step, job_end=True, method="full", prune_weights=True)
    for step in (1, 2):
        folder = run_dir / f"checkpoints/step-00000{step}"
        assert sorted(p.name for p in folder.iterdir()) == ["manifest.json"]
        assert mf.verify(folder).weights_pruned == "training.prune_version_weights"
    shutil.rmtree(run_dir / "checkpoints/step-000003")  # the newest gone: nothing left to resume from
    assert ck.newest_verified(run_dir) == (None, [])  # the pruned versions are no checkpoint, and no problem


def test_space_needed_counts_the_version_a_job_adds(tmp_path):
    run_dir = tmp_path / "run-0001"
    _write(run_dir, 1, job_end=True, method="full")
    whole = ck.estimate_size(run_dir)
    optimizer = (run_dir / "checkpoints/step-000001" / mf.OPTIMIZER).stat().st_size
    assert ck.estimate_version_size(run_dir) == whole - optimizer
    assert ck.estimate_version_size(run_dir, prune_weights=True) == (
        run_dir / "checkpoints/step-000001" / mf.MANIFEST).stat().st_size
    assert ck.space_needed(run_dir, 1, 1, 0) == whole * 2 + whole - optimizer  # 1 + 1 + 1 - 1 held, + v
