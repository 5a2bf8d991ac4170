"""Padding-free batches: the same loss and weights as padded ones, attention that never crosses examples (and a
check that would see it if it did), the audit unchanged, and a fallback to padding that is said."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import adapter_weights, audit, ledger, max_abs_diff, run_cli, status

from conveyor.data.chat import load_tokenizer
from conveyor.data.formats import IGNORE
from conveyor.train import packing
from conveyor.train.trainer import AuditingCollator


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    model.config.use_cache = False
    return model.eval(), load_tokenizer(str(tiny_dir))


def _features(tokenizer, texts: list[str]) -> list[dict]:
    out = []
    for i, text in enumerate(texts, 1):
        ids = [tokenizer.bos_token_id] + tokenizer.encode(text, add_special_tokens=False)
        out.append({"input_ids": ids, "labels": [IGNORE] + ids[1:], "line": i})
    return out


TEXTS = ["a", "the quick brown fox jumps over the lazy dog", "seven", "pack me in with the others, please"]


def _loss(model, batch: dict) -> float:
    n = int((batch["labels"][:, 1:] != IGNORE).sum())
    return float(model(**batch, num_items_in_batch=torch.tensor(n)).loss)


def _per_token_losses(model, batch: dict) -> torch.Tensor:
    logits = model(**batch).logits[0, :-1]
    return torch.nn.functional.cross_entropy(logits.float(), batch["labels"][0, 1:], reduction="none",
                                             ignore_index=IGNORE)


def test_a_padding_free_batch_is_one_row_with_positions_restarting_and_no_loss_across(model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    features = _features(tokenizer, TEXTS)
    collator = AuditingCollator(tokenizer, padding_free=True)
    batch = collator(features)
    lengths = [len(f["input_ids"]) for f in features]
    assert batch["input_ids"].shape == (1, sum(lengths)) and "attention_mask" not in batch
    assert batch["position_ids"][0].tolist() == [p for n in lengths for p in range(n)]
    starts = [sum(lengths[:k]) for k in range(len(lengths))]
    assert all(batch["labels"][0, s] == IGNORE for s in starts)
    assert collator.take(4) == [1, 2, 3, 4]  # the audit sees the same lines either way
    padded = AuditingCollator(tokenizer)(features)
    assert padded["input_ids"].shape == (4, max(lengths))
    # pad tokens are the difference: 4 × longest against the sum of lengths
    assert padded["input_ids"].numel() - batch["input_ids"].numel() == 4 * max(lengths) - sum(lengths) > 0


def test_each_micro_batch_is_packed_only_where_it_saves_compute(model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    skewed = [1, 2, 3, 1, 2, 1, 3, 300]  # one long example: padding 8 × 300 wastes most of the compute
    uniform = [256] * 8  # nothing to save; a packed row's dense attention over 2048 tokens costs more
    assert packing.worth_it(skewed, hidden=64, varlen=False)
    assert not packing.worth_it(uniform, hidden=64, varlen=False)
    assert not packing.worth_it(uniform, hidden=512, varlen=False)
    assert packing.worth_it(uniform, hidden=64, varlen=True)  # flash-attention varlen: never more than padding
    collator = AuditingCollator(tokenizer, padding_free=True, hidden=64)
    same = _features(tokenizer, ["x" * 100] * 4)
    assert collator(same)["input_ids"].shape == (4, 101)  # padded: all alike (BOS + 100 bytes)
    assert collator(_features(tokenizer, TEXTS))["input_ids"].shape[0] == 1  # packed


def test_one_step_padded_and_padding_free_give_the_same_loss(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    features = _features(tokenizer, TEXTS)
    padded = AuditingCollator(tokenizer)(features)
    free = AuditingCollator(tokenizer, padding_free=True)(features)
    with torch.no_grad():
        assert abs(_loss(model, padded) - _loss(model, free)) <= 1e-5


def test_changing_one_example_leaves_the_others_loss_unchanged(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    collator = AuditingCollator(tokenizer, padding_free=True)
    first = collator(_features(tokenizer, TEXTS))
    other = collator(_features(tokenizer, ["b"] + TEXTS[1:]))  # example 1 changed, same length
    lengths = [len(f["input_ids"]) for f in _features(tokenizer, TEXTS)]
    with torch.no_grad():
        a, b = _per_token_losses(model, first), _per_token_losses(model, other)
    after_first = lengths[0]  # predictions from the second example on
    assert torch.equal(a[after_first:], b[after_first:])
    # The same probe through a forward that leaks (a full attention mask disables the packed mask) would differ:
    ones = {**other, "attention_mask": torch.ones_like(other["input_ids"])}
    leaking_first = {**first, "attention_mask": torch.ones_like(first["input_ids"])}
    with torch.no_grad():
        la, lb = _per_token_losses(model, leaking_first), _per_token_losses(model, ones)
    assert not torch.allclose(la[after_first:], lb[after_first:])


class _Leaky(torch.nn.Module):
    """A model whose forward ignores the packed layout (as one without masking_utils support would)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, position_ids=None, **kw):
        return self.inner(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kw)

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()


def test_the_check_passes_real_models_and_catches_a_leaking_one(model_and_tokenizer):
    model, _ = model_and_tokenizer
    vocab = model.get_input_embeddings().weight.shape[0]
    assert packing.check(model, vocab) is None
    reason = packing.check(_Leaky(model), vocab)
    assert reason is not None and "crosses example boundaries" in reason


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_both_attention_kernels_honour_the_boundaries_unless_a_kv_cache_is_on(tiny_dir, attn):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32, attn_implementation=attn)
    vocab = model.get_input_embeddings().weight.shape[0]
    # Found by the check: with use_cache on (the saved config's default) the forward makes a KV cache, and
    # transformers then builds a plain causal mask over the whole row; conveyor trains with use_cache off.
    assert "crosses example boundaries" in packing.check(model, vocab)
    model.config.use_cache = False
    assert packing.check(model, vocab) is None


