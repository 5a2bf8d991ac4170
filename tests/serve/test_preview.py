"""`conveyor preview`: each example exactly as training sees it (same tokenizer, template and truncation),
its trainable spans, and plain messages for every kind of bad input."""

from __future__ import annotations

import json

import pytest
from conftest import ASSETS, run_cli

from conveyor.data.chat import load_tokenizer
from conveyor.data.formats import parse_file, tokenize_file


def preview_json(ws, *args) -> list[dict]:
    r = run_cli(ws, "preview", *args, "--json")
    assert r.code == 0, r.out + r.err
    return json.loads(r.out)


def test_chat_examples_show_the_rendering_and_the_replies_with_their_end(workspace):
    ws = workspace()
    assert preview_json(ws, ASSETS / "chat_multi.jsonl") == [
        {"line": 1, "tokens": 35, "trainable_tokens": 13,
         "text": "<|system|>Be brief.<|end|><|user|>Hi<|end|><|assistant|>Hello.<|end|><|user|>Bye<|end|>"
                 "<|assistant|>Ciao.<|end|>",
         "trainable": ["Hello.<|end|>", "Ciao.<|end|>"]},
        {"line": 2, "tokens": 9, "trainable_tokens": 2, "text": "<|user|>2+2?<|end|><|assistant|>4<|end|>",
         "trainable": ["4<|end|>"]},
    ]


def test_text_and_prompt_completion_show_what_they_train(workspace, tmp_path):
    ws = workspace()
    [completion] = preview_json(ws, ASSETS / "prompt_completion.jsonl", "--lines", "1")
    assert completion["text"] == "<|bos|>Q0: capital? A0<|eos|>" and completion["trainable"] == [" A0<|eos|>"]
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"text": "abc"}) + "\n")
    assert preview_json(ws, path) == [{"line": 1, "tokens": 5, "trainable_tokens": 4, "text": "<|bos|>abc<|eos|>",
                                       "trainable": ["abc<|eos|>"]}]


def test_counts_are_trainings_after_truncation(workspace, tmp_path, tiny_dir):
    ws = workspace(training={"max_length": 12})
    path = tmp_path / "pc.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n"
                            for p, c in [("a" * 20, "b"), ("q", "c" * 20), ("q", "ok")]))
    shown = preview_json(ws, path)
    data = tokenize_file(parse_file(path), load_tokenizer(str(tiny_dir)), 12)
    trained = {e.line: e for e in data.examples}
    assert [s["tokens"] for s in shown] == [12, 12, 5]
    assert shown[0]["trainable_tokens"] == 0 and shown[0]["trainable"] == []  # excluded from training
    assert data.excluded_lines == [1]
    for s in shown[1:]:
        assert s["tokens"] == len(trained[s["line"]].input_ids)
    assert shown[1]["trainable"] == ["c" * 10] and shown[1]["trainable_tokens"] == 10
    r = run_cli(ws, "preview", path)
    assert r.code == 0
    assert "line 1: 12 tokens, 0 trainable; truncated at 12 tokens; not trained: nothing trainable is left" in r.out
    assert "line 3: 5 tokens, 3 trainable" in r.out and "<|bos|>q⟦ok<|eos|>⟧" in r.out  # not a terminal: marked


def test_lines_selects_examples_by_file_line(workspace, tmp_path):
    ws = workspace()
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"text": f"ex {i}"}) + "\n" + ("\n" if i == 2 else "") for i in range(1, 6)))
    assert [s["line"] for s in preview_json(ws, path, "--lines", "2-4")] == [2, 4]  # line 3 is blank
    assert [s["line"] for s in preview_json(ws, path, "--lines", "6")] == [6]


@pytest.mark.parametrize("args, expected", [
    (["missing.jsonl"], "missing.jsonl: no such file; give the path of a JSONL file to preview"),
    (["."], "is a folder; give the path of one JSONL file in it"),
    ([ASSETS / "chat_multi.jsonl", "--lines", "two"], "--lines 'two' is not a line range; give A-B"),
    ([ASSETS / "chat_multi.jsonl", "--lines", "0-1"], "--lines 0-1: lines are numbered from 1"),
    ([ASSETS / "chat_multi.jsonl", "--lines", "2-1"], "the range must not end before it starts"),
    ([ASSETS / "chat_multi.jsonl", "--lines", "7-9"], "has no examples there (its examples are on lines 1–2)"),
    ([ASSETS / "bad_chat.jsonl"], "line 1: messages[1].role 'robot' is unknown"),
])
def test_bad_input_says_what_to_do(workspace, args, expected):
    ws = workspace()
    r = run_cli(ws, "preview", *args)
    assert r.code == 1 and expected in r.out + r.err


def test_a_template_problem_names_data_chat_template(workspace):
    ws = workspace(data={"chat_template": "hides.jinja"})
    (ws / "hides.jinja").write_text("{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['content'] }}"
                                    "{% endif %}{% endfor %}")
    r = run_cli(ws, "preview", ASSETS / "chat_multi.jsonl")
    assert r.code == 1
    assert "chat_multi.jsonl: the chat template cannot render or mask 2 example(s)" in r.out + r.err
    assert 'To fix: set data.chat_template = "path/to/template.jinja"' in r.out + r.err


