"""Evaluation loss means something: same masking as the training loss, so the train/val gap is honest."""

from __future__ import annotations

import json
import sqlite3

from conftest import ASSETS, run_cli


def _rows(ws, sql):
    con = sqlite3.connect(ws / "conveyor.db")
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def test_eval_loss_equals_training_loss_on_the_same_data_and_weights(workspace, tmp_path):
    # One optimizer step covers the whole file; with a vanishing learning rate the weights after that step
    # are the weights the training loss was computed with. Prompt/completion: masking matters.
    data = tmp_path / "pc.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Question {i}: what is {i} plus {i}?",
                                        "completion": f" It is {2 * i}."}) + "\n" for i in range(8)))
    ws = workspace(training={"batch_size": 4, "grad_accum": 2, "learning_rate": 1e-12},
                   eval={"file": str(data), "batch_size": 3})
    r = run_cli(ws, "train", data, "-q")
    assert r.code == 0, r.out + r.err
    (train_loss,), = _rows(ws, "SELECT loss FROM metrics WHERE step = 1")
    (eval_loss, examples), = _rows(ws, "SELECT eval_loss, examples FROM evals WHERE step = 1")
    assert examples == 8
    assert abs(eval_loss - train_loss) < 1e-5, (eval_loss, train_loss)


def test_eval_every_n_steps_and_at_job_end_with_samples(workspace, tmp_path):
    ws = workspace(eval={"file": str(ASSETS / "prompt_completion.jsonl"), "every_steps": 2,
                         "sample_prompts": ["Q1: capital?"], "max_new_tokens": 5})
    train = tmp_path / "t.jsonl"
    train.write_text("".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(40)))  # 5 steps
    assert run_cli(ws, "train", train, "-q").code == 0
    assert [s for s, in _rows(ws, "SELECT step FROM evals ORDER BY step")] == [2, 4, 5]
    samples = _rows(ws, "SELECT step, prompt, output FROM samples ORDER BY step")
    assert [(s, p) for s, p, _ in samples] == [(2, "Q1: capital?"), (4, "Q1: capital?"), (5, "Q1: capital?")]
    assert all(isinstance(o, str) for _, _, o in samples)


def test_a_bad_eval_file_is_reported_and_training_goes_on(workspace, tmp_path):
    ws = workspace(eval={"file": str(ASSETS / "bad_chat.jsonl")})
    train = tmp_path / "t.jsonl"
    train.write_text(json.dumps({"text": "hello"}) + "\n")
    r = run_cli(ws, "train", train, "-q")
    assert r.code == 0 and "no evaluation loss: eval.file bad_chat.jsonl: rejected" in r.out + r.err
