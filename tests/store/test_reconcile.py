"""reconcile: before training, the database is made to agree with the newest verified checkpoint (the manifests
are the truth): steps after it are lost and train again, a job under way there stands where its manifest says, a
job that finished after it reopens, and a changed identity starts a new run without touching the old one."""

from __future__ import annotations

import pytest
from conftest import run_cli, set_setting, status, text_file

from conveyor.config import Config
from conveyor.data.plan import fresh
from conveyor.store import checkpoints as ck
from conveyor.store import jobs, runs
from conveyor.store import manifest as mf
from conveyor.store.jobs import JobState
from conveyor.store.reconcile import place
from conveyor.store.workspace import Workspace


@pytest.fixture
def ws(tmp_path, tiny_dir):
    import shutil

    ws = Workspace.create(tmp_path / "ws", Config())
    shutil.copytree(tiny_dir, ws.models / "tiny")
    return ws


def _said():
    out = []
    return out, lambda level, text: out.append((level, text))


def _job(ws, name: str) -> jobs.Job:
    return jobs.insert(ws.db, file=name, source=name, stored=name, fingerprint=name * 4, priority=1,
                       state=JobState.QUEUED, examples=8, epochs=1)


def _checkpoint(ws, run, step: int, pos, job_end: bool, open_jobs=()) -> None:
    manifest = mf.Manifest(run.id, step, pos, job_end, run.identity, list(open_jobs))
    ck.write(ws.run_dir(run.id), step, lambda folder: (folder / "weights.bin").write_bytes(bytes([step])), manifest,
             keep=10, job_ends=10)


def test_steps_after_the_newest_checkpoint_train_again_from_where_its_manifest_says(ws):
    config = Config()
    model = ws.model_path("tiny")
    run = runs.create(ws.db, runs.identity(config, model))
    a, b = _job(ws, "a"), _job(ws, "b")
    pos_a = fresh(a.id, a.fingerprint, 8, 1).begin_segment(0, 2)  # 4 steps at global 1-4
    _checkpoint(ws, run, 2, pos_a.after_step(2).after_step(2), job_end=False)
    # The database ran ahead of the checkpoints: a finished at 4, b trained steps 5-6 (a crash lost them all).
    jobs.update(ws.db, a.id, state="done", run_id=run.id, start_step=1, end_step=4, steps_done=4, planned_steps=4)
    jobs.update(ws.db, b.id, state="running", run_id=run.id, start_step=5, end_step=8, steps_done=2, claim="x")
    runs.set_step(ws.db, run.id, 6)
    said, say = _said()
    placed = place(ws, config, model, say)
    assert (placed.run.id, placed.step) == (run.id, 2)
    a, b = jobs.get(ws.db, a.id), jobs.get(ws.db, b.id)
    assert (a.state, a.steps_done, a.position, a.start_step) == (JobState.INTERRUPTED, 2, 4, 1)
    assert (b.state, b.steps_done, b.run_id, b.start_step) == (JobState.QUEUED, 0, None, None)
    assert runs.active(ws.db).global_step == 2
    assert any("reopens at its step 3" in text for _, text in said)
    assert any("trains again from its first example" in text for _, text in said)


def test_a_finished_job_whose_record_was_lost_is_recorded_done(ws):
    config = Config()
    model = ws.model_path("tiny")
    run = runs.create(ws.db, runs.identity(config, model))
    a = _job(ws, "a")
    pos = fresh(a.id, a.fingerprint, 8, 1).begin_segment(0, 4)
    _checkpoint(ws, run, 2, pos.after_step(4).after_step(4), job_end=True)
    jobs.update(ws.db, a.id, state="running", run_id=run.id, start_step=1, end_step=2, segment_start=1, claim="x")
    said, say = _said()
    place(ws, config, model, say)
    assert jobs.get(ws.db, a.id).state == JobState.DONE
    assert [r["step"] for r in ws.db.execute("SELECT step FROM versions")] == [2]  # its version
    assert any("recorded as done" in text for _, text in said)


def test_a_changed_identity_starts_a_new_run_and_leaves_the_old_one_untouched(ws):
    config = Config()
    model = ws.model_path("tiny")
    run = runs.create(ws.db, runs.identity(config, model))
    a = _job(ws, "a")
    pos = fresh(a.id, a.fingerprint, 8, 1).begin_segment(0, 2).after_step(2)
    _checkpoint(ws, run, 1, pos, job_end=False)
    jobs.update(ws.db, a.id, state="interrupted", run_id=run.id, start_step=1, steps_done=1, position=2)
    runs.set_step(ws.db, run.id, 1)
    before = sorted(p.name for p in ws.run_dir(run.id).rglob("*"))
    config.adapter.r = 4
    said, say = _said()
    placed = place(ws, config, model, say)
    assert (placed.run.id, placed.step, placed.resume) == ("run-0002", 0, None)
    assert sorted(p.name for p in ws.run_dir(run.id).rglob("*")) == before
    a = jobs.get(ws.db, a.id)
    assert (a.state, a.steps_done, a.run_id) == (JobState.QUEUED, 0, None)
    assert any("adapter.r: 8 → 4" in text for _, text in said)
    assert [(r.id, r.active) for r in runs.all_runs(ws.db)] == [("run-0001", False), ("run-0002", True)]


def test_settings_changed_back_continue_the_run_they_trained_not_a_new_one(workspace, tmp_path):
    """float32 trains a (run-0001, steps 1–2); bfloat16 starts run-0002 for b; float32 again: c continues run-0001
    from its newest checkpoint (steps 3–4), saying so; no third run."""
    ws = workspace()
    assert run_cli(ws, "train", text_file(tmp_path / "a.jsonl", 16, "a"), "-q").code == 0
    set_setting(ws, "model", "precision", '"bfloat16"')
    assert run_cli(ws, "train", text_file(tmp_path / "b.jsonl", 16, "b"), "-q").code == 0
    set_setting(ws, "model", "precision", '"float32"')
    r = run_cli(ws, "train", text_file(tmp_path / "c.jsonl", 16, "c"))
    assert r.code == 0, r.out + r.err
    assert "it matches run-0001, which continues from its newest checkpoint, step-000002; run-0002 is kept" \
        in r.out + r.err
    now = status(ws)
    assert [(x["id"], x["global_step"]) for x in now["runs"]] == [("run-0001", 4), ("run-0002", 2)]
    assert now["run"]["id"] == "run-0001"
    assert [(j["file"], j["run_id"], j["start_step"], j["end_step"]) for j in now["jobs"]] == \
        [("a.jsonl", "run-0001", 1, 2), ("b.jsonl", "run-0002", 1, 2), ("c.jsonl", "run-0001", 3, 4)]
