"""benchmarks/preference.py: without TRL it says how to install it and exits 0, an unknown model or too few pairs
are refused, its pairs are fixed, the held-out score loads an adapter and scores it as conveyor's own function does,
the token check sees a missing BOS, and the table shows each side's figures. The slow test trains both sides on
`small` (it needs TRL)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "preference.py"


def _bench():
    spec = importlib.util.spec_from_file_location("preference_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_trl_it_says_how_to_install_it_and_exits_0_and_an_unknown_model_is_refused():
    ok = subprocess.run([sys.executable, str(SCRIPT), "--model", "smollm2-135m-instruct", "--trl-python",
                         "/nonexistent/python"], capture_output=True, text=True, timeout=60, check=False)
    assert ok.returncode == 0 and "TRL is not installed" in ok.stdout and "pip install" in ok.stdout, \
        ok.stdout + ok.stderr
    bad = subprocess.run([sys.executable, str(SCRIPT), "--model", "huge"], capture_output=True, text=True,
                         timeout=60, check=False)
    assert bad.returncode == 2 and "smollm2-135m-instruct" in bad.stderr
    few = subprocess.run([sys.executable, str(SCRIPT), "--pairs", "3"], capture_output=True, text=True, timeout=60,
                         check=False)
    assert few.returncode == 2 and "--pairs 3: from 4" in few.stderr


def test_the_pairs_are_the_same_on_every_run_and_each_prefers_the_helpful_answer():
    bench = _bench()
    first, again = bench.pairs(40), bench.pairs(40)
    assert first == again and len({p["prompt"] for p in first}) == 40
    helpful = {t.split(" ")[0] for t in bench.HELPFUL}
    for p in first:
        assert p["prompt"].startswith("Request: ") and p["prompt"].endswith("\nReply:")
        assert p["chosen"].split(" ")[1] in helpful and p["chosen"] != p["rejected"]
    with pytest.raises(SystemExit, match="at most 144"):
        bench.pairs(145)


def _held_out(bench, tmp_path: Path, tiny_dir: Path):
    data = tmp_path / "pairs.jsonl"
    bench.write_pairs(data, 6)
    examples, tokenizer = bench.tokenized(data, tiny_dir)
    return [examples[line] for line in sorted(examples)], tokenizer


def _by_hand(model, e) -> float:
    """chosen minus rejected summed log-probability of the answer tokens, computed here without conveyor's code."""
    total = 0.0
    for ids, labels, sign in ((e.input_ids, e.labels, 1), (e.rejected_ids, e.rejected_labels, -1)):
        with torch.no_grad():
            logps = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
        total += sign * sum(float(logps[k - 1, ids[k]]) for k in range(1, len(ids)) if labels[k] != -100)
    return total


def test_the_held_out_score_loads_an_adapter_onto_the_base_and_scores_it_as_by_hand(tmp_path, tiny_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    bench = _bench()
    held, tokenizer = _held_out(bench, tmp_path, tiny_dir)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32).eval()
    margins = [_by_hand(base, e) for e in held]
    accuracy, margin = bench.held_out_preference(tiny_dir, None, held, tokenizer.pad_token_id, batch_size=4)
    assert accuracy == sum(m > 0 for m in margins) / len(held)
    assert margin == pytest.approx(sum(margins) / len(held), abs=1e-3)

    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for name, weight in model.named_parameters():
        if "lora_B" in name:  # a fresh adapter changes nothing: give it weights
            weight.data.normal_(0, 0.5)
    model.save_pretrained(tmp_path / "adapter")
    model.eval()
    trained = [_by_hand(model, e) for e in held]
    assert max(abs(a - b) for a, b in zip(trained, margins)) > 0.1  # the adapter moves the margins
    accuracy, margin = bench.held_out_preference(tiny_dir, tmp_path / "adapter", held, tokenizer.pad_token_id)
    assert accuracy == sum(m > 0 for m in trained) / len(held)
    assert margin == pytest.approx(sum(trained) / len(held), abs=1e-3)