def test_a_bad_file_would_be_rejected_in_preview_and_is_rejected_by_add(workspace):
    """Preview trains nothing, so it says what adding the file would do; `add` keeps its wording. Both list the
    same problems."""
    ws = workspace()
    name = "bad_json_and_fields.jsonl"
    previewed = run_cli(ws, "preview", ASSETS / name)
    assert previewed.code == 1
    said = (previewed.out + previewed.err).removeprefix("error: ").strip().splitlines()
    assert said[0] == f"{name} would be rejected (4 problem(s)):"
    assert said[-1] == "Fix the lines above, then add the file."
    assert "nothing trained" not in previewed.out + previewed.err
    added = run_cli(ws, "add", ASSETS / name)
    told = [line for line in (added.out + added.err).splitlines() if line.startswith((name, "  ", "Fix"))]
    assert told[0] == f"{name}: rejected, nothing trained from it (4 problem(s)):"
    assert told[-1] == "Fix the lines above and add the file again."
    assert told[1:-1] == said[1:-1] and len(said) == 6


def _jsonl(path, records: list):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_a_pair_shows_its_prompt_once_then_both_answers_with_what_trains(workspace, tmp_path, tiny_dir):
    ws = workspace()
    path = _jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Q: sky?", "chosen": " blue sky", "rejected": " blue"}])
    [shown] = preview_json(ws, path)
    [trained] = tokenize_file(parse_file(path), load_tokenizer(str(tiny_dir)), 64).examples
    assert shown == {
        "line": 1, "prompt": "<|bos|>Q: sky?",  # the answers' shared " blue" is theirs, not the prompt's
        "chosen": {"tokens": len(trained.input_ids), "trainable_tokens": 10,
                   "text": "<|bos|>Q: sky? blue sky<|eos|>", "trainable": [" blue sky<|eos|>"]},
        "rejected": {"tokens": len(trained.rejected_ids), "trainable_tokens": 6,
                     "text": "<|bos|>Q: sky? blue<|eos|>", "trainable": [" blue<|eos|>"]}}
    r = run_cli(ws, "preview", path)
    assert r.code == 0, r.out + r.err
    assert r.out.split("\n")[2:6] == ["line 1: chosen 18 tokens, 10 trainable; rejected 14 tokens, 6 trainable",
                                      "prompt: <|bos|>Q: sky?", "chosen: ⟦ blue sky<|eos|>⟧",
                                      "rejected: ⟦ blue<|eos|>⟧"]


def test_a_conversational_pair_trains_only_its_answers_and_says_how_replies_are_found(workspace, tmp_path):
    ws = workspace(training={"max_length": 12})
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                    {"role": "user", "content": "2+2?"}]
    path = _jsonl(tmp_path / "pairs.jsonl", [
        {"chosen": conversation[:1] + [{"role": "assistant", "content": "Yo"}],
         "rejected": conversation[:1] + [{"role": "assistant", "content": "Go away"}]},
        {"prompt": conversation, "chosen": [{"role": "assistant", "content": "4"}],
         "rejected": [{"role": "assistant", "content": "5"}]}])
    implicit, long = preview_json(ws, path)
    assert implicit["prompt"] == "<|user|>Hi<|end|><|assistant|>"
    assert implicit["chosen"]["trainable"] == ["Yo<|end|>"]
    assert implicit["rejected"]["trainable"] == ["Go away"]  # cut before its end
    assert long["chosen"]["trainable_tokens"] == long["rejected"]["trainable_tokens"] == 0  # max_length 12: cut
    r = run_cli(ws, "preview", path)
    assert "replies found by rendered prefixes of each conversation" in r.out
    assert "line 1: chosen 8 tokens, 3 trainable; rejected 12 tokens, 7 trainable; truncated at 12 tokens\n" in r.out
    assert ("line 2: chosen 12 tokens, 0 trainable; rejected 12 tokens, 0 trainable; truncated at 12 tokens; "
            "not trained: nothing trainable is left in either answer") in r.out


def test_feedback_shows_each_answer_with_its_label(workspace, tmp_path):
    ws = workspace()
    path = _jsonl(tmp_path / "feedback.jsonl", [{"prompt": "Q: sky?", "completion": " blue", "label": True},
                                                {"prompt": "Q: sky?", "completion": " green", "label": False}])
    assert [(s["label"], s["trainable"]) for s in preview_json(ws, path)] == [(True, [" blue<|eos|>"]),
                                                                             (False, [" green<|eos|>"])]
    r = run_cli(ws, "preview", path)
    assert r.code == 0, r.out + r.err
    assert "line 1: 14 tokens, 6 trainable; labelled good (true)\n<|bos|>Q: sky?⟦ blue<|eos|>⟧" in r.out
    assert "line 2: 15 tokens, 7 trainable; labelled bad (false)\n<|bos|>Q: sky?⟦ green<|eos|>⟧" in r.out


def test_a_bad_pair_file_would_be_rejected_with_its_lines(workspace, tmp_path):
    ws = workspace()
    path = _jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "Q", "chosen": "A", "rejected": "B"},
        {"prompt": "Q", "chosen": "A", "rejected": "A"},
        {"chosen": "A", "rejected": "B"},
        {"prompt": [{"role": "user", "content": "Q"}], "chosen": "A", "rejected": "B"}])
    r = run_cli(ws, "preview", path)
    assert r.code == 1
    said = (r.out + r.err).removeprefix("error: ").strip().splitlines()
    assert said[0] == "pairs.jsonl would be rejected (3 problem(s)):"
    assert [line.split(":")[0] for line in said[1:4]] == ["  line 2", "  line 3", "  line 4"]
    assert said[1] == '  line 2: "chosen" and "rejected" are the same answer: there is nothing to prefer'
    assert said[-1] == "Fix the lines above, then add the file."
