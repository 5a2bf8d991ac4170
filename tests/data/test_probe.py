"""The probe's prompts as eval.probe chooses them, and its kept base answers verified by their sha256."""

from __future__ import annotations

import json

import pytest

from conveyor.data import probe as probes
from conveyor.errors import ConveyorError


def test_the_setting_chooses_the_prompts(tmp_path):
    general = probes.read(probes.BUILT_IN)
    assert len(general) == 36 and "What is the capital of France?" in general
    assert probes.choose("auto", tmp_path, "smollm2-135m-instruct", chat=True) == (general, "the built-in general set")
    assert probes.choose("auto", tmp_path, "tiny", chat=True) is None  # random weights: nothing to keep
    assert probes.choose("auto", tmp_path, "/models/base-llm", chat=False) is None
    assert probes.choose("general", tmp_path, "tiny", chat=True)[0] == general
    assert probes.choose("", tmp_path, "smollm2-135m-instruct", chat=True) is None
    (tmp_path / "mine.jsonl").write_text('{"prompt": "Who are you?"}\n\n{"prompt": "Name a colour."}\n')
    assert probes.choose("mine.jsonl", tmp_path, "tiny", chat=True) == (["Who are you?", "Name a colour."],
                                                                        "mine.jsonl")


@pytest.mark.parametrize("text, says", [
    ('{"prompt": "ok"}\n{"prompt": "unclosed\n', "line 2: not JSON"),
    ('{"prompt": "ok"}\n{"question": "x"}\n', 'line 2: needs a non-empty "prompt" string'),
    ('{"prompt": "  "}\n', 'line 1: needs a non-empty "prompt" string'),
    ("\n\n", "holds no prompts"),
])
def test_a_bad_probe_file_is_named_with_its_line(tmp_path, text, says):
    (tmp_path / "p.jsonl").write_text(text)
    with pytest.raises(ConveyorError, match=f"eval.probe: {tmp_path / 'p.jsonl'}, {says}" if "line" in says
                       else says):
        probes.choose("p.jsonl", tmp_path, "tiny", chat=True)


def test_a_missing_probe_file_says_what_to_give(tmp_path):
    with pytest.raises(ConveyorError, match=r"cannot read .*nope.jsonl.*\"general\" for the built-in set"):
        probes.choose("nope.jsonl", tmp_path, "tiny", chat=True)


def test_kept_answers_are_verified_and_keyed_by_prompts_base_and_length(tmp_path):
    identity = {"model.name": "tiny", "model.weights_hash": "ab", "adapter.r": 8}
    key = probes.key(["a?", "b?"], identity, 32)
    assert key == probes.key(["a?", "b?"], {**identity, "adapter.r": 16}, 32)  # the adapter is not the base
    assert len({key, probes.key(["a?"], identity, 32), probes.key(["a?", "b?"], identity, 16),
                probes.key(["a?", "b?"], {**identity, "model.weights_hash": "cd"}, 32)}) == 4
    probe = probes.Probe(["a?", "b?"], "test", key, tmp_path / "probe")
    assert probes.load(probe) is None
    probes.save(probe, ["yes", "no"])
    assert probes.load(probe) == ["yes", "no"] and not list(probe.folder.glob("*.tmp"))
    data = json.loads(probe.path.read_text())
    data["answers"][1] = "maybe"
    probe.path.write_text(json.dumps(data))
    with pytest.raises(probes.AlteredProbe, match=f"{key}.json no longer holds the answers written there"):
        probes.load(probe)
