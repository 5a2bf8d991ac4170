"""Input formats: validate a JSONL file whole, then turn its examples into token ids and loss masks.

Formats, detected per file: `text`; `messages` (chat, loss on every assistant reply and its end-of-turn
marker; how a conversation is rendered and masked is chat.py's job); `prompt` + `completion` (loss on the
completion only). ShareGPT files (`conversations` of `from`/`value`) are read as `messages`, Alpaca files
(`instruction`, `input`, `output`) as `prompt` + `completion`.

Preference pairs (`prompt`, `chosen`, `rejected`) and unpaired feedback (`prompt`, `completion`, `label`) are
TRL's formats: strings, or conversations (the prompt a list of messages, each answer the assistant message(s)
after it); a pair of two whole conversations sharing their first messages (TRL's implicit prompt) has that shared
start as its prompt. A pair is one example: both answers, each tokenized after the prompt with loss on the answer.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ..errors import DataError
from .chat import ChatError, RenderedChat, render_chat

TEXT, CHAT, PROMPT = "text", "messages", "prompt_completion"
PAIR, FEEDBACK = "preference", "feedback"  # trained with a preference loss (training.preference) and with KTO
PREFERENCE_FORMATS = (PAIR, FEEDBACK)
ROLES = ("system", "user", "assistant")
MAX_REPORTED = 20
IGNORE = -100  # label id that the loss skips (Hugging Face convention)
MAX_LINE_BYTES = 64 << 20  # one example longer than this is a mistake; reading it whole could exhaust memory
CHUNK = 1 << 20  # how much of an over-long line is read at a time while skipping it
SNIFF_BYTES = 4096  # enough of the start of a file to tell compressed data or UTF-16 from JSONL
UTF8_BOM = b"\xef\xbb\xbf"
UTF16 = "UTF-16 text: save it as UTF-8 (most editors offer the encoding under \"Save as\") and add it again"
# First bytes of what people drop by mistake; none can start a JSONL line.
MAGIC = [
    (b"\x1f\x8b", "gzip-compressed data: decompress it (gunzip) and drop the .jsonl"),
    (b"PK\x03\x04", "a zip archive: extract it (unzip) and drop the .jsonl files in it"),
    (b"PK\x05\x06", "an empty zip archive: there is nothing in it to train"),
    (b"BZh", "bzip2-compressed data: decompress it (bunzip2) and drop the .jsonl"),
    (b"\xfd7zXZ\x00", "xz-compressed data: decompress it (unxz) and drop the .jsonl"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed data: decompress it (unzstd) and drop the .jsonl"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive: extract it (7z x) and drop the .jsonl files in it"),
    (b"\xff\xfe\x00\x00", "UTF-32 text: save it as UTF-8 and add it again"),
    (b"\x00\x00\xfe\xff", "UTF-32 text: save it as UTF-8 and add it again"),
    (b"\xff\xfe", UTF16),
    (b"\xfe\xff", UTF16),
]


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
    if keys == {"prompt", "chosen", "rejected"}:
        return PAIR
    if keys == {"prompt", "completion", "label"}:
        return FEEDBACK
    if keys == {"chosen", "rejected"}:
        raise ValueError('"chosen" and "rejected" without "prompt": give the question as "prompt" (or both as whole '
                         "conversations, lists of messages sharing their first messages)")
    raise ValueError(
        f"keys {sorted(keys)} match no format; use {{\"text\"}}, {{\"messages\"}} or {{\"prompt\", \"completion\"}} "
        "(or ShareGPT {\"conversations\"}, Alpaca {\"instruction\", \"input\", \"output\"}), preference pairs "
        "{\"prompt\", \"chosen\", \"rejected\"} or feedback {\"prompt\", \"completion\", \"label\"}"
    )


def _nonempty_str(record: dict, key: str) -> None:
    value = record[key]
    if not isinstance(value, str):
        raise ValueError(f'"{key}" must be a string, found {type(value).__name__}')
    if not value.strip():
        raise ValueError(f'"{key}" is empty')
    _encodable(value, f'"{key}"')


def _encodable(value: str, where: str) -> None:
    # JSON may escape half of a UTF-16 surrogate pair ("\\ud800"), which is no text: tokenizing it would fail
    # later, mid-training, so it is a bad line here.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{where} holds an unpaired surrogate \\u{ord(value[e.start]):04x} at character "
                         f"{e.start + 1}, which is not text; remove it, or write the character itself") from None


def _check_messages(messages, key: str = "messages", answer: bool = True) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f'"{key}" must be a non-empty list')
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) != {"role", "content"}:
            raise ValueError(f'{key}[{i}] must be an object with exactly "role" and "content"')
        if message["role"] not in ROLES:
            raise ValueError(f'{key}[{i}].role {message["role"]!r} is unknown; use one of {", ".join(ROLES)}')
        if not isinstance(message["content"], str) or not message["content"].strip():
            raise ValueError(f"{key}[{i}].content must be a non-empty string")
        _encodable(message["content"], f"{key}[{i}].content")
    if answer and not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant turn, so nothing to train on" if key == "messages" else
                         f'"{key}" has no assistant message, so it is no answer')


def _check_answers(record: dict, keys: tuple[str, ...]) -> None:
    """A prompt and its answer(s) (`keys`), all strings or all conversations: the prompt a list of messages, each
    answer the message(s) after it, ending with the assistant's."""
    if isinstance(record["prompt"], list):
        _check_messages(record["prompt"], "prompt", answer=False)
        for key in keys:
            if not isinstance(record[key], list):
                raise ValueError(f'"prompt" is a conversation, so "{key}" must be one too (a list of messages), '
                                 f"found {type(record[key]).__name__}")
            _check_messages(record[key], key)
            if record[key][-1]["role"] != "assistant":
                raise ValueError(f'"{key}" must end with the assistant\'s message, the answer that trains')
        return
    _nonempty_str(record, "prompt")
    for key in keys:
        _nonempty_str(record, key)


