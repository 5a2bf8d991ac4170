"""Law 4 under tampering, through the real CLI: a stored copy (data/<sha256>.jsonl) or a tokenized array that no
longer matches its hash is never trained. An altered or deleted copy stops its job with a message naming the file
(never a crash loop) until the original is added again, which puts the job back where it stood; altered arrays
are rebuilt from the verified copy, and the run ends with an uninterrupted run's weights (law 3)."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from collections import Counter
from pathlib import Path

import pytest
from conftest import adapter_weights, audit, drain_with_requests, ledger, max_abs_diff, run_cli, status, text_file

SETTINGS = {"training": {"batch_size": 2, "grad_accum": 2, "save_every": 2, "max_length": 48,
                          "learning_rate": 1e-3}}  # 4 examples a step; the same for the `workspace` fixture
A, B = 24, 16  # lines: a trains 6 steps, b 4


def _files(folder: Path) -> tuple[Path, Path]:
    return text_file(folder / "a.jsonl", A, "a"), text_file(folder / "b.jsonl", B, "b")


def _stored(ws: Path, job_id: int) -> Path:
    return ws / "data" / f"{_job(ws, job_id)['fingerprint']}.jsonl"


def _job(ws: Path, job_id: int) -> dict:
    return next(j for j in status(ws)["jobs"] if j["id"] == job_id)


def _weights(ws: Path, step: int) -> dict:
    return adapter_weights(ws / "runs" / status(ws)["run"]["id"] / "checkpoints" / f"step-{step:06d}")


def _events(ws: Path) -> list[tuple[str, str]]:
    con = sqlite3.connect(ws / "conveyor.db", timeout=30)
    try:
        return [(kind, message) for kind, message in con.execute("SELECT kind, message FROM events ORDER BY id")]
    finally:
        con.close()


def _alter(path: Path, keep_mtime: bool = False) -> None:
    """Flip one byte in the middle (same size); put the mtime back or move it on."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    else:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))


def _lines_once(ws: Path, job_id: int, n: int) -> None:
    seen = Counter(line for r in audit(ws) if r["job"] == job_id for line in r["lines"])
    assert seen == Counter(range(1, n + 1))


@pytest.fixture(scope="module")
def b_then_a(tmp_path_factory, tiny_dir):
    """Weights of an untouched run that trains b (steps 1-4), then a (5-10)."""
    from conftest import make_workspace

    root = tmp_path_factory.mktemp("reference")
    ws = make_workspace(root / "ws", tiny_dir, **SETTINGS)
    a, b = _files(root / "in")
    assert run_cli(ws, "train", b, a, "-q").code == 0
    return _weights(ws, 10)


@pytest.fixture(scope="module")
def a_alone(tmp_path_factory, tiny_dir):
    """Weights of an uninterrupted run of a alone (steps 1-6)."""
    from conftest import make_workspace

    root = tmp_path_factory.mktemp("reference-a")
    ws = make_workspace(root / "ws", tiny_dir, **SETTINGS)
    a, _ = _files(root / "in")
    assert run_cli(ws, "train", a, "-q").code == 0
    return _weights(ws, 6)


