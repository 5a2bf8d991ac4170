"""`conveyor generate` and `conveyor chat`: ask the current model (or a version), in this process, apart from
training.

The model is rebuilt as export does (the run's identity and the checkpoint's files, not conveyor.toml), once per
command; a run that trained chat files is asked through its chat template (in `chat`, with every earlier turn),
any other with the prompt as plain text, each line alone. Greedy decoding, so the same version answers the same
prompt the same way.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from . import checkpoints as ck
from . import runs
from .errors import ConveyorError
from .workspace import Workspace


@dataclass
class Loaded:
    """A checkpoint rebuilt to answer: which run, step and version it is, and whether its run was trained on chats."""

    run: runs.Run
    checkpoint: ck.Checkpoint
    version: str | None  # None: the newest checkpoint is not at a job's end
    chat: bool
    tokenizer: Any
    model: Any
    context: int | None  # positions the model can attend to, when its config says

    def about(self) -> dict:
        return {"version": self.version, "run": self.run.id, "step": self.checkpoint.step, "chat": self.chat}

    def complete(self, ids: list[int], max_new_tokens: int) -> str:
        """The greedy continuation of `ids`, decoded without special tokens."""
        import torch

        with torch.no_grad():
            out = self.model.generate(input_ids=torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                                      attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                      pad_token_id=self.tokenizer.pad_token_id)
        return self.tokenizer.decode(out[0][len(ids):], skip_special_tokens=True)


def load(ws: Workspace, version: str | None) -> Loaded:
    """The version's checkpoint, or the active run's newest verified one, with its tokenizer."""
    from .chat import load_tokenizer
    from .export import _base_model, load_trained

    run, checkpoint, name = _checkpoint(ws, version)
    model_path = _base_model(ws, run, "the base weights and the tokenizer")
    chat = ws.db.execute("SELECT 1 FROM jobs WHERE run_id = ? AND format = 'messages' LIMIT 1",
                         (run.id,)).fetchone() is not None
    tokenizer = load_tokenizer(model_path, _chat_template(ws), ws.root)
    model = load_trained(run.identity, model_path, checkpoint.path).eval()
    context = getattr(model.config, "max_position_embeddings", None)
    return Loaded(run, checkpoint, name, chat, tokenizer, model, context)


def generate(ws: Workspace, prompt: str, version: str | None, max_new_tokens: int) -> dict:
    from .evaluation import prompt_ids

    loaded = load(ws, version)
    text = loaded.complete(prompt_ids(loaded.tokenizer, prompt, loaded.chat), max_new_tokens)
    return {**loaded.about(), "prompt": prompt, "output": text}


def conversation_ids(tokenizer, turns: list[dict], prompt: str, chat: bool) -> list[int]:
    """What the model is asked next: the earlier turns and the prompt through the chat template, or (no turns, or
    a plain-text run) the prompt alone exactly as `generate` asks it."""
    from .evaluation import prompt_ids

    if not turns or not (chat and tokenizer.chat_template):
        return prompt_ids(tokenizer, prompt, chat)
    return tokenizer.apply_chat_template(turns + [{"role": "user", "content": prompt}], tokenize=True,
                                         add_generation_prompt=True, return_dict=False)


class Conversation:
    """A talk with one loaded model. A run trained on chats sees every earlier turn (the oldest exchanges are dropped
    when they would outgrow the model's context); any other run answers each prompt alone, as it was trained."""

    def __init__(self, loaded: Loaded, max_new_tokens: int):
        self.loaded, self.max_new_tokens = loaded, max_new_tokens
        self.keeps_history = loaded.chat and bool(loaded.tokenizer.chat_template)
        self.turns: list[dict] = []  # user and assistant messages, oldest first

    def ask(self, prompt: str) -> tuple[str, int]:
        """The answer, and how many earlier exchanges were dropped to make room for it."""
        dropped = 0
        ids = conversation_ids(self.loaded.tokenizer, self.turns, prompt, self.loaded.chat)
        while self.turns and self.loaded.context and len(ids) + self.max_new_tokens > self.loaded.context:
            self.turns, dropped = self.turns[2:], dropped + 1
            ids = conversation_ids(self.loaded.tokenizer, self.turns, prompt, self.loaded.chat)
        answer = self.loaded.complete(ids, self.max_new_tokens)
        if self.keeps_history:
            self.turns += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        return answer, dropped

    def reset(self) -> None:
        self.turns = []


def header(loaded: Loaded, keeps_history: bool) -> str:
    """Who answers in `conveyor chat`, and how."""
    who = loaded.version or "the newest checkpoint (mid-job: not a version)"
    how = "chat template, the conversation is kept (/reset starts over)" if keeps_history else \
        "plain text, each line is answered alone"
    return f"{who} answers: run {loaded.run.id}, step {loaded.checkpoint.step}; {how}. /quit or end of input ends."


def talk(ws: Workspace, version: str | None, max_new_tokens: int, lines: Iterable[str]) -> None:
    """`conveyor chat`: load the model once, then answer line after line on stdout; notes go to stderr."""
    from .console import err

    loaded = load(ws, version)
    conversation = Conversation(loaded, max_new_tokens)
    _say(header(loaded, conversation.keeps_history))
    for line in lines:
        prompt = line.rstrip("\r\n")
        word = prompt.strip()
        if not word:
            continue
        if word == "/quit":
            break
        if word == "/reset":
            conversation.reset()
            err.print("(conversation cleared)" if conversation.keeps_history else
                      "(nothing to clear: each line is answered alone)", markup=False)
        elif word.startswith("/") and " " not in word:  # "/etc/hosts is what?" is a prompt, "/rset" a typo
            err.print(f"unknown command {word}: /reset starts over, /quit ends", markup=False)
        else:
            answer, dropped = conversation.ask(prompt)
            if dropped:
                err.print(f"({dropped} oldest exchange(s) dropped: the conversation outgrew the model's "
                          f"{loaded.context} positions)", markup=False)
            _say(answer)


def input_lines() -> Iterator[str]:
    """Lines typed at a terminal (after a `> ` prompt, with line editing) or piped in, until end of input."""
    if not sys.stdin.isatty():
        yield from sys.stdin
        return
    try:
        import readline  # noqa: F401  (arrow keys and history for input())
    except ImportError:
        pass
    while True:
        try:
            yield input("> ")
        except EOFError:
            return


def _say(text: str) -> None:
    # Not rich: an answer is printed byte for byte, whatever brackets or :codes: it holds.
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _checkpoint(ws: Workspace, version: str | None) -> tuple[runs.Run, ck.Checkpoint, str | None]:
    """The checkpoint to answer with: the version's, or the active run's newest verified one."""
    from .versions import checkpoint, name

    if version is not None:
        return checkpoint(ws.db, ws.runs, version)
    run = runs.active(ws.db)
    found = ck.newest_verified(ws.run_dir(run.id), save=False)[0] if run else None
    if found is None:
        raise ConveyorError("nothing trained yet: there is no checkpoint to answer with; train a file first "
                            "(`conveyor train FILE`)")
    latest = ws.db.execute("SELECT id FROM versions WHERE run_id = ? AND step = ? AND lost = 0",
                           (run.id, found.step)).fetchone()
    return run, found, name(latest["id"]) if latest else None


def _chat_template(ws: Workspace) -> str:
    try:
        return ws.config().data.chat_template
    except ConveyorError:  # invalid settings: the model's own template
        return ""
