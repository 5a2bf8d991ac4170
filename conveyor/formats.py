"""Input formats: validate a JSONL file whole, then turn its examples into token ids and loss masks.

Formats, detected per file: `text`; `messages` (chat, loss on every assistant turn);
`prompt` + `completion` (loss on the completion only).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DataError

TEXT, CHAT, PROMPT = "text", "messages", "prompt_completion"
ROLES = ("system", "user", "assistant")
MAX_REPORTED = 20
IGNORE = -100  # label id that the loss skips (Hugging Face convention)


@dataclass
class Example:
    line: int  # 1-based line number in the file
    record: dict


@dataclass
class ParsedFile:
    format: str
    examples: list[Example]


def _format_of(record: dict) -> str:
    keys = set(record)
    if keys == {"text"}:
        return TEXT
    if keys == {"messages"}:
        return CHAT
    if keys == {"prompt", "completion"}:
        return PROMPT
    raise ValueError(
        f"keys {sorted(keys)} match no format; use {{\"text\"}}, {{\"messages\"}} or {{\"prompt\", \"completion\"}}"
    )


def _nonempty_str(record: dict, key: str) -> None:
    value = record[key]
    if not isinstance(value, str):
        raise ValueError(f'"{key}" must be a string, found {type(value).__name__}')
    if not value.strip():
        raise ValueError(f'"{key}" is empty')


def _check_messages(messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError('"messages" must be a non-empty list')
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) != {"role", "content"}:
            raise ValueError(f'messages[{i}] must be an object with exactly "role" and "content"')
        if message["role"] not in ROLES:
            raise ValueError(f'messages[{i}].role {message["role"]!r} is unknown; use one of {", ".join(ROLES)}')
        if not isinstance(message["content"], str) or not message["content"].strip():
            raise ValueError(f"messages[{i}].content must be a non-empty string")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant turn, so nothing to train on")


def _check_record(record) -> str:
    if not isinstance(record, dict):
        raise ValueError(f"a line must be a JSON object, found {type(record).__name__}")
    fmt = _format_of(record)
    if fmt == TEXT:
        _nonempty_str(record, "text")
    elif fmt == PROMPT:
        _nonempty_str(record, "prompt")
        _nonempty_str(record, "completion")
    else:
        _check_messages(record["messages"])
    return fmt


def parse_file(path: Path, name: str | None = None) -> ParsedFile:
    """Read and validate a whole JSONL file; raise DataError listing every bad line (under `name`)."""
    problems: list[tuple[int, str]] = []
    examples: list[Example] = []
    formats: dict[str, int] = {}
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                problems.append((number, f"invalid UTF-8 at byte {e.start}"))
                continue
            if not text.strip():
                continue  # blank lines are not examples
            try:
                record = json.loads(text)
                fmt = _check_record(record)
            except json.JSONDecodeError as e:
                problems.append((number, f"invalid JSON: {e.msg} at column {e.colno}"))
                continue
            except ValueError as e:
                problems.append((number, str(e)))
                continue
            formats.setdefault(fmt, number)
            examples.append(Example(number, record))
    if len(formats) > 1:
        first = ", ".join(f"{fmt} (first on line {line})" for fmt, line in formats.items())
        problems.append((0, f"the file mixes formats: {first}; one file must use one format"))
    if not examples and not problems:
        problems.append((0, "the file has no examples"))
    if problems:
        raise DataError(describe_problems(name or path.name, problems))
    return ParsedFile(next(iter(formats)), examples)


def describe_problems(name: str, problems: list[tuple[int, str]]) -> str:
    """Plain-language report: the first MAX_REPORTED problems by line and a count of the rest."""
    shown = problems[:MAX_REPORTED]
    lines = [f"  line {n}: {msg}" if n else f"  {msg}" for n, msg in shown]
    if len(problems) > MAX_REPORTED:
        lines.append(f"  ... and {len(problems) - MAX_REPORTED} more problem(s)")
    return f"{name}: rejected, nothing trained from it ({len(problems)} problem(s)):\n" + "\n".join(lines) + (
        "\nFix the lines above and add the file again."
    )


@dataclass
class Tokenized:
    line: int
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False


@dataclass
class TokenizedFile:
    examples: list[Tokenized]
    truncated_lines: list[int] = field(default_factory=list)
    excluded_lines: list[int] = field(default_factory=list)  # nothing trainable left after truncation
    tokens: int = 0


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def _segments(tokenizer, record: dict, fmt: str) -> list[tuple[str, bool]]:
    """(text, trainable) pieces whose concatenation is the full rendered example."""
    bos = tokenizer.bos_token or ""
    eos = tokenizer.eos_token or ""
    if fmt == TEXT:
        return [(bos, False), (record["text"] + eos, True)]
    if fmt == PROMPT:
        return [(bos + record["prompt"], False), (record["completion"] + eos, True)]
    return _chat_segments(tokenizer, record["messages"])


def _chat_segments(tokenizer, messages: list[dict]) -> list[tuple[str, bool]]:
    # Render growing prefixes so every assistant turn's reply is trainable and everything else is context.
    render = lambda msgs, gen=False: tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    segments, done = [], ""
    for i, message in enumerate(messages):
        full = render(messages[: i + 1])
        if message["role"] == "assistant":
            header = render(messages[:i], gen=True) if i else ""
            if header and full.startswith(header) and header.startswith(done):
                segments.append((header[len(done):], False))
                done = header
        if not full.startswith(done):
            raise DataError("the model's chat template does not render conversations prefix by prefix; "
                            "conveyor cannot tell assistant turns apart with it")
        segments.append((full[len(done):], message["role"] == "assistant"))
        done = full
    return segments


def tokenize_file(parsed: ParsedFile, tokenizer, max_length: int) -> TokenizedFile:
    """Token ids and labels per example, truncated to max_length; examples with nothing trainable left are excluded."""
    out = TokenizedFile(examples=[])
    for example in parsed.examples:
        ids: list[int] = []
        labels: list[int] = []
        for text, trainable in _segments(tokenizer, example.record, parsed.format):
            piece = _encode(tokenizer, text)
            ids += piece
            labels += piece if trainable else [IGNORE] * len(piece)
        truncated = len(ids) > max_length
        ids, labels = ids[:max_length], labels[:max_length]
        if truncated:
            out.truncated_lines.append(example.line)
        # A causal LM predicts token t from tokens < t, so label position 0 never counts.
        if all(label == IGNORE for label in labels[1:]):
            out.excluded_lines.append(example.line)
            continue
        out.examples.append(Tokenized(example.line, ids, labels, truncated))
        out.tokens += len(ids)
    return out


CACHE_VERSION = 1


def tokenize_cached(path: Path, name: str, tokenizer, max_length: int, cache_dir: Path, key: str) -> TokenizedFile:
    """tokenize_file(parse_file(...)), remembered in cache_dir under `key` (content fingerprint, tokenizer
    and max_length), so resuming a large job does not tokenize it again. The cache is derived data: an
    unreadable entry is simply rebuilt."""
    import hashlib
    import os
    import pickle

    entry = cache_dir / (hashlib.sha256(f"{CACHE_VERSION}:{key}:{max_length}".encode()).hexdigest()[:32] + ".pkl")
    try:
        with open(entry, "rb") as f:
            return pickle.load(f)
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError):
        pass
    data = tokenize_file(parse_file(path, name), tokenizer, max_length)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = entry.with_suffix(f".{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        pickle.dump(data, f, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, entry)
    return data