def _train(workspace, tmp_path, name: str, packed: bool, data) -> tuple:
    # Dropout off: its masks are drawn per tensor shape, so a padded [4, L] batch and a packed [1, ΣL] row draw
    # different ones (each layout on its own resumes exactly: the other tests run with packing on by default).
    ws = workspace(name, training={"packing": packed, "batch_size": 4, "grad_accum": 2, "save_every": 100},
                   adapter={"dropout": 0.0})
    r = run_cli(ws, "train", data, "-q")
    assert r.code == 0, r.out + r.err
    s = status(ws)
    return ws, s, adapter_weights(ws / "runs" / s["run"]["id"] / "checkpoints" / "step-000005")


def test_weights_after_several_steps_match_padded_training_and_the_audit_is_the_same(workspace, tmp_path):
    data = tmp_path / "skewed.jsonl"
    import random

    rng = random.Random(0)
    data.write_text("".join(json.dumps({"text": " ".join(["word"] * rng.choice([1, 2, 3, 20]))}) + "\n"
                            for _ in range(37)))  # 5 steps, the last one partial
    ws_free, s_free, free = _train(workspace, tmp_path, "free", True, data)
    ws_pad, s_pad, padded = _train(workspace, tmp_path, "padded", False, data)
    assert max_abs_diff(free, padded) <= 1e-5
    assert audit(ws_free) == audit(ws_pad)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("loss", "first_loss", "last_loss", "mean_loss",
                                                                    "created_at", "seconds")} for r in rows]
    assert strip(ledger(ws_free)) == strip(ledger(ws_pad))
    assert "padding-free batches" in run_cli(ws_free, "status").out
    assert "padded batches" in run_cli(ws_pad, "status").out
    assert not [w for w in s_free["jobs"][0]["warnings"] if "training.packing" in w]


def test_a_model_that_cannot_pack_trains_padded_and_the_job_says_why(workspace, tmp_path, monkeypatch):
    monkeypatch.setattr(packing, "check", lambda model, vocab: "attention crosses example boundaries (probe)")
    ws = workspace(training={"packing": True})
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(8)))
    r = run_cli(ws, "train", data)
    assert r.code == 0, r.out + r.err
    assert "padded batches instead of padding-free ones" in r.out + r.err
    job = status(ws)["jobs"][0]
    assert job["state"] == "done" and any("training.packing: padded batches" in w for w in job["warnings"])


def _log(ws) -> list[dict]:
    return [json.loads(line) for line in (ws / "logs" / "conveyor.log").read_text().splitlines()]


def _said(ws, job: int) -> list[str]:
    return [e["message"] for e in _log(ws) if e["message"].startswith(f"job {job}: padding-free batches")]


def test_the_probe_runs_once_per_run_and_settings_and_later_jobs_reuse_its_verdict(workspace, tmp_path, monkeypatch):
    from conftest import set_setting, text_file

    probes = []
    real = packing.check
    monkeypatch.setattr(packing, "check", lambda model, vocab: probes.append(vocab) or real(model, vocab))
    ws = workspace(training={"packing": True})
    for name in ("a", "b"):
        assert run_cli(ws, "train", text_file(tmp_path / f"{name}.jsonl", 8, name), "-q").code == 0
    assert _said(ws, 1) == [("job 1: padding-free batches (training.packing), checked: the model computes packed "
                             "examples exactly as alone")]
    assert _said(ws, 2) == [(f"job 2: padding-free batches (training.packing), as checked before for this run's "
                             f"model and settings ({packing.VERDICTS})")]
    assert len(probes) == 1
    run = status(ws)["run"]["id"]
    kept = json.loads((ws / "runs" / run / packing.VERDICTS).read_text())
    assert [v["reason"] for v in kept.values()] == [None]
    assert next(iter(kept.values()))["key"]["attn_implementation"] == "sdpa"
    # Another attention kernel is another verdict (same run: not identity), probed again and kept beside the first.
    set_setting(ws, "model", "attn_implementation", '"eager"')
    assert run_cli(ws, "train", text_file(tmp_path / "c.jsonl", 8, "c"), "-q").code == 0
    assert status(ws)["run"]["id"] == run
    assert "checked: the model computes" in _said(ws, 3)[0] and len(probes) == 2
    assert len(json.loads((ws / "runs" / run / packing.VERDICTS).read_text())) == 2


def test_an_unreadable_verdict_file_means_probing_again(workspace, tmp_path):
    from conftest import text_file

    ws = workspace(training={"packing": True})
    assert run_cli(ws, "train", text_file(tmp_path / "a.jsonl", 8, "a"), "-q").code == 0
    (ws / "runs" / status(ws)["run"]["id"] / packing.VERDICTS).write_text("{not json")
    assert run_cli(ws, "train", text_file(tmp_path / "b.jsonl", 8, "b"), "-q").code == 0
    assert "checked: the model computes" in _said(ws, 2)[0]


def test_a_kept_failure_still_trains_every_later_job_padded_and_says_so(workspace, tmp_path, monkeypatch):
    from conftest import text_file

    probes = []
    monkeypatch.setattr(packing, "check", lambda model, vocab: probes.append(vocab) or "attention crosses (probe)")
    ws = workspace(training={"packing": True})
    for name in ("a", "b"):
        assert run_cli(ws, "train", text_file(tmp_path / f"{name}.jsonl", 8, name), "-q").code == 0
    assert len(probes) == 1
    for job in status(ws)["jobs"]:
        assert any("padded batches instead of padding-free ones, because attention crosses (probe)" in w
                   for w in job["warnings"]), job