def _check_pair(record: dict) -> None:
    _check_answers(record, ("chosen", "rejected"))
    if record["chosen"] == record["rejected"]:
        raise ValueError('"chosen" and "rejected" are the same answer: there is nothing to prefer')


def _check_feedback(record: dict) -> None:
    _check_answers(record, ("completion",))
    if not isinstance(record["label"], bool):
        raise ValueError(f'"label" must be true (a good answer) or false (a bad one), found {record["label"]!r}')


def _check_record(record) -> str:
    if not isinstance(record, dict):
        raise ValueError(f"a line must be a JSON object, found {type(record).__name__}")
    fmt = _format_of(record)
    if fmt == TEXT:
        _nonempty_str(record, "text")
    elif fmt == PROMPT:
        _nonempty_str(record, "prompt")
        _nonempty_str(record, "completion")
    elif fmt == PAIR:
        _check_pair(record)
    elif fmt == FEEDBACK:
        _check_feedback(record)
    else:
        _check_messages(record["messages"])
    return fmt


def parse_file(path: Path, name: str | None = None, preview: bool = False) -> ParsedFile:
    """Read and validate a whole JSONL file into memory (preview, evaluation: small files); raise DataError
    listing every bad line (under `name`; worded for `conveyor preview` when `preview`). Training streams the file
    instead (scan_file, stream_examples)."""
    examples: list[Example] = []
    fmt = _validated(path, name or path.name, lambda example, _: examples.append(example), preview)
    return ParsedFile(fmt, examples)


def scan_file(path: Path, name: str | None = None) -> tuple[str, int]:
    """(format, example count) of a valid JSONL file, read as a stream: memory stays flat whatever its size.
    DataError lists every bad line (the first MAX_REPORTED and a count), as parse_file does."""
    count = 0

    def one(example: Example, fmt: str) -> None:
        nonlocal count
        count += 1

    return _validated(path, name or path.name, one), count


def stream_examples(path: Path, name: str | None = None) -> Iterator[tuple[Example, str]]:
    """(example, format) of each line of a file validated before (a stored copy), one at a time."""
    with open(path, "rb") as f:
        for number, raw in _read_lines(f, max_line_bytes()):
            try:
                parsed = _parse_line(number, raw, max_line_bytes())
            except ValueError as e:
                raise DataError(describe_problems(name or path.name, [(number, str(e))])) from None
            if parsed is not None:
                yield Example(number, parsed[0]), parsed[1]