def test_a_stored_copy_changed_while_its_job_waits_stops_that_job_and_the_original_brings_it_back(
        workspace, tmp_path, b_then_a):
    ws = workspace(**SETTINGS)
    a, b = _files(tmp_path / "in")
    assert run_cli(ws, "add", a, b).code == 0
    copy = _stored(ws, 1)
    text = copy.read_text()
    copy.write_text(text.replace("a 3: the quick", "a 3: the quack"))  # still valid JSONL, same size
    r = run_cli(ws, "run", "--drain", "-q")
    assert r.code == 1  # a job failed; the daemon went on with the next one
    fp = _job(ws, 1)["fingerprint"]
    job = _job(ws, 1)
    assert job["state"] == "failed" and job["error"].startswith(f"the stored copy data/{fp}.jsonl of job 1 (a.jsonl) "
                                                                f"now holds {len(text)} bytes with sha256 ")
    assert f"instead of {fp[:12]}…; nothing is trained from it. Add the original file again with `conveyor add " \
           f"{a.resolve()}`" in job["error"]
    assert f"job 1 failed: the stored copy data/{fp}.jsonl" in r.out + r.err
    assert (job["steps_done"], job["deaths"]) == (0, 0)
    assert [(row["job"], row["start_step"], row["end_step"]) for row in ledger(ws)] == [(2, 1, 4)]
    assert {row["job"] for row in audit(ws)} == {2} and status(ws)["run"]["global_step"] == 4

    r = run_cli(ws, "add", a)  # the original bytes again
    assert r.code == 0, r.out + r.err
    assert f"data/{fp}.jsonl held {len(text)} bytes with sha256" in r.out + r.err
    assert "job 1 (a.jsonl), which had stopped for data/" in r.out + r.err and "is back in the queue, queued" in r.err
    assert "no new job: a.jsonl continues as job 1 (queued)" in r.out
    assert copy.read_bytes() == a.read_bytes() and len(status(ws)["jobs"]) == 2
    assert run_cli(ws, "run", "--drain", "-q").code == 0
    job = _job(ws, 1)
    assert (job["state"], job["start_step"], job["end_step"], job["error"]) == ("done", 5, 10, None)
    _lines_once(ws, 1, A)
    assert max_abs_diff(_weights(ws, 10), b_then_a) <= 1e-6


def test_a_deleted_stored_copy_is_named_missing_not_a_worker_death(workspace, tmp_path):
    ws = workspace(**SETTINGS)
    a, b = _files(tmp_path / "in")
    assert run_cli(ws, "add", a, b).code == 0
    fp = _job(ws, 1)["fingerprint"]
    _stored(ws, 1).unlink()
    r = run_cli(ws, "run", "--drain", "-q")
    assert r.code == 1
    job = _job(ws, 1)
    assert job["state"] == "failed" and (job["deaths"], job["attempts"]) == (0, 0)
    assert job["error"].startswith(f"the stored copy data/{fp}.jsonl of job 1 (a.jsonl) is missing; nothing is "
                                   "trained from it. Add the original file again with `conveyor add")
    assert "died" not in r.out + r.err and not [e for e in _events(ws) if e[0] in ("death", "crash")]
    assert _job(ws, 2)["state"] == "done"
    r = run_cli(ws, "add", a)
    assert r.code == 0 and f"data/{fp}.jsonl was missing; a.jsonl restores it" in r.err
    assert run_cli(ws, "run", "--drain", "-q").code == 0
    assert (_job(ws, 1)["state"], _job(ws, 1)["start_step"], _job(ws, 1)["end_step"]) == ("done", 5, 10)


@pytest.mark.slow
def test_a_queued_job_whose_copy_is_restored_before_it_starts_keeps_its_place(workspace, tmp_path):
    """`conveyor doctor` says to add the original again: that restores the copy and adds no second job."""
    ws = workspace(**SETTINGS)
    a, b = _files(tmp_path / "in")
    assert run_cli(ws, "add", a, b).code == 0
    _stored(ws, 1).unlink()
    r = run_cli(ws, "doctor", "--json")
    assert r.code == 1
    fp = _job(ws, 1)["fingerprint"]
    [found] = [f for f in json.loads(r.out) if f["level"] == "error"]
    assert found["what"] == f"job 1 (a.jsonl, queued): its stored copy data/{fp}.jsonl is missing"
    assert found["fix"].startswith(f"add the original again: `conveyor add {a.resolve()}` restores the copy before "
                                   "job 1 starts (it keeps its place), or `conveyor queue remove 1`")
    r = run_cli(ws, "add", a)
    assert r.code == 0 and "no new job: a.jsonl continues as job 1 (queued)" in r.out
    assert [j["id"] for j in status(ws)["jobs"]] == [1, 2]
    assert run_cli(ws, "run", "--drain", "-q").code == 0
    assert [(j["id"], j["state"], j["start_step"]) for j in status(ws)["jobs"]] == [(1, "done", 1), (2, "done", 7)]


