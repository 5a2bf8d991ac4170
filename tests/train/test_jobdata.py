"""conveyor/train/jobdata.py called directly: a job's verified stored copy and its tokenized data, held-out lines
left out, the replay pool and the jobs of a run's lineage."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from conftest import drain_with_requests, make_workspace, run_cli, text_file

from conveyor.config import Config
from conveyor.data.chat import load_tokenizer, template_id
from conveyor.errors import StoredDataError
from conveyor.fingerprint import FileHashes, fingerprint
from conveyor.store import jobs
from conveyor.store.runs import tokenizer_hash
from conveyor.store.workspace import Workspace
from conveyor.train import jobdata

SETTINGS = {"training": {"batch_size": 2, "grad_accum": 1, "learning_rate": 1e-3, "save_every": 1, "max_length": 64},
            "eval": {"holdout": 2}}


@pytest.fixture(scope="module")
def lineage(tmp_path_factory, tiny_dir) -> Path:
    """run-0001: job 1 (a, 12 examples) stops after step 2, job 2 (b, high) trains step 3 (v1), job 1 ends at
    step 6, job 3 (c) trains step 7. Rolled back to v1 with --requeue: run-0002 trains job 4 (a again, from its
    step 3: steps 4-6), job 5 (c again, step 7) and job 6 (d, one example, nothing held out, step 8). Every job
    with two or more examples holds 2 out."""
    root = tmp_path_factory.mktemp("lineage")
    ws = make_workspace(root / "ws", tiny_dir, **SETTINGS)
    assert run_cli(ws, "add", text_file(root / "a.jsonl", 12, "a")).code == 0
    assert drain_with_requests(ws, "stop@2").code == 75
    assert run_cli(ws, "add", text_file(root / "b.jsonl", 4, "b"), "--priority", "high").code == 0
    assert run_cli(ws, "run", "--drain", "-q").code == 0
    assert run_cli(ws, "train", text_file(root / "c.jsonl", 4, "c"), "-q").code == 0
    r = run_cli(ws, "rollback", "v1", "--requeue")
    assert r.code == 0, r.out + r.err
    assert run_cli(ws, "train", text_file(root / "d.jsonl", 1, "d"), "-q").code == 0
    return ws


@pytest.fixture(scope="module")
def opened(lineage) -> tuple[Workspace, Config, str]:
    ws = Workspace.open(lineage)
    config = ws.config()
    return ws, config, ws.model_path(config.model.name)


def _job(ws: Workspace, job_id: int) -> jobs.Job:
    return jobs.get(ws.db, job_id)


def _lines(data) -> list[int]:
    return [int(e.line) for e in data.examples]


def test_the_fixture_is_the_lineage_the_tests_rely_on(opened):
    """Jobs, runs and steps as the fixture's docstring says."""
    ws, _, _ = opened
    assert [(j.id, j.file, j.run_id, j.state.value, j.start_step, j.end_step, len(j.holdout)) for j in
            jobs.all_jobs(ws.db)] == [
        (1, "a.jsonl", "run-0001", "done", 1, 6, 2), (2, "b.jsonl", "run-0001", "done", 3, 3, 2),
        (3, "c.jsonl", "run-0001", "done", 7, 7, 2), (4, "a.jsonl", "run-0002", "done", 1, 6, 2),
        (5, "c.jsonl", "run-0002", "done", 7, 7, 2), (6, "d.jsonl", "run-0002", "done", 8, 8, 0)]


def test_lineage_jobs_follow_a_rollback_up_to_the_step_it_branched_from(opened):
    """run-0002 sees its parent's jobs begun (ended=True: finished) by the branch step, then its own."""
    ws, _, _ = opened

    def ids(run: str, where: str = "1 = 1", ended: bool = False) -> list[int]:
        return [j.id for j in jobdata.lineage_jobs(ws.db, run, where, ended)]

    # v1 is step 3: jobs 1 (steps 1-6) and 2 (step 3) had begun, job 3 (step 7) not; job 1 had not ended
    assert ids("run-0002") == [1, 2, 4, 5, 6]
    assert ids("run-0002", ended=True) == [2, 4, 5, 6]
    assert ids("run-0001") == [1, 2, 3] == ids("run-0001", ended=True)
    assert ids("run-0002", "file = 'c.jsonl'") == [5]
    assert ids("run-0009") == []


def test_replay_sources_are_the_done_jobs_of_the_lineage_but_the_job_itself(opened):
    """What a job may replay: done jobs of its run and of the parent up to the branch, never itself."""
    ws, _, _ = opened
    assert jobdata.replay_sources(ws.db, "run-0002", 6) == [2, 4, 5]
    assert jobdata.replay_sources(ws.db, "run-0002", 4) == [2, 5, 6]
    assert jobdata.replay_sources(ws.db, "run-0002", 99) == [2, 4, 5, 6]
    assert jobdata.replay_sources(ws.db, "run-0001", 3) == [1, 2]


