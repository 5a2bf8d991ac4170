"""Answers scored on held-out data: each evaluation also asks the held-out examples' questions (greedy) and scores
the answers against what the example trains (exact match, token F1), shown beside the loss per version."""

from __future__ import annotations

import json

import pytest
from conftest import chat_file, run_cli, text_file

from conveyor.data.chat import load_tokenizer
from conveyor.data.formats import Example, tokenize_example
from conveyor.train.evaluation import Evaluator, split_reply


@pytest.fixture
def tokenizer(tiny_dir):
    return load_tokenizer(str(tiny_dir))


def _example(tokenizer, record, fmt):
    return tokenize_example(tokenizer, Example(1, record), fmt, 256)


def test_a_reply_is_split_from_its_question_as_it_trains(tokenizer):
    pc = _example(tokenizer, {"prompt": "Who founded Velmora?", "completion": " Orrin Tasker."}, "prompt_completion")
    ids, reference = split_reply(pc, tokenizer)
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Who founded Velmora?"
    assert reference == "Orrin Tasker."
    chat = _example(tokenizer, {"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                                             {"role": "user", "content": "q2"},
                                             {"role": "assistant", "content": "a2"}]}, "messages")
    ids, reference = split_reply(chat, tokenizer)
    assert reference == "a1"  # the first reply; its end marker is special and left out
    assert tokenizer.decode(ids).endswith("<|user|>q1<|end|><|assistant|>")
    assert split_reply(_example(tokenizer, {"text": "a plain text trains from its start"}, "text"), tokenizer) is None


class _Says:
    """A model that answers each prompt with the text given for it (after the prompt, as generate returns)."""

    def __init__(self, tokenizer, answers: dict[str, str]):
        import torch

        self.tokenizer, self.answers, self.training = tokenizer, answers, False
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def parameters(self):
        return iter([self.weight])

    def eval(self):
        self.training = False

    def train(self, mode=True):
        self.training = mode

    def generate(self, input_ids, **_):
        import torch

        asked = self.tokenizer.decode(input_ids[0], skip_special_tokens=True)
        said = self.tokenizer.encode(self.answers[asked], add_special_tokens=False)
        return torch.tensor([input_ids[0].tolist() + said])


def test_scores_are_the_means_over_the_first_n_examples_with_a_question(tokenizer):
    records = [{"prompt": "Capital of France?", "completion": " Paris"},
               {"prompt": "Founder of Velmora?", "completion": " Orrin Tasker"},
               {"prompt": "Colour of the sky?", "completion": " blue"}]
    examples = [_example(tokenizer, r, "prompt_completion") for r in records]
    model = _Says(tokenizer, {"Capital of France?": "Paris.", "Founder of Velmora?": "The answer is Orrin",
                              "Colour of the sky?": "green"})
    scores = Evaluator({}, None, 8, [], 16, tokenizer, answer_examples=2).answers(model, examples)
    # Paris: exact, F1 1; "answer is orrin" against "orrin tasker": 1 shared, p 1/3, r 1/2 -> F1 0.4; the third
    # example is past eval.answers = 2.
    assert (scores.exact, scores.answered) == (0.5, 2)
    assert scores.f1 == pytest.approx((1 + 0.4) / 2)


def test_each_version_shows_its_held_out_answers_beside_the_loss(workspace, tmp_path):
    ws = workspace(eval={"holdout": 4, "answers": 3, "max_new_tokens": 4})
    r = run_cli(ws, "train", chat_file(tmp_path / "a.jsonl", 20), text_file(tmp_path / "b.jsonl", 12), "-q")
    assert r.code == 0, r.out + r.err
    m = json.loads(run_cli(ws, "eval", "--matrix", "--json").out)
    assert [s["name"] for s in m["sets"]] == ["job 1", "job 2"]
    first, second = m["rows"]
    assert list(first["answers"]) == ["job 1"] and list(second["answers"]) == ["job 1"]  # text asks nothing
    for row in m["rows"]:
        shown = row["answers"]["job 1"]
        assert shown["answered"] == 3 and 0 <= shown["exact"] <= shown["f1"] <= 1
    versions = json.loads(run_cli(ws, "versions", "--json").out)
    assert versions[1]["answers"] == second["answers"]