def _validated(path: Path, name: str, each, preview: bool = False) -> str:
    """Check every line, calling each(example, format) for the good ones; the file's format, or DataError."""
    labels: dict[bool, int] = {}  # feedback: how many answers of each kind

    def counted(example: Example, fmt: str) -> None:
        if fmt == FEEDBACK:
            labels[example.record["label"]] = labels.get(example.record["label"], 0) + 1
        each(example, fmt)

    with open(path, "rb") as f:
        kind = what_it_is(f.read(SNIFF_BYTES))
        if kind:
            raise DataError(describe_problems(name, [(0, kind)], preview=preview))
        f.seek(0)
        problems, total, formats = _parse_lines(f, max_line_bytes(), counted)
    if len(labels) == 1 and len(formats) == 1:
        kind, count = next(iter(labels.items()))
        problems.append((0, f"every one of the {count} feedback answers is labelled {str(kind).lower()}: KTO learns "
                            "from the difference between good and bad answers, so a file needs both (true and false); "
                            + ("train good answers alone as {\"prompt\", \"completion\"} (supervised)" if kind else
                               "add answers labelled true")))
        total += 1
    if len(formats) > 1:
        first = ", ".join(f"{fmt} (first on line {line})" for fmt, line in formats.items())
        problems.append((0, f"the file mixes formats: {first}; one file must use one format"))
        total += 1
    if not formats and not problems:
        problems.append((0, "the file has no examples"))
        total += 1
    if problems:
        raise DataError(describe_problems(name, problems, total, preview))
    return next(iter(formats))


def _parse_lines(f, limit: int, each) -> tuple[list[tuple[int, str]], int, dict[str, int]]:
    """Every line checked: (the first MAX_REPORTED problems by line, their total, first line of each format)."""
    problems: list[tuple[int, str]] = []
    total = 0
    formats: dict[str, int] = {}
    for number, raw in _read_lines(f, limit):
        try:
            parsed = _parse_line(number, raw, limit)
        except ValueError as e:
            total += 1
            if len(problems) < MAX_REPORTED:  # a file of a million bad lines must not fill the memory
                problems.append((number, str(e)))
            continue
        if parsed is not None:  # blank lines are not examples
            record, fmt = parsed
            formats.setdefault(fmt, number)
            each(Example(number, record), fmt)
    return problems, total, formats


def _read_lines(f, limit: int):
    """(line number, bytes) for every line; a line longer than `limit` is skipped, never held in memory,
    and yielded as None."""
    number = 0
    while raw := f.readline(limit + 1):
        number += 1
        if len(raw) > limit and not raw.endswith(b"\n"):
            while (rest := f.readline(CHUNK)) and not rest.endswith(b"\n"):
                pass
            raw = None
        yield number, raw


def _parse_line(number: int, raw: bytes | None, limit: int) -> tuple[dict, str] | None:
    """(record, format) of one line, None for a blank line; ValueError says what is wrong with it."""
    if raw is None:
        raise ValueError(f"longer than {_size(limit)}, the most one line may hold; split it into smaller examples")
    if b"\0" in raw:
        raise ValueError(f"binary data: a NUL byte at byte {raw.index(0)}; a JSONL file holds only text")
    bom = len(UTF8_BOM) if number == 1 and raw.startswith(UTF8_BOM) else 0  # harmless, some editors add it
    try:
        text = raw[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"invalid UTF-8 at byte {e.start + bom}; save the file as UTF-8") from None
    if not text.strip():
        return None
    text = text.rstrip("\r\n")  # the line's end is not part of the JSON: a fault at the end is at its last column
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        # removesuffix: some of json's messages end in " at" already ("Invalid control character at").
        end = " (the end of the line: is something missing?)" if e.pos >= len(text) else ""
        raise ValueError(f"invalid JSON: {e.msg.removesuffix(' at')} at column {e.pos + 1}{end}") from None
    except RecursionError:  # the json module recurses once per level: a hostile line must not end the daemon
        raise ValueError("nested deeper than the JSON parser allows; an example is one flat JSON object") from None
    record = _canonical(record)
    return record, _check_record(record)


# ShareGPT speakers and the chat roles they are; Alpaca's prompt is the instruction, then the input if any.
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant", "chatgpt": "assistant", "bard": "assistant"}
ALPACA_SEPARATOR = "\n\n"


def _canonical(record):
    """ShareGPT (`conversations` of `from`/`value`, an optional `system`) as `messages`, and Alpaca
    (`instruction`, optional `input`, `output`) as `prompt`/`completion`; any other record as it is."""
    if not isinstance(record, dict):
        return record
    keys = set(record)
    if keys == {"chosen", "rejected"} and isinstance(record["chosen"], list) and isinstance(record["rejected"], list):
        return _implicit_prompt(record)
    if "conversations" in keys and keys <= {"conversations", "system"}:
        return {"messages": _sharegpt_messages(record)}
    if {"instruction", "output"} <= keys and keys <= {"instruction", "input", "output"}:
        for key in keys:
            if not isinstance(record[key], str):
                raise ValueError(f'"{key}" must be a string, found {type(record[key]).__name__}')
        extra = record.get("input", "")
        prompt = record["instruction"] + (ALPACA_SEPARATOR + extra if extra.strip() else "") + ALPACA_SEPARATOR
        return {"prompt": prompt if record["instruction"].strip() else record["instruction"],
                "completion": record["output"]}
    return record