def test_replay_sources_leave_out_jobs_that_are_not_done(workspace, tmp_path):
    """A job stopped mid-way is no replay source until it is done."""
    ws = workspace(training={"save_every": 1})
    assert run_cli(ws, "add", text_file(tmp_path / "a.jsonl", 16, "a")).code == 0
    assert drain_with_requests(ws, "stop@1").code == 75
    db = Workspace.open(ws).db
    assert jobs.get(db, 1).state == jobs.JobState.INTERRUPTED
    assert jobdata.replay_sources(db, "run-0001", 2) == []
    assert jobdata.lineage_jobs(db, "run-0001", "1 = 1")[0].id == 1


def test_held_out_jobs_are_one_set_per_file_and_holdout_along_the_lineage(opened):
    """Job 4 (a queued again) holds out job 1's lines: one set; job 6 holds out nothing; job 3 is past the branch."""
    ws, _, _ = opened
    assert _job(ws, 4).holdout == _job(ws, 1).holdout
    assert [j.id for j in jobdata.held_out_jobs(ws.db, "run-0002")] == [1, 2, 5]
    assert [j.id for j in jobdata.held_out_jobs(ws.db, "run-0001")] == [1, 2, 3]


def test_trained_data_leaves_out_the_held_out_lines(opened):
    """job_data holds every line of the file; trained_data all but the held-out ones."""
    ws, config, model = opened
    job = _job(ws, 1)
    assert _lines(jobdata.job_data(ws, job, config, model)) == list(range(1, 13))
    trained = jobdata.trained_data(ws, job, config, model)
    assert _lines(trained) == [n for n in range(1, 13) if n not in job.holdout]
    assert len(trained.examples) == 10 == job.examples
    d = _job(ws, 6)
    assert _lines(jobdata.trained_data(ws, d, config, model)) == [1]


def test_replay_pool_draws_each_trained_example_of_its_sources_once(opened):
    """The pool holds each trained (never held-out) example of its sources once; no sources, no pool."""
    ws, config, model = opened
    pool = jobdata.replay_pool(ws, config, model, [2, 5], _job(ws, 6).fingerprint)
    expected = {(j, n) for j in (2, 5) for n in range(1, 5) if n not in _job(ws, j).holdout}
    assert pool.size == len(expected) == 4
    assert {(job_id, int(example.line)) for job_id, example in (pool[i] for i in range(pool.size))} == expected
    assert jobdata.replay_pool(ws, config, model, [], _job(ws, 6).fingerprint) is None


# ---- the stored copy, verified


@pytest.fixture
def queued(workspace, tmp_path) -> tuple[Workspace, jobs.Job, Path]:
    """A workspace with one queued job, added from a folder whose name has a space."""
    ws = workspace()
    source = text_file(tmp_path / "my data" / "a.jsonl", 8, "a")
    assert run_cli(ws, "add", source).code == 0
    opened = Workspace.open(ws)
    return opened, jobs.get(opened.db, 1), source


def test_a_verified_copy_is_the_stored_file(queued):
    """The stored copy holding the added bytes is returned as it is."""
    ws, job, source = queued
    assert jobdata.verified_copy(job, FileHashes(ws.data)) == Path(job.stored) == ws.data / f"{job.fingerprint}.jsonl"
    assert Path(job.stored).read_bytes() == source.read_bytes()


def test_a_stored_copy_with_other_bytes_is_refused_naming_the_file_and_the_fix(queued):
    """Changed bytes: StoredDataError naming the copy, its size and hash, and the `conveyor add` that restores it."""
    ws, job, source = queued
    stored = Path(job.stored)
    stored.write_bytes(stored.read_bytes() + b'{"text": "one more"}\n')
    now = fingerprint(stored)
    with pytest.raises(StoredDataError) as e:
        jobdata.verified_copy(job, FileHashes(ws.data))
    assert str(e.value) == (
        f"the stored copy data/{job.fingerprint}.jsonl of job 1 (a.jsonl) now holds {stored.stat().st_size} bytes "
        f"with sha256 {now[:12]}… instead of {job.fingerprint[:12]}…; nothing is trained from it. Add the original "
        f"file again with `conveyor add '{source.resolve()}'`: the copy is restored and every job that stopped for it "
        "goes back in the queue (one stopped mid-way resumes from its own position). Or leave it: a job that stopped "
        "for it stays failed, out of the queue, and the others go on")
    config = ws.config()
    with pytest.raises(StoredDataError, match="now holds"):
        jobdata.job_data(ws, job, config, ws.model_path(config.model.name))
    assert not (ws.data / "tokenized").exists() or not any((ws.data / "tokenized").iterdir())  # nothing tokenized


def test_a_missing_stored_copy_is_named_missing(queued):
    """A deleted copy: `is missing`, through job_data too."""
    ws, job, _ = queued
    Path(job.stored).unlink()
    config = ws.config()
    with pytest.raises(StoredDataError) as e:
        jobdata.job_data(ws, job, config, ws.model_path(config.model.name))
    assert str(e.value).startswith(f"the stored copy data/{job.fingerprint}.jsonl of job 1 (a.jsonl) is missing; "
                                   "nothing is trained from it.")


