"""`conveyor preview`: each example of a file exactly as training sees it (the workspace's model, chat template
and max_length, after truncation), with the trainable tokens marked. How a person checks a model family's
template before days of training."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from rich.text import Text

from ..config import Config
from ..data.chat import METHODS, ChatError, load_tokenizer, method
from ..data.formats import (
    CHAT,
    Tokenized,
    describe_template_problems,
    parse_file,
    tokenize_example,
    trainable_positions,
)
from ..errors import ConveyorError, DataError
from ..store.workspace import Workspace


@dataclass
class Shown:
    """One example as training sees it: decoded runs of tokens, each trainable or not."""
    line: int
    tokens: int
    trainable_tokens: int
    pieces: list[tuple[str, bool]]  # (decoded text, trainable), in order
    text: str  # all its tokens decoded
    truncated: bool

    def to_json(self) -> dict:
        return {"line": self.line, "tokens": self.tokens, "trainable_tokens": self.trainable_tokens,
                "text": self.text, "trainable": [text for text, trainable in self.pieces if trainable]}


@dataclass
class Preview:
    examples: list[Shown]
    model: str
    max_length: int
    masking: str | None  # how chat replies are found; None for other formats


def preview_file(ws: Workspace, file: Path, lines: str | None = None) -> Preview:
    """Tokenize the file (or the examples on `lines`, "A-B") exactly as a job of this workspace would."""
    first, last = parse_lines(lines) if lines else (1, None)
    config = ws.config()
    parsed = parse_file(_readable(file), preview=True)
    selected = [e for e in parsed.examples if e.line >= first and (last is None or e.line <= last)]
    if not selected:
        raise ConveyorError(f"--lines {lines}: {file} has no examples there (its examples are on lines "
                            f"{parsed.examples[0].line}–{parsed.examples[-1].line}); pick a range inside that")
    tokenizer = _tokenizer(ws, config)
    shown, problems = [], []
    for example in selected:  # the same call as training's tokenize_file, which also names every problem
        try:
            shown.append(_show(tokenizer, tokenize_example(tokenizer, example, parsed.format,
                                                           config.training.max_length)))
        except ChatError as e:
            problems.append((example.line, e))
    if problems:
        raise DataError(describe_template_problems(file.name, problems))
    masking = METHODS[method(tokenizer)] if parsed.format == CHAT else None
    return Preview(shown, config.model.name, config.training.max_length, masking)


def parse_lines(spec: str) -> tuple[int, int]:
    """"A-B" (or "A") as (first, last) file line numbers."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", spec)
    if not match:
        raise ConveyorError(f"--lines {spec!r} is not a line range; give A-B with line numbers from 1 "
                            "(e.g. --lines 1-20) or one line (--lines 7)")
    first, last = int(match[1]), int(match[2] or match[1])
    if first < 1 or last < first:
        raise ConveyorError(f"--lines {spec}: lines are numbered from 1 and the range must not end before it "
                            "starts; e.g. --lines 1-20")
    return first, last


def _readable(file: Path) -> Path:
    if not file.exists():
        raise ConveyorError(f"{file}: no such file; give the path of a JSONL file to preview")
    if file.is_dir():
        raise ConveyorError(f"{file} is a folder; give the path of one JSONL file in it")
    return file


def _tokenizer(ws: Workspace, config: Config):
    try:
        return load_tokenizer(ws.model_path(config.model.name), config.data.chat_template, ws.root)
    except (OSError, ValueError) as e:
        raise ConveyorError(f"cannot load the tokenizer of model.name = {config.model.name!r} ({e}); set "
                            "model.name in conveyor.toml to \"tiny\" or a local model folder") from None


def _show(tokenizer, example: Tokenized) -> Shown:
    flags = trainable_positions(example)
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    pieces: list[tuple[str, bool]] = []
    start = 0
    for k in range(1, len(flags) + 1):
        if k == len(flags) or flags[k] != flags[start]:
            pieces.append((decode(example.input_ids[start:k]), flags[start]))
            start = k
    return Shown(example.line, len(example.input_ids), sum(flags), pieces, decode(example.input_ids),
                 example.truncated)


OPEN, CLOSE = "⟦", "⟧"  # around trained text where colour is lost (a pipe, a file)


def describe(preview: Preview, plain: bool = False) -> list[Text]:
    """The human view: a header, then per example its counts and its text with the trainable spans marked: in
    colour on a terminal, between ⟦ and ⟧ when `plain` (a pipe or a file keeps no colour)."""
    head = f"model {preview.model} · training.max_length {preview.max_length}"
    if preview.masking:
        head += f" · replies found by {preview.masking}"
    legend = Text(f"{OPEN}trained{CLOSE}") if plain else Text("trained", style="bold black on green")
    out = [Text(head + " · ", style="dim") + legend + Text(" / context", style="dim")]
    for shown in preview.examples:
        notes = [f"truncated at {preview.max_length} tokens"] if shown.truncated else []
        if not shown.trainable_tokens:
            notes.append("not trained: nothing trainable is left")
        out.append(Text(f"\nline {shown.line}: {shown.tokens} tokens, {shown.trainable_tokens} trainable"
                        + "".join(f"; {note}" for note in notes), style="bold"))
        body = Text()
        for text, trainable in shown.pieces:
            if plain:
                body.append(f"{OPEN}{text}{CLOSE}" if trainable else text)
            else:
                body.append(text, style="bold black on green" if trainable else "")
        out.append(body)
    return out