def _implicit_prompt(record: dict) -> dict:
    """Two whole conversations as a pair: the messages they share from the start are the prompt (TRL's implicit
    prompt), the rest of each its answer."""
    chosen, rejected = record["chosen"], record["rejected"]
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0:
        raise ValueError('"chosen" and "rejected" share no first message, so there is no prompt; give it as '
                         '"prompt" (a list of messages) and the answers after it')
    if shared == min(len(chosen), len(rejected)):  # else an empty answer would be named "a non-empty list" below
        if len(chosen) == len(rejected):
            raise ValueError('"chosen" and "rejected" are the same conversation: there is nothing to prefer')
        short = "chosen" if len(chosen) == shared else "rejected"
        raise ValueError(f'"{short}" is the start of the other conversation, so it has no answer of its own; each '
                         "must end with its own assistant message after the messages they share")
    return {"prompt": chosen[:shared], "chosen": chosen[shared:], "rejected": rejected[shared:]}


def _sharegpt_messages(record: dict) -> list[dict]:
    turns = record["conversations"]
    if not isinstance(turns, list) or not turns:
        raise ValueError('"conversations" must be a non-empty list')
    messages = []
    if record.get("system"):
        if not isinstance(record["system"], str):
            raise ValueError(f'"system" must be a string, found {type(record["system"]).__name__}')
        messages.append({"role": "system", "content": record["system"]})
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or set(turn) != {"from", "value"}:
            raise ValueError(f'conversations[{i}] must be an object with exactly "from" and "value"')
        role = SHAREGPT_ROLES.get(str(turn["from"]).lower())
        if role is None:
            raise ValueError(f'conversations[{i}].from {turn["from"]!r} is unknown; use one of '
                             f'{", ".join(SHAREGPT_ROLES)}')
        messages.append({"role": role, "content": turn["value"]})
    return messages


def what_it_is(head: bytes) -> str | None:
    """What a file is when its first bytes show it is not UTF-8 JSONL (which starts with `{`, a space or a
    UTF-8 BOM), as a message saying what to do; None when it may be JSONL."""
    for magic, kind in MAGIC:
        if head.startswith(magic):
            return f"this looks like {kind}"
    if _utf16_without_bom(head):
        return f"this looks like {UTF16}"
    return None


def _utf16_without_bom(head: bytes) -> bool:
    """JSON's punctuation and keys are ASCII, so UTF-16 has a NUL in every other byte (odd ones in little-endian,
    even ones in big-endian) and none in the others."""
    head = head[: len(head) // 2 * 2]
    for text, zeros in ((head[0::2], head[1::2]), (head[1::2], head[0::2])):
        if text and 0 not in text and zeros.count(0) * 2 >= len(zeros):
            return True
    return False


def max_line_bytes() -> int:
    """MAX_LINE_BYTES, or CONVEYOR_MAX_LINE_BYTES when set to a positive integer (a machine with little memory,
    or a test, lowers it without editing code; any other value is ignored)."""
    value = os.environ.get("CONVEYOR_MAX_LINE_BYTES", "")
    return int(value) if value.isdigit() and int(value) > 0 else MAX_LINE_BYTES


def _size(n: int) -> str:
    for unit, size in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} bytes"


def describe_problems(name: str, problems: list[tuple[int, str]], total: int | None = None,
                      preview: bool = False) -> str:
    """Plain-language report: the first MAX_REPORTED problems by line and a count of the rest (of `total`). The
    inbox rejects the file; `conveyor preview` (`preview`), which never adds or trains it, says it would be."""
    total = len(problems) if total is None else total
    shown = problems[:MAX_REPORTED]
    lines = [f"  line {n}: {msg}" if n else f"  {msg}" for n, msg in shown]
    if total > len(shown):
        lines.append(f"  ... and {total - len(shown)} more problem(s)")
    by_line = any(n for n, _ in problems)
    if preview:
        head = f"{name} would be rejected"
        fix = "Fix the lines above, then add the file." if by_line else "Fix the file, then add it."
    else:
        head = f"{name}: rejected, nothing trained from it"
        fix = "Fix the lines above and add the file again." if by_line else "Fix the file and add it again."
    return f"{head} ({total} problem(s)):\n" + "\n".join(lines) + "\n" + fix


