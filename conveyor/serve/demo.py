"""`conveyor demo`: the tiny model learns two files one after the other (what twelve animals do, then how to answer
questions about them), then answers questions in ways it was never asked them in training.

The task suits a 0.1M-parameter byte-level model that starts from random weights: whatever the question about an
animal ("What does the owl do?", "How does the owl sound?", ...), the answer is "The owl hoots." The animal is
found in the question, the sound is the fact the first file taught. Every animal and every way of asking is in the
second file's questions, but not every pair: the pairs held out are asked at the end, through the same code path as
`conveyor generate`. World facts cannot be guessed by so small a model; finding a word and recalling what was taught
about it can. Full fine-tuning, because a LoRA adapter barely moves random weights; greedy decoding and fixed seeds,
so the demo answers the same way every time it runs on a CPU.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..config import Config
from .generate import answer_all, load, torch_threads

# Each animal starts with its own letter: which one a question is about shows in one byte.
ANIMALS = {"cat": "meows", "dog": "barks", "owl": "hoots", "fox": "yips", "bee": "buzzes", "lion": "roars",
           "wolf": "howls", "goat": "bleats", "pig": "oinks", "hen": "clucks", "mouse": "squeaks", "snake": "hisses"}
ASKED = ["What does the {a} do?", "What sound does the {a} make?", "How does the {a} sound?",
         "Tell me about the {a}.", "What do you hear from the {a}?", "Which sound is the {a}'s?"]
FACTS = ["The {a} {s}.", "Listen: the {a} {s}.", "Each {a} {s}.", "Every {a} {s}."]


@dataclass(frozen=True)
class Question:
    prompt: str
    expected: str


def question(animal: str, asked: str) -> Question:
    return Question(asked.format(a=animal), f"The {animal} {ANIMALS[animal]}.")


def held_out() -> list[Question]:
    """One way of asking per animal that no training question uses for it; the demo asks these at the end."""
    return [question(animal, ASKED[(5 * i + 1) % len(ASKED)]) for i, animal in enumerate(ANIMALS)]


def trained() -> list[Question]:
    """The questions of the second file: every other way of asking about each animal."""
    unseen = {q.prompt for q in held_out()}
    asked = [question(animal, form) for animal in ANIMALS for form in ASKED]
    return [q for q in asked if q.prompt not in unseen]


def demo_config() -> Config:
    config = Config()
    config.adapter.method = "full"  # random weights: a LoRA adapter alone cannot teach them much
    config.training.batch_size = 8
    config.training.grad_accum = 1
    config.training.learning_rate = 3e-3
    config.training.schedule = "cosine"  # decays within each job: the answers settle before the job ends
    config.training.weight_decay = 0.1  # with 40 epochs: every held-out question right for each of 5 seeds tried
    config.training.epochs = 40
    config.training.max_length = 128
    config.training.save_every = 100
    return config


def write_samples(folder: Path) -> list[Path]:
    """Two files: what the animals do (plain text), then questions about them and their answers (chats)."""
    folder.mkdir(parents=True, exist_ok=True)
    facts = folder / "facts.jsonl"
    with open(facts, "w", encoding="utf-8") as f:
        for form in FACTS:
            for animal, sound in ANIMALS.items():
                f.write(json.dumps({"text": form.format(a=animal, s=sound)}) + "\n")
    chats = folder / "chats.jsonl"
    with open(chats, "w", encoding="utf-8") as f:
        for q in trained():
            messages = [{"role": "user", "content": q.prompt}, {"role": "assistant", "content": q.expected}]
            f.write(json.dumps({"messages": messages}) + "\n")
    return [facts, chats]


def ask_held_out(ws) -> list[tuple[Question, str]]:
    """The held-out questions answered by the newest checkpoint, as `conveyor generate --prompts` answers them."""
    questions = held_out()
    answers = answer_all(load(ws, None), [q.prompt for q in questions], max_new_tokens=48)
    return [(q, a["output"]) for q, a in zip(questions, answers)]


def one_thread():
    """Torch on one thread meanwhile. The tiny model's matrices are too small to share among threads: a step is
    faster on one, and many times faster on a busy machine, where the threads wait on each other; and the numbers
    do not depend on how many cores the machine has."""
    return torch_threads(1)
