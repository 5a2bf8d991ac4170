"""`conveyor preview`: each example of a file exactly as training sees it (the workspace's model, chat template
and max_length, after truncation), with the trainable tokens marked. How a person checks a model family's
template before days of training. A preference pair shows its prompt once, then both answers, each marked and
counted as training sees its side; a feedback answer shows its label."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from rich.text import Text

from ..config import Config
from ..data.chat import METHODS, ChatError, load_tokenizer, method
from ..data.formats import (
    CHAT,
    PREFERENCE_FORMATS,
    Tokenized,
    describe_template_problems,
    parse_file,
    tokenize_example,
    trainable,
    trainable_positions,
)
from ..errors import ConveyorError, DataError
from ..store.workspace import Workspace


@dataclass
class Side:
    """One token sequence training sees (an example, or one side of a pair): counts of the whole sequence, as
    training counts them, and decoded runs of tokens, each trainable or not."""
    tokens: int
    trainable_tokens: int
    pieces: list[tuple[str, bool]]  # (decoded text, trainable), in order; a pair's side: its answer only
    text: str  # all its tokens decoded (a pair's side: the prompt too)

    def to_json(self) -> dict:
        return {"tokens": self.tokens, "trainable_tokens": self.trainable_tokens, "text": self.text,
                "trainable": [text for text, trained in self.pieces if trained]}


@dataclass
class Shown:
    """One example as training sees it. A preference pair: its prompt (the tokens both sides share before either
    trains one) shown once, then the chosen side's answer in `side` and the rejected side's in `rejected`."""
    line: int
    side: Side
    truncated: bool  # a pair: either side
    trained: bool  # some token carries loss (a pair: in both answers); else training leaves the example out
    prompt: str | None = None  # a pair's shared prompt, decoded (no token of it trains)
    rejected: Side | None = None
    label: bool | None = None  # feedback: a good (True) or bad (False) answer

    def to_json(self) -> dict:
        if self.rejected is None:
            return {"line": self.line, **self.side.to_json(),
                    **({} if self.label is None else {"label": self.label})}
        return {"line": self.line, "prompt": self.prompt,
                "chosen": self.side.to_json(), "rejected": self.rejected.to_json()}


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
    conversations = parsed.format == CHAT or (parsed.format in PREFERENCE_FORMATS and
                                              any(isinstance(e.record["prompt"], list) for e in selected))
    masking = METHODS[method(tokenizer)] if conversations else None
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
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    flags = trainable_positions(example)
    if example.rejected_ids is None:
        side = Side(len(example.input_ids), sum(flags), _pieces(decode, example.input_ids, flags),
                    decode(example.input_ids))
        return Shown(example.line, side, example.truncated, trainable(example), label=example.label)
    # The rejected side as an example of its own, so that trainable_positions stays the one definition.
    rejected_flags = trainable_positions(Tokenized(example.line, example.rejected_ids, example.rejected_labels))
    start = _prompt_length(example.input_ids, flags, example.rejected_ids, rejected_flags)
    sides = [Side(len(ids), sum(marks), _pieces(decode, ids[start:], marks[start:]), decode(ids))
             for ids, marks in ((example.input_ids, flags), (example.rejected_ids, rejected_flags))]
    return Shown(example.line, sides[0], example.truncated, trainable(example),
                 decode(example.input_ids[:start]), sides[1])


def _prompt_length(ids: list[int], flags: list[bool], other: list[int], other_flags: list[bool]) -> int:
    """How many first tokens are a pair's prompt: those its two sides share before either has a trained one (a
    chat template's reply header, shared, is the prompt's; two answers that start alike are each their own)."""
    shared = 0
    while shared < min(len(ids), len(other)) and ids[shared] == other[shared]:
        shared += 1
    first = lambda marks: next((k for k, mark in enumerate(marks) if mark), len(marks))
    return min(shared, first(flags), first(other_flags))


def _pieces(decode, ids: list[int], flags: list[bool]) -> list[tuple[str, bool]]:
    """Runs of tokens alike in being trained or not, each decoded."""
    pieces: list[tuple[str, bool]] = []
    start = 0
    for k in range(1, len(flags) + 1):
        if k == len(flags) or flags[k] != flags[start]:
            pieces.append((decode(ids[start:k]), flags[start]))
            start = k
    return pieces


OPEN, CLOSE = "⟦", "⟧"  # around trained text where colour is lost (a pipe, a file)
TRAINED = "bold black on green"  # trained text on a terminal


def describe(preview: Preview, plain: bool = False) -> list[Text]:
    """The human view: a header, then per example its counts and its text with the trainable spans marked: in
    colour on a terminal, between ⟦ and ⟧ when `plain` (a pipe or a file keeps no colour). A pair: the counts of
    each side, then its prompt once and each answer after its name; a feedback answer: its label."""
    head = f"model {preview.model} · training.max_length {preview.max_length}"
    if preview.masking:
        head += f" · replies found by {preview.masking}"
    legend = Text(f"{OPEN}trained{CLOSE}") if plain else Text("trained", style=TRAINED)
    out = [Text.assemble((head + " · ", "dim"), legend, (" / context", "dim"))]  # `+` would dim the legend too
    for shown in preview.examples:
        counts = (_counts(shown.side) if shown.rejected is None
                  else f"chosen {_counts(shown.side)}; rejected {_counts(shown.rejected)}")
        notes = "".join(f"; {note}" for note in _notes(shown, preview.max_length))
        out.append(Text(f"\nline {shown.line}: {counts}{notes}", style="bold"))
        if shown.rejected is None:
            out.append(_marked(shown.side.pieces, plain))
            continue
        for name, pieces in (("prompt", [(shown.prompt, False)]), ("chosen", shown.side.pieces),
                             ("rejected", shown.rejected.pieces)):
            out.append(Text.assemble((f"{name}: ", "" if plain else "dim"), _marked(pieces, plain)))
    return out


def _notes(shown: Shown, max_length: int) -> list[str]:
    notes = ["labelled good (true)" if shown.label else "labelled bad (false)"] if shown.label is not None else []
    if shown.truncated:
        notes.append(f"truncated at {max_length} tokens")
    if not shown.trained:
        notes.append("not trained: nothing trainable is left" + _where_nothing_trains(shown))
    return notes


def _where_nothing_trains(shown: Shown) -> str:
    """Which answer of a pair has nothing trainable left (a pair trains only when both have some)."""
    if shown.rejected is None:
        return ""
    empty = [name for name, side in (("chosen", shown.side), ("rejected", shown.rejected)) if not side.trainable_tokens]
    return " in either answer" if len(empty) == 2 else f" in the {empty[0]} answer"


def _counts(side: Side) -> str:
    return f"{side.tokens} tokens, {side.trainable_tokens} trainable"


def _marked(pieces: list[tuple[str, bool]], plain: bool) -> Text:
    body = Text()
    for text, trained in pieces:
        if plain:
            body.append(f"{OPEN}{text}{CLOSE}" if trained else text)
        else:
            body.append(text, style=TRAINED if trained else "")
    return body
