"""`conveyor export OUT --gguf`: one GGUF file and an Ollama Modelfile, read back through transformers' GGUF loader
and compared with the model before the export is reported done; what it cannot map is refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli, text_file

from conveyor.errors import ConveyorError
from conveyor.serve import gguf_export
from conveyor.store.workspace import Workspace

pytest.importorskip("gguf")


@pytest.fixture
def lora_trained(workspace, tmp_path):
    ws = workspace()
    r = run_cli(ws, "train", text_file(tmp_path / "a.jsonl", 16, "a"), "-q")
    assert r.code == 0, r.out + r.err
    return ws


def _logits(model, ids):
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


def test_f32_round_trip_is_exact_and_comes_with_a_modelfile(lora_trained, tmp_path):
    from transformers import AutoModelForCausalLM

    ws = lora_trained
    merged, out = tmp_path / "merged", tmp_path / "gguf"
    assert run_cli(ws, "export", merged, "--merge").code == 0
    r = run_cli(ws, "export", out, "--gguf", "--quant", "f32")
    assert r.code == 0, r.out + r.err
    assert "largest logit difference 0," in r.out and "same top token at 100.0%" in r.out
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "conveyor-export.json", "gguf-f32.gguf"]
    record = json.loads((out / "conveyor-export.json").read_text())
    assert (record["global_step"], record["merged"]) == (2, True)  # 16 lines / (4 × 2)
    assert record["gguf"] | {"tolerance": None} == {
        "file": "gguf-f32.gguf", "quant": "f32", "tensors": 21, "max_logit_difference": 0.0, "top1_agreement": 1.0,
        "tokenizer_identical_on_probe": True, "tolerance": None, "agreement_required": 1.0}

    # Read back here too, beside the merged folder: every logit the same, bit for bit.
    back = AutoModelForCausalLM.from_pretrained(out, gguf_file="gguf-f32.gguf")
    plain = AutoModelForCausalLM.from_pretrained(merged)
    ids = list(range(7, 40))
    assert bool((_logits(back, ids) == _logits(plain, ids)).all())
    modelfile = (out / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./gguf-f32.gguf\n") and 'PARAMETER stop "<|eos|>"' in modelfile


@pytest.mark.parametrize("quant", ["f16", "bf16", "q8_0"])
def test_smaller_types_stay_within_their_stated_tolerance(lora_trained, tmp_path, quant):
    out = tmp_path / quant
    r = run_cli(lora_trained, "export", out, "--gguf", "--quant", quant)
    assert r.code == 0, r.out + r.err
    shown = json.loads((out / "conveyor-export.json").read_text())["gguf"]
    assert 0 < shown["max_logit_difference"] <= gguf_export.TOLERANCE[quant]
    assert shown["top1_agreement"] >= gguf_export.AGREEMENT[quant]
    f32 = tmp_path / "f32"
    assert run_cli(lora_trained, "export", f32, "--gguf", "--quant", "f32").code == 0
    assert (out / f"{quant}-{quant}.gguf").stat().st_size < 0.6 * (f32 / "f32-f32.gguf").stat().st_size


def test_a_read_back_that_does_not_match_exports_nothing(lora_trained, tmp_path, monkeypatch):
    """The comparison is what stops a wrong file: with the rotary rows left in Hugging Face's order, the file loads
    but answers differently, and export refuses it and leaves no folder behind."""
    from conveyor.serve.export import export

    monkeypatch.setattr(gguf_export, "_permute", lambda weights, heads: weights)
    out = tmp_path / "wrong"
    with pytest.raises(ConveyorError, match=r"does not match the model: largest logit difference .* nothing was "):
        export(Workspace.open(lora_trained), out, merge=False, run_id=None, gguf="f32")
    assert not out.exists() and not list(tmp_path.glob(".wrong.tmp-*"))


@pytest.mark.parametrize("args, says", [
    (["--quant", "f16"], "--quant chooses the GGUF tensor type; add --gguf"),
    (["--gguf", "--quant", "q4_k"], "'q4_k': choose one of f32, f16, bf16, q8_0"),
])
def test_quant_mistakes_are_usage_errors(lora_trained, tmp_path, args, says):
    r = run_cli(lora_trained, "export", tmp_path / "x", *args)
    assert r.code == 2 and says in " ".join((r.out + r.err).split()), r.out + r.err
    assert not (tmp_path / "x").exists()


def _folder(tmp_path: Path, config: dict, tokenizer: dict | None = None) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], **config}))
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer or {
        "model": {"type": "BPE"}, "decoder": {"type": "ByteLevel"},
        "pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}))
    return folder


@pytest.mark.parametrize("config, tokenizer, says", [
    ({"architectures": ["Gemma2ForCausalLM"]}, None, "maps the LlamaForCausalLM architecture to GGUF, not Gemma2"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0}}, None, "rope scaling (rope_type = 'llama3')"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, None, "rope scaling (rope_type = 'linear')"),
    ({"attention_bias": True}, None, "attention biases (attention_bias = True)"),
    ({}, {"model": {"type": "Unigram"}, "decoder": {"type": "Metaspace"}},
     "is 'Unigram' with a 'Metaspace' decoder; conveyor maps byte-level BPE tokenizers only"),
    ({}, {"model": {"type": "BPE"}, "decoder": {"type": "ByteLevel"},
          "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "x"}}}, "(['Split']) has no llama.cpp name"),
])
def test_what_it_cannot_map_is_refused_by_name(tmp_path, config, tokenizer, says):
    with pytest.raises(ConveyorError) as e:
        gguf_export.check_mappable(_folder(tmp_path, config, tokenizer), "f16")
    assert says in str(e.value)


@pytest.mark.parametrize("pre, name", [
    ({"type": "ByteLevel", "use_regex": True}, "gpt-2"),
    ({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                            {"type": "ByteLevel", "use_regex": True}]}, "smollm"),
    ({"type": "ByteLevel", "use_regex": False}, "default"),
])
def test_pre_tokenizers_it_knows_get_llama_cpp_names(tmp_path, pre, name):
    folder = _folder(tmp_path, {}, {"model": {"type": "BPE"}, "decoder": {"type": "ByteLevel"}, "pre_tokenizer": pre})
    assert gguf_export._pre_tokenizer(folder) == name


def test_permute_pairs_each_heads_rotary_halves():
    import numpy as np

    # 2 heads of 4 rows: [a0 a1 | b0 b1] per head becomes [a0 b0 a1 b1]
    rows = np.arange(8).reshape(8, 1)
    assert gguf_export._permute(rows, 2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_without_the_gguf_package_it_says_what_to_install(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` raises ImportError
    with pytest.raises(ConveyorError, match=r"--gguf needs the gguf package: pip install gguf"):
        gguf_export.check_mappable(_folder(tmp_path, {}), "f16")