@pytest.mark.slow
def test_a_job_stopped_mid_way_does_not_resume_on_changed_bytes_and_resumes_from_its_position_when_restored(
        workspace, tmp_path):
    ws = workspace(**SETTINGS)
    a, b = _files(tmp_path / "in")
    assert run_cli(ws, "add", a, b).code == 0
    drain_with_requests(ws, "stop@3")  # ends with the job waiting: the state below is what counts
    assert (_job(ws, 1)["state"], _job(ws, 1)["steps_done"]) == ("interrupted", 3)
    copy = _stored(ws, 1)
    copy.write_bytes(copy.read_bytes() + b'{"text": "an extra line"}\n')
    r = run_cli(ws, "run", "--drain", "-q")
    assert r.code == 1
    fp = _job(ws, 1)["fingerprint"]
    assert f"job 1 failed: the stored copy data/{fp}.jsonl of job 1 (a.jsonl) now holds" in r.out + r.err
    assert (_job(ws, 1)["state"], _job(ws, 1)["steps_done"]) == ("failed", 3)
    assert [(j["state"], j["start_step"], j["end_step"]) for j in status(ws)["jobs"][1:]] == [("done", 4, 7)]
    r = run_cli(ws, "add", a)
    assert r.code == 0, r.out + r.err
    assert "is back in the queue, interrupted: it resumes at its step 4 of 6" in r.err
    r = run_cli(ws, "run", "--drain", "-q")
    assert r.code == 0, r.out + r.err
    assert "job 1 resumes at global step 8" in r.out + r.err
    rows = audit(ws)
    assert [row["step"] for row in rows] == list(range(1, 11))
    assert [row["job"] for row in rows] == [1] * 3 + [2] * 4 + [1] * 3
    _lines_once(ws, 1, A)
    _lines_once(ws, 2, B)
    assert [(row["job"], row["start_step"], row["end_step"], row["outcome"]) for row in ledger(ws)] == \
        [(1, 1, 3, "interrupted"), (2, 4, 7, "done"), (1, 8, 10, "done")]


@pytest.mark.slow
def test_a_job_whose_replay_source_lost_its_stored_copy_stops_and_comes_back_when_the_source_is_added(
        workspace, tmp_path):
    """Job b replays (and scores the held-out set of) done job a; a's stored copy is gone: b stops, naming it,
    before a step; adding a's original restores the copy and puts b back, no new job for a."""
    ws = workspace(**SETTINGS, replay={"fraction": 0.25}, eval={"holdout": 2})
    a, b = _files(tmp_path / "in")
    assert run_cli(ws, "train", a, "-q").code == 0
    fp = _job(ws, 1)["fingerprint"]
    _stored(ws, 1).unlink()
    r = run_cli(ws, "train", b, "-q")
    assert r.code == 1
    assert f"job 2 failed: the stored copy data/{fp}.jsonl of job 1 (a.jsonl) is missing" in r.out + r.err
    assert (_job(ws, 2)["state"], _job(ws, 2)["steps_done"]) == ("failed", 0)
    assert {row["job"] for row in audit(ws)} == {1} and status(ws)["run"]["global_step"] == 6  # a: 22 trained
    r = run_cli(ws, "add", a)
    assert r.code == 0 and "job 2 (b.jsonl), which had stopped for data/" in r.err
    assert [(j["id"], j["state"]) for j in status(ws)["jobs"]] == [(1, "done"), (2, "queued")]
    assert run_cli(ws, "run", "--drain", "-q").code == 0
    rows = [row for row in audit(ws) if row["job"] == 2]
    assert _job(ws, 2)["state"] == "done" and sum(len(row.get("replay", [])) for row in rows) > 0


def _stopped_mid_way(workspace, tmp_path) -> tuple[Path, Path]:
    """Job a stopped after its step 3; its tokenized folder (kept for the resume)."""
    ws = workspace(**SETTINGS)
    a, _ = _files(tmp_path / "in")
    assert run_cli(ws, "add", a).code == 0
    drain_with_requests(ws, "stop@3")  # ends with the job waiting: the state below is what counts
    assert (_job(ws, 1)["state"], _job(ws, 1)["steps_done"]) == ("interrupted", 3)
    [folder] = [p for p in (ws / "data" / "tokenized").iterdir() if not p.name.startswith(".")]
    return ws, folder


