"""The Trainer glue's bookkeeping around the loop: what a step's recorded time covers, the garbage collector
left alone during training and given back afterwards, and logits computed only where labels are, with the same loss,
gradients and weights as all of them."""

from __future__ import annotations

import gc
import json
import sqlite3
import time

import pytest
import torch
from conftest import adapter_weights, max_abs_diff, run_cli, text_file

from conveyor.data.chat import load_tokenizer
from conveyor.data.formats import IGNORE
from conveyor.train import trainer


class _Clock:
    """trainer.py's `time`, with a perf_counter that jumps when told to: a setup that took "an hour", no waiting."""

    def __init__(self):
        self.offset = 0.0

    def perf_counter(self) -> float:
        return time.perf_counter() + self.offset

    def __getattr__(self, name):
        return getattr(time, name)


def test_a_steps_time_covers_the_loop_not_the_trainers_setup(workspace, tmp_path, monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(trainer, "time", clock)
    restore = trainer.restore_optimizer

    def slow_setup(*a, **kw):  # the last setup before the loop starts
        clock.offset += 3600.0
        return restore(*a, **kw)

    monkeypatch.setattr(trainer, "restore_optimizer", slow_setup)
    ws = workspace()
    assert run_cli(ws, "train", text_file(tmp_path / "a.jsonl", 16), "-q").code == 0
    con = sqlite3.connect(ws / "conveyor.db")
    times = [t for (t,) in con.execute("SELECT step_time FROM metrics ORDER BY step")]
    con.close()
    assert len(times) == 2 and all(0 <= t < 3600 for t in times), times


def test_the_collector_leaves_training_alone_and_is_given_back_after(workspace, tmp_path, monkeypatch):
    frozen = []
    step_end = trainer._JobCallback.on_step_end
    monkeypatch.setattr(trainer._JobCallback, "on_step_end",
                        lambda self, *a, **kw: frozen.append(gc.get_freeze_count()) or step_end(self, *a, **kw))
    ws = workspace()
    assert gc.get_freeze_count() == 0
    assert run_cli(ws, "train", text_file(tmp_path / "a.jsonl", 16), "-q").code == 0
    assert len(frozen) == 2 and all(n > 0 for n in frozen)
    assert gc.get_freeze_count() == 0


def test_a_collector_frozen_by_the_host_process_is_left_as_it_was(workspace, tmp_path):
    ws = workspace()
    gc.freeze()
    try:
        assert run_cli(ws, "train", text_file(tmp_path / "a.jsonl", 16), "-q").code == 0
        assert gc.get_freeze_count() > 0  # not unfrozen by conveyor
    finally:
        gc.unfreeze()


# Logits only where labels are (trainer.labelled_only) ----------------------------------------------------------
def _prompt_completion_features(vocab: int) -> list[dict]:
    """Four examples of 5-23 tokens, the first half of each a prompt that carries no loss (as the formats mask it)."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for i, n in enumerate((9, 23, 5, 14), 1):
        ids = torch.randint(3, vocab, (n,), generator=gen).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE] * (n // 2) + ids[n // 2:], "line": (1, i)})
    return out


def _loss_and_grads(model, batch: dict) -> tuple[float, dict]:
    model.zero_grad()
    n = torch.tensor(int((batch["labels"][:, 1:] != IGNORE).sum()))
    loss = model(**batch, num_items_in_batch=n).loss
    loss.backward()
    return float(loss.detach()), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.parametrize("padding_free", [True, False])
def test_logits_only_where_labels_are_give_the_same_loss_and_gradients(tiny_dir, method, padding_free):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    if method == "lora":
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        for name, p in model.named_parameters():  # B is zero at the start: the A gradients would all be zero
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)
    tokenizer = load_tokenizer(str(tiny_dir))
    batch = trainer.AuditingCollator(tokenizer, padding_free=padding_free)(
        _prompt_completion_features(model.config.vocab_size))
    assert batch["input_ids"].shape[0] == (1 if padding_free else 4)
    selected = trainer.labelled_only(batch)
    kept = int(selected["logits_to_keep"].sum())
    assert kept == int((batch["labels"][:, 1:] != IGNORE).sum()) < batch["input_ids"].numel() * 0.7

    assert trainer.computes_labelled_only(model)
    plain_loss, plain_grads = _loss_and_grads(model, batch)
    loss, grads = _loss_and_grads(model, selected)
    assert loss == pytest.approx(plain_loss, rel=1e-6)
    assert set(grads) == set(plain_grads) and len(grads) > 0
    assert max_abs_diff(grads, plain_grads) <= 1e-6 * max(1.0, max(float(g.abs().max()) for g in plain_grads.values()))
    assert model(**selected).logits.shape[-2] == kept  # the output layer ran at those positions only


def test_a_batch_without_labels_or_with_none_to_learn_is_left_as_it_is():
    ids = torch.ones(1, 4, dtype=torch.long)
    unlabelled, masked = {"input_ids": ids}, {"input_ids": ids, "labels": torch.full((1, 4), IGNORE)}
    assert trainer.labelled_only(unlabelled) is unlabelled and trainer.labelled_only(masked) is masked
    every = trainer.labelled_only({"input_ids": ids, "labels": ids})  # the last position predicts nothing
    assert every["logits_to_keep"].tolist() == [[True, True, True, False]] and every["shift_labels"].tolist() == [1] * 3


def test_a_model_whose_forward_cannot_keep_chosen_logits_gets_them_all(tiny_dir):
    from transformers import AutoModelForCausalLM

    class Older(torch.nn.Module):  # a forward as older or remote-code models have: no logits_to_keep
        def __init__(self):
            super().__init__()
            self.inner = AutoModelForCausalLM.from_pretrained(tiny_dir)

        def forward(self, input_ids=None, labels=None, **kw):
            return self.inner(input_ids=input_ids, labels=labels)

    assert not trainer.computes_labelled_only(Older())


def test_training_on_prompt_completion_data_computes_logits_only_where_labels_are(workspace, tmp_path, monkeypatch):
    kept, total = [], []
    select = trainer.labelled_only

    def counting(inputs):
        out = select(inputs)
        total.append(inputs["input_ids"].numel())
        kept.append(int(out["logits_to_keep"].sum()) if "logits_to_keep" in out else total[-1])
        return out

    data = tmp_path / "pc.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"question {i}: what does the fox do? ", "completion": f"jumps {i}"})
                            + "\n" for i in range(8)), encoding="utf-8")
    weights = {}
    for name, selector in (("plain", lambda inputs: inputs), ("labelled", counting)):
        monkeypatch.setattr(trainer, "labelled_only", selector)
        ws = workspace(name)
        assert run_cli(ws, "train", str(data), "-q").code == 0
        run = next((ws / "runs").iterdir())
        weights[name] = adapter_weights(max((run / "checkpoints").glob("step-*")))
    assert len(kept) == 2 and all(k < t / 2 for k, t in zip(kept, total))  # one step: two micro-batches of 4
    assert max_abs_diff(weights["labelled"], weights["plain"]) <= 1e-6
