"""manifest: the truth about the weights beside it. It round-trips, a version 1 manifest is upgraded, an unknown
version is refused, and verify names a file that changed or went missing."""

from __future__ import annotations

import json

import pytest

from conveyor.data.plan import Position
from conveyor.fingerprint import fingerprint
from conveyor.store import manifest as mf

IDENTITY = {"model.name": "tiny", "adapter.method": "lora", "adapter.r": 8, "adapter.target_modules": ["q_proj"]}


def _manifest(**changes) -> mf.Manifest:
    job = Position(3, "ab" * 32, examples=24, epochs=2, planned_steps=6, steps_done=4, position=32, start_step=11,
                   segment_start=13, segment_base=2, replay_sources=(1, 2), replay_count=5)
    stopped = Position(2, "cd" * 32, examples=16, epochs=1, planned_steps=2, steps_done=1, position=8, start_step=9,
                       segment_start=9)
    return mf.Manifest(**{"run_id": "run-0002", "global_step": 14, "job": job, "job_end": False, "identity": IDENTITY,
                          "open_jobs": [stopped], "hyperparameters": {"batch_size": 4}, "libraries": {"torch": "x"},
                          "files": {"rng.pt": "00" * 32}, "branched_from": {"run": "run-0001", "version": "v1",
                                                                             "step": 8}, **changes})


def _written(folder, data: dict):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / mf.MANIFEST).write_text(json.dumps(data), encoding="utf-8")
    return folder


def test_a_manifest_round_trips_through_its_file(tmp_path):
    original = _manifest()
    folder = _written(tmp_path / "step-000014", original.to_json())
    back = mf.read(folder)
    assert back == original
    assert back.to_json()[mf.K_VERSION] == mf.VERSION
    assert back.position_of(3) == original.job and back.position_of(2) == original.open_jobs[0]
    assert back.position_of(7) is None
    assert [p.job_id for p in back.under_way()] == [3, 2]
    ended = _manifest(job_end=True, branched_from=None)
    assert mf.read(_written(tmp_path / "end", ended.to_json())) == ended
    assert ended.position_of(3) is None and [p.job_id for p in ended.under_way()] == [2]
    assert mf.K_BRANCHED not in ended.to_json()


def test_a_version_1_manifest_is_upgraded(tmp_path):
    v1 = {mf.K_VERSION: 1, mf.K_RUN: "run-0001", mf.K_STEP: 4, mf.K_IDENTITY: IDENTITY, mf.K_FILES: {},
          mf.K_JOB: {"id": 1, "fingerprint": "ef" * 32, "planned_steps": 6, "steps_done": 4, "position": 16,
                     "start_step": 1}}
    data = mf.read(_written(tmp_path / "step-000004", v1))
    assert (data.run_id, data.global_step, data.job_end, data.open_jobs) == ("run-0001", 4, False, [])
    job = data.job  # one segment per job then; example counts were not recorded (0: unknown)
    assert (job.job_id, job.steps_done, job.position, job.start_step, job.segment_start, job.segment_base,
            job.examples, job.epochs) == (1, 4, 16, 1, 1, 0, 0, 0)


@pytest.mark.parametrize("version", [3, None, "2"])
def test_a_manifest_of_an_unknown_version_is_refused(tmp_path, version):
    data = {**_manifest().to_json(), mf.K_VERSION: version}
    with pytest.raises(ValueError, match=rf"manifest version {version!r} is not supported \(this conveyor reads 1 "
                       rf"and {mf.VERSION}\)"):
        mf.read(_written(tmp_path / "step-000014", data))


def test_an_unreadable_or_incomplete_manifest_says_why(tmp_path):
    with pytest.raises(ValueError, match="no manifest.json"):
        mf.read(tmp_path)
    (tmp_path / mf.MANIFEST).write_text('{"version": 2, "run_id": ')
    with pytest.raises(ValueError, match="manifest.json is unreadable"):
        mf.read(tmp_path)
    data = _manifest().to_json()
    del data[mf.K_FILES]
    with pytest.raises(ValueError, match="manifest.json lacks files"):
        mf.read(_written(tmp_path, data))


def test_verify_names_a_file_that_changed_or_is_missing(tmp_path):
    folder = tmp_path / "step-000014"
    folder.mkdir()
    for name, content in (("adapter_model.safetensors", b"weights"), (mf.OPTIMIZER, b"moments")):
        (folder / name).write_bytes(content)
    files = {name: fingerprint(folder / name) for name in ("adapter_model.safetensors", mf.OPTIMIZER)}
    _written(folder, _manifest(files=files).to_json())
    assert mf.verify(folder).files == files
    (folder / mf.OPTIMIZER).write_bytes(b"momentz")  # same size, other bytes
    with pytest.raises(ValueError, match="optimizer.pt does not match its sha256 in the manifest"):
        mf.verify(folder)
    (folder / mf.OPTIMIZER).write_bytes(b"moments")
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(ValueError, match="adapter_model.safetensors is missing"):
        mf.verify(folder)
