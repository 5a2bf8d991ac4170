"""Chat examples as the model sees them: the whole conversation rendered by the chat template, and the character
spans of it the model learns to write (each assistant reply and the end-of-turn marker after it).

Spans come from the template's own {% generation %} marks when it has them, else from rendering prefixes of the
conversation: what the template writes after the generation prompt of a turn, up to and including the turn's
end marker (trailing whitespace between turns is not the model's to write). A turn the template rewrites
inside the whole conversation (earlier reasoning dropped from history) is found by rendering the conversation
with that reply replaced by a marker. Templates without a system role get leading system messages merged into
the first user turn.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError

GENERATION, PREFIX = "generation", "prefix"
METHODS = {GENERATION: "the template's {% generation %} marks", PREFIX: "rendered prefixes of each conversation"}
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
# Stands in for one reply to find where the template puts it; private-use characters appear in no real text.
_MARKER = "\ue000conveyor-reply\ue001"
FIX = ('set data.chat_template = "path/to/template.jinja" in conveyor.toml to a template that {}')


class ChatError(ValueError):
    """One conversation cannot be rendered or masked with this template: `problem` says why, `fix` what to do."""

    def __init__(self, problem: str, fix: str = FIX.format("renders it")):
        super().__init__(f"{problem}; {fix}")
        self.problem, self.fix = problem, fix


@dataclass
class RenderedChat:
    text: str  # the whole conversation as the template renders it
    spans: list[tuple[int, int]]  # character ranges of `text` the model learns, in order
    method: str  # GENERATION or PREFIX
    merged_system: bool = False  # system messages were merged into the first user turn


def render_chat(tokenizer, messages: list[dict]) -> RenderedChat:
    """The conversation rendered whole, with the spans of every assistant reply and its end-of-turn marker."""
    template = _template(tokenizer)
    messages, merged = _system_kept(tokenizer, messages)
    if _GENERATION_TAG.search(template):
        text, spans = _generation_spans(tokenizer, messages)
        return RenderedChat(text, spans, GENERATION, merged)
    text = _render(tokenizer, messages)
    spans, cursor = [], 0
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            spans.append(_reply_span(tokenizer, messages, i, text, cursor))
            cursor = spans[-1][1]
    return RenderedChat(text, spans, PREFIX, merged)


def method(tokenizer) -> str:
    """How replies are found with this tokenizer's template: GENERATION or PREFIX."""
    return GENERATION if _GENERATION_TAG.search(_template(tokenizer)) else PREFIX


def _template(tokenizer) -> str:
    try:
        return tokenizer.get_chat_template()
    except ValueError:
        raise ChatError("the model has no chat template, so conveyor cannot render conversations",
                        FIX.format("renders conversations for this model, or write the file as "
                                   "prompt/completion")) from None