def test_trls_tokens_match_conveyors_only_with_the_bos_text_in_front_of_the_prompt(tmp_path, tiny_dir):
    """TRL tokenizes a prompt alone and prompt + answer + EOS with a plain tokenizer call, the answer being where
    they part (trl/trainer/dpo_trainer.py, tokenize_fn); the tiny model's tokenizer adds no BOS of its own."""
    bench = _bench()
    held, tokenizer = _held_out(bench, tmp_path, tiny_dir)
    records = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    examples = {e.line: e for e in held}
    order = [3, 1, 2, 1]  # any order, a pair more than once

    def trl_rows(bos: str) -> list:
        rows = []
        for line in order:
            r = records[line - 1]
            prompt = tokenizer(bos + r["prompt"])["input_ids"]
            rows.append([prompt] + [tokenizer(bos + r["prompt"] + r[k] + tokenizer.eos_token)["input_ids"]
                                    [len(prompt):] for k in ("chosen", "rejected")])
        return rows

    assert bench.bos_text(tokenizer) == tokenizer.bos_token == "<|bos|>"
    assert bench.same_tokens(examples, order, trl_rows(bench.bos_text(tokenizer))) == 0
    assert bench.same_tokens(examples, order, trl_rows("")) == len(order)
    assert bench.same_tokens(examples, order, trl_rows(bench.bos_text(tokenizer))[:-1]) == len(order)


def test_the_table_shows_each_sides_steps_time_memory_scores_and_final_loss(capsys):
    bench = _bench()
    side = {"steps": 24, "wall": 58.2, "cpu": 39.3, "rss": 980.4, "after": (0.875, 40.2), "losses": [0.693, 0.0427]}
    bench.report([{"name": "conveyor", **side}, {"name": "TRL", **side, "rss": 1083.0, "after": (0.8125, -1.5)}],
                 (0.5625, 9.09), 16)
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("side"))
    assert header.split() == ["side", "steps", "wall", "s", "CPU", "s", "peak", "RSS", "MB", "held-out", "pref.",
                              "before", "after", "mean", "margin", "after", "final", "train", "loss"]
    rows = {line.split()[0]: line.split() for line in lines if line.split()[:1] in (["conveyor"], ["TRL"])
            and "%" in line}
    assert rows["conveyor"] == ["conveyor", "24", "58.2", "39.3", "980", "56%", "88%", "+40.20", "0.0427"]
    assert rows["TRL"] == ["TRL", "24", "58.2", "39.3", "1,083", "56%", "81%", "-1.50", "0.0427"]
    assert any(line.startswith("held-out pairs: 16; the base model's mean margin +9.09") for line in lines)
    assert "TRL training loss per step: 0.693 0.043" in lines


def _trl_python() -> str | None:
    """A Python that has TRL: $CONVEYOR_TRL_PYTHON, this one, or the venv of its own that docs/benchmarks.md uses."""
    for python in (os.environ.get("CONVEYOR_TRL_PYTHON"), sys.executable,
                   str(SCRIPT.parent.parent.parent / "peer-venv" / "bin" / "python")):
        if python and Path(python).exists() and subprocess.run(
                [python, "-c", "import trl, datasets"], capture_output=True, check=False).returncode == 0:
            return python
    return None


@pytest.mark.slow
def test_both_sides_train_the_same_batches_on_small_and_learn_the_held_out_pairs():
    python = _trl_python()
    if python is None:
        pytest.skip("needs TRL: see benchmarks/peer.py's docstring (or set CONVEYOR_TRL_PYTHON)")
    p = subprocess.run([sys.executable, str(SCRIPT), "--pairs", "32", "--epochs", "3", "--trl-python", python],
                       capture_output=True, text=True, timeout=1200, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = p.stdout.splitlines()
    rows = {line.split()[0]: line.split() for line in lines if line.split()[:1] in (["conveyor"], ["TRL"])
            and "%" in line}
    # 32 pairs, 8 held out: 24 trained, 3 steps of 8 an epoch, 3 epochs.
    assert rows["conveyor"][1] == rows["TRL"][1] == "9"
    for row in rows.values():
        before, after = int(row[5].rstrip("%")), int(row[6].rstrip("%"))
        assert after > before, p.stdout
    assert "tokens and loss positions: the same on both sides" in p.stdout
    losses = {side: [float(x) for x in next(line for line in lines if line.startswith(f"{side} training loss"))
                     .split(": ")[1].split()] for side in ("conveyor", "TRL")}
    assert max(abs(a - b) for a, b in zip(losses["conveyor"], losses["TRL"])) < 0.01, p.stdout
    own = next(line for line in lines if line.startswith("conveyor's own held-out preference"))
    assert own.split("set_evals): ")[1].split()[0] == own.split("this script: ")[1].rstrip(")"), own