def test_copy_problem_says_what_is_wrong_or_nothing():
    """None for the right bytes; the size and both short hashes for others; missing; unreadable."""
    def unreadable(path):
        raise PermissionError(13, "Permission denied")

    assert jobdata.copy_problem(Path("/x"), "f" * 64, lambda p: "f" * 64) is None
    here = Path(__file__)
    assert jobdata.copy_problem(here, "f" * 64, lambda p: "a" * 64) == (
        f"now holds {here.stat().st_size} bytes with sha256 {'a' * 12}… instead of {'f' * 12}…")
    assert jobdata.copy_problem(Path("/nonexistent/x.jsonl"), "f" * 64, fingerprint) == "is missing"
    assert jobdata.copy_problem(here, "f" * 64, unreadable) == "cannot be read (Permission denied)"


def test_a_change_that_keeps_size_and_mtime_is_found_by_the_cache_and_by_a_full_hash(queued):
    """FileHashes records the change time and inode with each hash: an edit with its mtime put back is hashed
    again and refused (StoredDataError), as copy_problem's full hash finds it."""
    ws, job, _ = queued
    stored = Path(job.stored)
    hashes = FileHashes(ws.data)
    jobdata.verified_copy(job, hashes)
    hashes.save()
    st = stored.stat()
    stored.write_bytes(stored.read_bytes().replace(b"a 3: the quick", b"a 3: the quack"))
    os.utime(stored, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(StoredDataError):
        jobdata.verified_copy(job, FileHashes(ws.data))
    assert jobdata.copy_problem(stored, job.fingerprint, fingerprint).startswith(f"now holds {st.st_size} bytes")


def test_a_damaged_tokenized_array_is_rebuilt_with_a_warning_on_the_job(queued):
    """Arrays are derived: one that fails its hash is rebuilt from the verified copy, and the job says so."""
    ws, job, _ = queued
    config = ws.config()
    model = ws.model_path(config.model.name)
    first = jobdata.job_data(ws, job, config, model)
    ids = [list(e.input_ids) for e in first.examples]  # read now: the arrays are memory-mapped
    [folder] = [p for p in (ws.data / "tokenized").iterdir() if not p.name.startswith(".")]
    (folder / "ids.bin").write_bytes(b"\0" * 7)
    again = jobdata.job_data(ws, job, config, model)
    assert _lines(again) == list(range(1, 9)) and [list(e.input_ids) for e in again.examples] == ids
    [warning] = jobs.get(ws.db, 1).warnings
    assert f"{folder.name}/ids.bin" in warning and warning.endswith(
        f"these tokenized arrays are derived data: never trained as they are, rebuilt from the stored copy "
        f"{job.fingerprint}.jsonl")
    events = [r["message"] for r in ws.db.execute("SELECT message FROM events WHERE level = 'warning'")]
    assert events == [f"job 1 (a.jsonl): {warning}"]


# ---- data_key


def test_data_key_is_content_tokenizer_and_template(queued, tmp_path):
    """The key names the content, the tokenizer's files (a hub id by its name), the chat template in use and
    max_length."""
    ws, job, _ = queued
    config = ws.config()
    model = ws.model_path(config.model.name)
    tok = load_tokenizer(model)
    key = jobdata.data_key(ws, job, config, model, tok)
    length = config.training.max_length
    assert key == f"{job.fingerprint}:{tokenizer_hash(model)}:{template_id(tok)}:{length}"
    assert jobdata.data_key(ws, job, config, model) == key  # the tokenizer loaded by itself: the same one
    assert jobdata.data_key(ws, job, config, "some-org/some-model", tok) == \
        f"{job.fingerprint}:some-org/some-model:{template_id(tok)}:{length}"

    other = tmp_path / "other-tokenizer"
    shutil.copytree(model, other)
    with open(other / "tokenizer_config.json", "a", encoding="utf-8") as f:
        f.write("\n")  # the same tokenizer, other bytes: the key follows the files
    changed = jobdata.data_key(ws, job, config, str(other), tok)
    assert changed != key and changed.split(":")[::2] == key.split(":")[::2]

    templated = load_tokenizer(model)
    templated.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    by_template = jobdata.data_key(ws, job, config, model, templated)
    assert by_template != key and by_template.split(":")[:2] == key.split(":")[:2]

    (ws.root / "template.jinja").write_text(templated.chat_template, encoding="utf-8")
    config.data.chat_template = "template.jinja"  # data.chat_template: the tokenizer loaded with it
    assert jobdata.data_key(ws, job, config, model) == by_template


def test_data_key_changes_with_max_length_as_its_docstring_says(queued):
    """`What the job's tokenized examples depend on: ... max_length`: another max_length, another key."""
    ws, job, _ = queued
    config = ws.config()
    model = ws.model_path(config.model.name)
    tok = load_tokenizer(model)
    shorter = config.model_copy(deep=True)
    shorter.training.max_length = 16
    assert jobdata.data_key(ws, job, config, model, tok) != jobdata.data_key(ws, job, shorter, model, tok)