def _render(tokenizer, messages: list[dict], prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
    except Exception as e:  # a template is foreign code: whatever it raises is this conversation's problem
        raise ChatError(f"the chat template fails on this conversation ({type(e).__name__}: {e})") from None


# system messages ----------------------------------------------------------------------------------------
def _system_kept(tokenizer, messages: list[dict]) -> tuple[list[dict], bool]:
    """The messages as rendered: unchanged when the template keeps every system message as written, else
    with the leading system messages merged into the first user turn (the template has no system role)."""
    systems = [m["content"].strip() for m in messages if m["role"] == "system"]
    if not systems:
        return messages, False
    try:
        text = _render(tokenizer, messages)
        if all(s in text for s in systems):
            return messages, False
    except ChatError:
        pass  # refused: most often "System role not supported"; the merged form below says if it was not that
    merged = _merge_system(messages)
    _render(tokenizer, merged)
    return merged, True


def _merge_system(messages: list[dict]) -> list[dict]:
    lead = 0  # the leading system messages are messages[:lead]
    while lead < len(messages) and messages[lead]["role"] == "system":
        lead += 1
    fix = FIX.format("has a system role, or put the system text into the first user message")
    late = [i for i, m in enumerate(messages[lead:], lead) if m["role"] == "system"]
    if late:
        raise ChatError(f"the chat template has no system role, so system messages are merged into the first user "
                        f"turn, but messages[{late[0]}] is a system message after the conversation began", fix)
    if lead == len(messages) or messages[lead]["role"] != "user":
        raise ChatError("the chat template has no system role, so system messages are merged into the first user "
                        "turn, but no user message follows them", fix)
    text = "\n\n".join([m["content"] for m in messages[:lead]] + [messages[lead]["content"]])
    return [{"role": "user", "content": text}] + messages[lead + 1:]


# the template's own marks ---------------------------------------------------------------------------------
def _generation_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The characters of the tokens the template marks with {% generation %} (return_assistant_tokens_mask)."""
    text = _render(tokenizer, messages)
    try:
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True,
                                            tokenizer_kwargs={"return_offsets_mapping": True})
    except Exception as e:
        raise ChatError(f"the chat template fails on this conversation ({type(e).__name__}: {e})") from None
    spans: list[tuple[int, int]] = []
    for (start, end), marked in zip(out["offset_mapping"], out["assistant_masks"]):
        if marked and spans and spans[-1][1] >= start:
            spans[-1] = (spans[-1][0], max(end, spans[-1][1]))
        elif marked:
            spans.append((start, end))
    if not spans:
        raise ChatError("the chat template's {% generation %} blocks mark nothing in this conversation",
                        FIX.format("wraps each assistant reply and its end-of-turn marker in {% generation %}"))
    return text, spans


# rendered prefixes ----------------------------------------------------------------------------------------
def _reply_span(tokenizer, messages: list[dict], i: int, full: str, cursor: int) -> tuple[int, int]:
    """Where messages[i]'s reply and end marker are in the full rendering, at or after `cursor`."""
    turn = _turn(tokenizer, messages, i)
    if turn is not None:
        prompt, written = turn
        if len(prompt) >= cursor and full.startswith(prompt + written):
            return len(prompt), len(prompt) + len(written)
    span = _span_in_history(tokenizer, messages, i, full)
    if span is None or span[0] < cursor:
        raise ChatError(f"messages[{i}] (assistant): the chat template renders this reply in the whole conversation "
                        "in a way conveyor cannot locate, so it cannot tell which tokens are the reply",
                        FIX.format("renders each reply the same way in every turn, or marks replies with "
                                   "{% generation %}"))
    return span


def _turn(tokenizer, messages: list[dict], i: int) -> tuple[str, str] | None:
    """(generation prompt of turn i, what the model writes after it up to the end marker), or None when the
    template does not render the turn as a continuation of its prompt."""
    if i == 0:
        return None  # an empty conversation has no generation prompt
    try:
        prompt = _render(tokenizer, messages[:i], prompt=True)
        whole = _render(tokenizer, messages[: i + 1])
    except ChatError:
        return None  # the template renders only whole conversations of its liking: the marker method may still do
    written = whole[len(prompt):].rstrip()
    return (prompt, written) if whole.startswith(prompt) and written else None


def _span_in_history(tokenizer, messages: list[dict], i: int, full: str) -> tuple[int, int] | None:
    """The reply's span found by rendering the whole conversation with messages[i] replaced by a marker: what
    differs is the reply as the template shows it there; its end marker is taken from the turn rendered last."""
    around = _around_marker(tokenizer, messages, i)
    last = _around_marker(tokenizer, messages[: i + 1], i)
    if around is None or last is None:
        return None
    before, after = around
    end, marker = len(full) - len(after), last[1].rstrip()
    if not (full.startswith(before) and full.endswith(after) and end > len(before) and after.startswith(marker)):
        return None
    return len(before), end + len(marker)


def _around_marker(tokenizer, messages: list[dict], i: int) -> tuple[str, str] | None:
    marked = messages[:i] + [{**messages[i], "content": _MARKER}] + messages[i + 1:]
    try:
        text = _render(tokenizer, marked)
    except ChatError:
        return None
    if text.count(_MARKER) != 1:
        return None
    before, after = text.split(_MARKER)
    return before, after


# the tokenizer ------------------------------------------------------------------------------------------
# (model path, template text, the tokenizer files' sizes and times) -> the tokenizer loaded for them, newest last
_LOADED: OrderedDict = OrderedDict()
_KEEP = 8  # tokenizers kept per process (a test session opens hundreds of workspaces)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                    "chat_template.json", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")


def load_tokenizer(model_path: str, chat_template: str = "", root: Path | None = None):
    """The one tokenizer of conveyor (training, evaluation samples, preview, generate, chat): the model's, with
    data.chat_template's file (relative to `root`, the workspace) as its template when set, and a pad token.

    Read once per process for the same files and template; each call gets its own copy, so a caller that changes
    it (a test trying a template) changes nobody else's.
    """
    template = read_template(chat_template, root or Path(".")) if chat_template else None
    key = (str(model_path), template, _stamp(model_path))
    if key not in _LOADED:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if template is not None:
            tokenizer.chat_template = template
        _LOADED[key] = tokenizer
        while len(_LOADED) > _KEEP:
            _LOADED.popitem(last=False)
    _LOADED.move_to_end(key)
    return copy.deepcopy(_LOADED[key])


def _stamp(model_path: str) -> tuple:
    """What says a model folder's tokenizer files changed (rewritten in place, e.g. by a test): sizes and times."""
    folder = Path(model_path)
    stats = [(name, (folder / name).stat()) for name in _TOKENIZER_FILES if (folder / name).is_file()]
    return tuple((name, st.st_size, st.st_mtime_ns) for name, st in stats)


def turn_end(tokenizer) -> int | None:
    """The token the chat template closes an assistant reply with (<|end|>, <|im_end|>, <|eot_id|>, ...), when it is
    a special token: where an answer ends. None when the template has none that conveyor can find."""
    try:
        text = _render(tokenizer, [{"role": "user", "content": "?"}, {"role": "assistant", "content": _MARKER}])
    except ChatError:
        return None
    after = text.split(_MARKER, 1)[1].strip() if text.count(_MARKER) == 1 else ""
    ids = tokenizer.encode(after, add_special_tokens=False) if after else []
    return ids[0] if ids and ids[0] in tokenizer.all_special_ids else None


def stop_ids(tokenizer, eos, chat: bool) -> list[int]:
    """Where an answer ends: the model's end-of-text ids (its generation config's `eos`, an id or a list) and the
    tokenizer's, and for a prompt asked through the chat template its end-of-turn token."""
    ends = [eos] if isinstance(eos, int) else list(eos or [])
    extra = [tokenizer.eos_token_id, turn_end(tokenizer) if chat and tokenizer.chat_template else None]
    return ends + [i for i in dict.fromkeys(extra) if i is not None and i not in ends]


def as_rendered(tokenizer, messages: list[dict]) -> list[dict]:
    """The messages as training renders them: leading system messages merged into the first user turn when the
    template has no system role. Raises ChatError when the template cannot render them."""
    return _system_kept(tokenizer, messages)[0]


def read_template(setting: str, root: Path) -> str:
    """The text of data.chat_template (a path relative to the workspace, or absolute)."""
    path = Path(setting).expanduser()
    path = path if path.is_absolute() else root / path
    where = f'data.chat_template = "{setting}"'
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{where}: no such file ({path}); write the Jinja template there, or point the setting "
                        "at it (relative to the workspace, or absolute)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{where}: cannot read {path} ({e}); it must be a UTF-8 Jinja template file") from None
    if not text.strip():
        raise DataError(f"{where}: {path} is empty; write the Jinja chat template in it")
    return text


def template_id(tokenizer) -> str:
    """A short hash of the chat template in use (part of the tokenization cache key)."""
    template = tokenizer.chat_template
    text = template if isinstance(template, str) or template is None else json.dumps(template, sort_keys=True)
    return hashlib.sha256((text or "").encode()).hexdigest()[:16]