@dataclass
class Tokenized:
    line: int
    input_ids: list[int]  # a pair's chosen answer after its prompt
    labels: list[int]
    truncated: bool = False
    rejected_ids: list[int] | None = None  # a preference pair's rejected answer after its prompt
    rejected_labels: list[int] | None = None
    label: bool | None = None  # feedback: a good (True) or bad (False) answer

    @property
    def tokens(self) -> int:
        return len(self.input_ids) + len(self.rejected_ids or ())


@dataclass
class TokenizedFile:
    examples: list[Tokenized]
    truncated_lines: list[int] = field(default_factory=list)  # all of them, or the first ones (see truncated)
    excluded_lines: list[int] = field(default_factory=list)  # nothing trainable left after truncation
    tokens: int = 0
    truncated_count: int | None = None  # how many were truncated, when truncated_lines holds only the first

    @property
    def truncated(self) -> int:
        return len(self.truncated_lines) if self.truncated_count is None else self.truncated_count


# A long text is tokenized a prefix at a time (bounded): this many characters a wanted token first, doubled until
# the prefix holds SLACK tokens more than wanted (a merge at the cut cannot reach that far back), or is the text.
CHARS_PER_TOKEN = 8
SLACK = 64


def bounded(encode, text: str, limit: int | None):
    """encode(prefix) of the shortest prefix of `text` (growing) whose first `limit` tokens are the whole text's,
    with more than `limit` tokens if the text has more: so a 50 MB line costs what its first tokens cost, not
    gigabytes. `encode` returns a sequence (or a dict whose "input_ids" is one); limit None: the whole text."""
    chars = max(limit or 0, 1) * CHARS_PER_TOKEN
    while True:
        if limit is None or chars >= len(text):
            return encode(text)
        out = encode(text[:chars])
        ids = out["input_ids"] if hasattr(out, "keys") else out  # a tokenizer's dict-like encoding, or ids
        if len(ids) > limit + SLACK:
            return out
        chars *= 2


def _encode(tokenizer, text: str, limit: int | None = None) -> list[int]:
    return bounded(lambda t: tokenizer.encode(t, add_special_tokens=False), text, limit)


def _segments(tokenizer, record: dict, fmt: str) -> list[tuple[str, bool]]:
    """(text, trainable) pieces of a text or prompt/completion example, each tokenized on its own."""
    bos = tokenizer.bos_token or ""
    eos = tokenizer.eos_token or ""
    if fmt == TEXT:
        return [(bos, False), (record["text"] + eos, True)]
    return [(bos + record["prompt"], False), (record["completion"] + eos, True)]


def encode_chat(tokenizer, rendered: RenderedChat, limit: int | None = None) -> tuple[list[int], list[int]]:
    """Token ids of the whole rendering (what the model sees at inference); a token is trainable when any of
    its characters is in a trainable span (return_offsets_mapping). `limit`: only that many are wanted (bounded)."""
    try:
        encoded = bounded(lambda t: tokenizer(t, add_special_tokens=False, return_offsets_mapping=True),
                          rendered.text, limit)
    except NotImplementedError:  # slow (Python) tokenizers have no offsets
        raise ChatError("the model's tokenizer cannot map tokens to characters (it is not a fast tokenizer)",
                        "give model.name a folder with a tokenizer.json") from None
    ids, labels = encoded["input_ids"], []
    for token, (start, end) in zip(ids, encoded["offset_mapping"]):
        inside = any(start < span_end and end > span_start for span_start, span_end in rendered.spans)
        labels.append(token if inside else IGNORE)
    return ids, labels


def _answer(tokenizer, prompt, answer, limit: int | None) -> tuple[list[int], list[int]]:
    """Ids and labels of a prompt and one answer (a pair's side, a feedback example), loss on the answer only: a
    string after BOS and the prompt, or the assistant turn(s) a conversation ends with (not the prompt's)."""
    if isinstance(prompt, list):
        rendered = render_chat(tokenizer, prompt + answer)
        replies = sum(m["role"] == "assistant" for m in answer)
        rendered.spans = rendered.spans[-replies:]
        return encode_chat(tokenizer, rendered, limit)
    return _ids_and_labels(tokenizer, {"prompt": prompt, "completion": answer}, PROMPT, limit)


