"""`conveyor demo`: a workspace with the tiny model and two small sample files, trained one after the other."""

from __future__ import annotations

import json
from pathlib import Path

from .config import Config

_ANIMALS = ["cat", "dog", "owl", "fox", "eel", "yak", "bee", "ant", "elk", "emu", "gnu", "hen"]
_SOUNDS = ["meows", "barks", "hoots", "yips", "zaps", "grunts", "buzzes", "marches", "bugles", "booms", "snorts",
           "clucks"]


def demo_config() -> Config:
    config = Config()
    config.training.batch_size = 4
    config.training.grad_accum = 2
    config.training.learning_rate = 1e-3
    config.training.max_length = 128
    config.training.save_every = 2
    return config


def write_samples(folder: Path) -> list[Path]:
    """Two files: 24 plain-text facts, then 16 chat exchanges about the same animals."""
    folder.mkdir(parents=True, exist_ok=True)
    facts = folder / "facts.jsonl"
    with open(facts, "w", encoding="utf-8") as f:
        for i in range(24):
            a, s = _ANIMALS[i % 12], _SOUNDS[i % 12]
            f.write(json.dumps({"text": f"Fact {i}: the {a} {s} at dawn."}) + "\n")
    chats = folder / "chats.jsonl"
    with open(chats, "w", encoding="utf-8") as f:
        for i in range(16):
            a, s = _ANIMALS[i % 12], _SOUNDS[i % 12]
            messages = [{"role": "user", "content": f"What does the {a} do?"},
                        {"role": "assistant", "content": f"The {a} {s}."}]
            f.write(json.dumps({"messages": messages}) + "\n")
    return [facts, chats]