# ids.bin in the default run; the other two arrays take the same path (slow: a stopped run each).
ARRAYS = ["ids.bin", pytest.param("mask.bin", marks=pytest.mark.slow), pytest.param("index.bin", marks=pytest.mark.slow)]


@pytest.mark.parametrize("array", ARRAYS)
@pytest.mark.parametrize("how", ["changed", "changed, mtime kept", "deleted"])
def test_a_tokenized_array_changed_while_stopped_is_rebuilt_from_the_verified_copy(
        workspace, tmp_path, a_alone, array, how):
    """An interrupted job's array edited (even with its mtime put back by os.utime) or deleted: rebuilt from the
    verified stored copy, and the job ends with an uninterrupted run's weights."""
    ws, folder = _stopped_mid_way(workspace, tmp_path)
    target = folder / array
    _alter(target, keep_mtime=how.endswith("kept")) if how.startswith("changed") else target.unlink()
    r = run_cli(ws, "run", "--drain", "-q")
    assert r.code == 0, r.out + r.err
    problem = f"{array} is missing" if how == "deleted" else f"{array} no longer matches its sha256"
    warning = (f"data/tokenized/{folder.name}/{problem}")
    job = _job(ws, 1)
    assert [w for w in job["warnings"] if w.startswith(warning) and "rebuilt from the stored copy" in w], job
    assert any(warning in message for _, message in _events(ws))
    assert (job["state"], job["start_step"], job["end_step"]) == ("done", 1, 6)
    _lines_once(ws, 1, A)
    assert max_abs_diff(_weights(ws, 6), a_alone) <= 1e-6


@pytest.mark.parametrize("array", ARRAYS)
def test_an_array_changed_with_size_and_mtime_kept_is_found_by_doctor(workspace, tmp_path, a_alone, array):
    """Its change time is not the one recorded with its hash, so the cheap check hashes it again and names it, as
    `doctor --deep` does; the fix (delete the derived folder) gives the run an uninterrupted run's weights."""
    ws, folder = _stopped_mid_way(workspace, tmp_path)
    _alter(folder / array, keep_mtime=True)
    quick = run_cli(ws, "doctor", "--json")
    deep = run_cli(ws, "doctor", "--json", "--deep")
    assert quick.code == deep.code == 1
    assert [f for f in json.loads(quick.out) if f["level"] == "error"] == \
        [f for f in json.loads(deep.out) if f["level"] == "error"]
    [found] = [f for f in json.loads(deep.out) if f["level"] == "error"]
    assert found["what"].startswith(f"data/tokenized/{folder.name}/{array} no longer matches its sha256")
    assert found["fix"].startswith(f"delete data/tokenized/{folder.name}: it is derived data, rebuilt")
    shutil.rmtree(folder)
    assert run_cli(ws, "run", "--drain", "-q").code == 0
    _lines_once(ws, 1, A)
    assert max_abs_diff(_weights(ws, 6), a_alone) <= 1e-6


@pytest.mark.parametrize("deep", [False, True])
def test_doctor_names_an_altered_stored_copy_and_an_altered_tokenized_array(workspace, tmp_path, deep):
    """Edits that keep size and modification time (os.utime) are found by the cheap check too (the change time
    and inode are recorded with each hash), and by --deep; both are errors (exit 1)."""
    ws, folder = _stopped_mid_way(workspace, tmp_path)
    fp = _job(ws, 1)["fingerprint"]
    copy = ws / "data" / f"{fp}.jsonl"
    _alter(copy, keep_mtime=True)
    _alter(folder / "ids.bin", keep_mtime=True)
    r = run_cli(ws, "doctor", "--json", *(["--deep"] if deep else []))
    assert r.code == 1
    errors = [f for f in json.loads(r.out) if f["level"] == "error"]
    assert [f["what"].split(" now holds")[0] for f in errors[:1]] == \
        [f"job 1 (a.jsonl, interrupted): its stored copy data/{fp}.jsonl"]
    assert errors[0]["what"].endswith(f"bytes with sha256 {errors[0]['what'].split('sha256 ')[1][:12]}… instead of "
                                      f"{fp[:12]}…")
    assert "`conveyor queue remove 1`" in errors[0]["fix"]
    assert errors[1]["what"].startswith(f"data/tokenized/{folder.name}/ids.bin no longer matches its sha256")
    assert len(errors) == 2
    assert (folder / "ids.bin").exists()  # doctor only reads