def test_answers_beyond_the_budget_are_not_scored_and_that_is_said(workspace, tmp_path):
    ws = workspace(eval={"holdout": 4, "answers": 4, "max_new_tokens": 8, "answer_budget": 31})
    r = run_cli(ws, "train", chat_file(tmp_path / "a.jsonl", 12), "-q")
    assert r.code == 0, r.out + r.err
    m = json.loads(run_cli(ws, "eval", "--matrix", "--json").out)
    assert m["rows"][0]["answers"] == {} and m["rows"][0]["loss"]["job 1"] > 0
    logs = run_cli(ws, "logs", "-n", "500").out
    assert "could generate 32 tokens per evaluation, above eval.answer_budget = 31" in logs


def test_a_done_notification_carries_the_answers(workspace, tmp_path):
    from conveyor.queue.notify import event
    from conveyor.store.workspace import Workspace

    ws = workspace(eval={"holdout": 4, "answers": 2, "max_new_tokens": 4})
    assert run_cli(ws, "train", chat_file(tmp_path / "a.jsonl", 12), "-q").code == 0
    con = Workspace.open(ws).db
    row = con.execute("SELECT * FROM events WHERE kind = 'done'").fetchone()
    ev = event(con, row, str(ws))
    assert set(ev["answers"]) == {"job 1"} and ev["answers"]["job 1"]["answered"] == 2
    assert set(ev["eval"]) == {"job 1"}


def test_the_answers_gate_holds_the_queue_when_an_earlier_sets_f1_drops(workspace, tmp_path):
    """v1's answers on job 1's held-out set are recorded as perfect (tiny cannot learn them in a few steps), so the
    next job's version drops them by about 1.0, more than eval.gate_answers."""
    import re
    import sqlite3

    ws = workspace(eval={"holdout": 4, "answers": 2, "max_new_tokens": 4, "gate_answers": 0.5})
    assert run_cli(ws, "train", chat_file(tmp_path / "a.jsonl", 20), "-q").code == 0
    con = sqlite3.connect(ws / "conveyor.db")
    with con:
        assert con.execute("UPDATE set_evals SET f1 = 1.0, exact = 1.0 WHERE name = 'job 1'").rowcount == 1
    con.close()
    r = run_cli(ws, "train", chat_file(tmp_path / "b.jsonl", 12), "-q")
    said = " ".join((r.out + r.err).split())
    assert r.code == 1 and re.search(r"eval\.gate: v2 \(job 2, b\.jsonl\) lowered the held-out answers' F1 of job 1 "
                                     r"\(a\.jsonl\) 1\.00 → 0\.\d\d, by more than eval\.gate_answers = 0\.50\. The "
                                     r"queue is paused and v2 marked gated; nothing is deleted\. `conveyor resume` "
                                     r"accepts v2 and goes on; `conveyor rollback v1` undoes job 2", said), said


def test_answer_and_retention_gates_need_what_they_compare(workspace):
    from conftest import set_setting

    ws = workspace()
    set_setting(ws, "eval", "gate_answers", "0.2")
    r = run_cli(ws, "status")  # status shows a settings problem; train refuses
    assert "eval.gate_answers = 0.2 compares each job's held-out answers" in " ".join(r.out.split())
    set_setting(ws, "eval", "gate_answers", "0.0")
    set_setting(ws, "eval", "probe", '""')
    set_setting(ws, "eval", "gate_retention", "0.9")
    r = run_cli(ws, "status")
    assert "but eval.probe is \"\" (none)" in " ".join(r.out.split())


def test_the_matrix_shows_the_newest_versions_and_sets_and_says_what_it_left_out(workspace, tmp_path):
    ws = workspace(eval={"holdout": 2, "answers": 0})
    files = [text_file(tmp_path / f"{name}.jsonl", 10, name) for name in "abcd"]
    assert run_cli(ws, "train", *files, "-q").code == 0
    r = run_cli(ws, "eval", "--last", "2", "--sets", "1")
    assert r.code == 0, r.out + r.err
    shown = " ".join(r.out.split())
    assert "v3" in shown and "v4" in shown and "v1 " not in shown and "v2 " not in shown
    assert "job 4" in shown and "job 3" not in shown
    assert "shown: the newest 2 of 4 versions (--last 0 shows all); the newest 1 of 4 held-out sets (--sets 0 " \
        "shows all)" in shown
    assert len(json.loads(run_cli(ws, "eval", "--json").out)["rows"]) == 4  # --json: all by default
    assert len(json.loads(run_cli(ws, "eval", "--json", "--last", "3").out)["rows"]) == 3
    full = " ".join(run_cli(ws, "eval").out.split())
    assert "shown:" not in full and "job 1" in full