def _ids_and_labels(tokenizer, record: dict, fmt: str, limit: int | None = None) -> tuple[list[int], list[int]]:
    """The example's ids and labels: all of them, or (limit) at least the first `limit` and whether there are
    more (more than `limit` then), without tokenizing the rest of a long text."""
    if fmt == CHAT:
        return encode_chat(tokenizer, render_chat(tokenizer, record["messages"]), limit)
    if fmt == FEEDBACK:
        return _answer(tokenizer, record["prompt"], record["completion"], limit)
    if fmt == PAIR:
        return _answer(tokenizer, record["prompt"], record["chosen"], limit)
    ids: list[int] = []
    labels: list[int] = []
    for text, trainable in _segments(tokenizer, record, fmt):
        if limit is not None and len(ids) > limit:
            break  # truncated already: what follows is cut anyway
        piece = _encode(tokenizer, text, None if limit is None else limit - len(ids))
        ids += piece
        labels += piece if trainable else [IGNORE] * len(piece)
    return ids, labels


def tokenize_example(tokenizer, example: Example, fmt: str, max_length: int) -> Tokenized:
    """One example as training sees it: ids and labels, truncated to max_length. ChatError: see chat.py."""
    ids, labels = _ids_and_labels(tokenizer, example.record, fmt, max_length)
    out = Tokenized(example.line, ids[:max_length], labels[:max_length], len(ids) > max_length)
    if fmt == PAIR:
        ids, labels = _answer(tokenizer, example.record["prompt"], example.record["rejected"], max_length)
        out.rejected_ids, out.rejected_labels = ids[:max_length], labels[:max_length]
        out.truncated = out.truncated or len(ids) > max_length
    elif fmt == FEEDBACK:
        out.label = example.record["label"]
    return out


def trainable_positions(example: Tokenized) -> list[bool]:
    """Which tokens the loss counts: a causal LM predicts token t from tokens < t, so position 0 never counts."""
    return [k > 0 and label != IGNORE for k, label in enumerate(example.labels)]


def trainable(example: Tokenized) -> bool:
    """Whether the example has tokens the loss counts (a pair: in both answers)."""
    return any(trainable_positions(example)) and (
        example.rejected_labels is None or any(k > 0 and label != IGNORE
                                               for k, label in enumerate(example.rejected_labels)))


def tokenize_file(parsed: ParsedFile, tokenizer, max_length: int, name: str = "the file") -> TokenizedFile:
    """Token ids and labels per example, truncated to max_length; examples with nothing trainable left are
    excluded. Conversations the chat template cannot render or mask are all named in one DataError."""
    out = TokenizedFile(examples=[])
    problems: list[tuple[int, ChatError]] = []
    for example in parsed.examples:
        try:
            tokenized = tokenize_example(tokenizer, example, parsed.format, max_length)
        except ChatError as e:
            problems.append((example.line, e))
            continue
        if tokenized.truncated:
            out.truncated_lines.append(example.line)
        if not trainable(tokenized):
            out.excluded_lines.append(example.line)
            continue
        out.examples.append(tokenized)
        out.tokens += tokenized.tokens
    if problems:
        raise DataError(describe_template_problems(name, problems))
    return out


def describe_template_problems(name: str, problems: list[tuple[int, ChatError]]) -> str:
    """One report: each distinct problem with its lines (first MAX_REPORTED problems), then each fix once."""
    lines: dict[str, list[int]] = {}
    for line, error in problems:
        lines.setdefault(error.problem, []).append(line)
    rows = [f"  {_line_list(numbers)}: {problem}" for problem, numbers in list(lines.items())[:MAX_REPORTED]]
    if len(lines) > MAX_REPORTED:
        rows.append(f"  ... and {len(lines) - MAX_REPORTED} more problem(s)")
    fixes = list(dict.fromkeys(error.fix for _, error in problems))
    return (f"{name}: the chat template cannot render or mask {len(problems)} example(s), so nothing is trained "
            "from the file:\n" + "\n".join(rows) + "\n" + "\n".join(f"To fix: {fix}." for fix in fixes))


def _line_list(numbers: list[int]) -> str:
    shown = ", ".join(map(str, numbers[:10]))
    more = f" and {len(numbers) - 10} more" if len(numbers) > 10 else ""
    return f"line {shown}" if len(numbers) == 1 else f"lines {shown}{more}"