@pytest.mark.slow
def test_checking_unchanged_data_costs_a_stat(workspace, tmp_path, monkeypatch):
    """Once hashed (the stored copy when added, the arrays when written), a job's start reads none of them."""
    from conveyor import fingerprint as fingerprint_module

    ws, _ = _stopped_mid_way(workspace, tmp_path)
    hashed: list[str] = []
    real = fingerprint_module.fingerprint
    monkeypatch.setattr(fingerprint_module, "fingerprint", lambda path: hashed.append(str(path)) or real(path))
    assert run_cli(ws, "run", "--drain", "-q").code == 0
    assert [h for h in hashed if "/data/" in h] == []
    assert _job(ws, 1)["state"] == "done"


def test_a_kept_held_out_set_changed_behind_conveyors_back_is_rebuilt_not_scored(workspace, tmp_path):
    """data/holdout/job-1-*.json (job 1's held-out examples, scored at every later evaluation) with a token changed:
    job 2's evaluations do not score the changed examples but the ones rebuilt from job 1's verified stored copy,
    said once; the losses equal an untouched run's."""
    a, b = _files(tmp_path)
    settings = {**SETTINGS, "eval": {"holdout": 2}}
    runs = {}
    for name in ("untouched", "changed"):
        ws = workspace(name, **settings)
        assert run_cli(ws, "train", a, "-q").code == 0
        if name == "changed":
            (kept,) = (ws / "data" / "holdout").glob("job-1-*.json")
            data = json.loads(kept.read_text())
            data["examples"][0]["input_ids"][1] += 1  # still valid JSON and token ids; the sha256 no longer fits
            kept.write_text(json.dumps(data))
        r = run_cli(ws, "train", b, "-q")
        assert r.code == 0, r.out + r.err
        con = sqlite3.connect(ws / "conveyor.db")
        runs[name] = con.execute("SELECT step, loss FROM set_evals WHERE name = 'job 1' ORDER BY step").fetchall()
        con.close()
        said = [m for kind, m in _events(ws) if "held-out set: data/holdout/job-1-" in m]
        assert len(said) == (name == "changed"), said
    assert said[0].endswith("does not match the sha256 written with it (changed since); it is rebuilt from the job's "
                            "stored copy, so its scores stay those of the examples held out"), said
    assert runs["changed"] == runs["untouched"] and len(runs["changed"]) >= 2
    kept_now = json.loads(next((ws / "data" / "holdout").glob("job-1-*.json")).read_text())
    assert kept_now["examples"][0]["input_ids"] != data["examples"][0]["input_ids"]  # written again, as held out


def test_a_done_jobs_copy_edited_with_its_mtime_put_back_is_not_trained_again_after_a_rollback(workspace, tmp_path):
    """a then b trained; b's stored copy edited in place with size and mtime kept (os.utime); `rollback v1
    --requeue` queues b again: it fails naming the copy rather than train the altered bytes."""
    ws = workspace(**SETTINGS)
    a, b = _files(tmp_path / "in")
    assert run_cli(ws, "train", a, b, "-q").code == 0
    copy = _stored(ws, 2)
    _alter(copy, keep_mtime=True)
    assert run_cli(ws, "rollback", "v1", "--requeue").code == 0
    r = run_cli(ws, "run", "--drain", "-q")
    assert r.code == 1, r.out + r.err
    fp = _job(ws, 2)["fingerprint"]
    assert f"the stored copy data/{fp}.jsonl of job 3 (b.jsonl) now holds" in r.out + r.err
    assert _job(ws, 3)["state"] == "failed" and _job(ws, 3)["steps_done"] == 0
    assert not (ws / "runs" / "run-0002" / "checkpoints" / "step-000007").exists()
