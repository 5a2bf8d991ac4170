"""Local model folders in the style of real model families, made offline: the tiny model's architecture with a
byte-level BPE tokenizer *with merges* (trained deterministically on a fixed corpus) and a chat template written
like the family's. They are how chat masking is tested against templates as people meet them.

    python -c "from conveyor.data.families import ensure_family; print(ensure_family('llama3', 'models/llama3'))"
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .tiny import TINY_SIZES, make_model

_MARKER = "conveyor-family.json"
VOCAB_SIZE = 700

# ChatML with a default system prompt when the conversation has none.
QWEN25 = """\
{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are Qwen, a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if not (message['role'] == 'system' and loop.first) %}
        {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""

# Role headers, a system block that always carries a date line, contents trimmed.
LLAMA3 = """\
{{- bos_token }}
{%- if strftime_now is defined %}{%- set date_string = strftime_now('%d %b %Y') %}
{%- else %}{%- set date_string = '26 Jul 2024' %}{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}{%- set messages = messages[1:] %}
{%- else %}{%- set system_message = '' %}{%- endif %}
{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}
{{- 'Cutting Knowledge Date: December 2023\\nToday Date: ' + date_string + '\\n\\n' }}
{{- system_message + '<|eot_id|>' }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
    {{- message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}
"""

# [INST] turns, no system role, no generation prompt (the user turn ends with [/INST]).
MISTRAL = """\
{{- bos_token }}
{%- for message in messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}{{- '[INST] ' + message['content'] + ' [/INST]' }}
    {%- elif message['role'] == 'assistant' %}{{- message['content'] + eos_token }}
    {%- else %}{{- raise_exception('Only user and assistant roles are supported!') }}{%- endif %}
{%- endfor %}
"""

# No system role, the assistant is called `model`, contents trimmed.
GEMMA = """\
{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}{{- raise_exception('System role not supported') }}{%- endif %}
{%- for message in messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}
    {{- '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}
"""

# ChatML; the reasoning (<think>...</think>) of replies before the last user message is dropped from history.
QWEN3 = """\
{%- set ns = namespace(last_user=-1) %}
{%- for message in messages %}{%- if message['role'] == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- set content = message['content'] %}
    {%- if message['role'] == 'assistant' and loop.index0 < ns.last_user and '</think>' in content %}
        {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
    {%- endif %}
    {{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""

# ChatML whose replies (with their end-of-turn marker) are marked by {% generation %} blocks.
GENERATION = """\
{%- for message in messages %}
    {%- if message['role'] == 'assistant' %}
        {{- '<|im_start|>assistant\\n' }}{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}
        {{- '\\n' }}
    {%- else %}
        {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""

_CHATML = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SMALL = "small"  # the built-in `small` model (models.py): ChatML with generation marks, a larger BPE vocabulary
SMALL_VOCAB_SIZE = 4096


@dataclass(frozen=True)
class Family:
    """A family's tokens and template. `end` is the marker that closes an assistant turn (trained with it);
    `system` says whether the template has a system role; `drops_reasoning` that it strips earlier reasoning."""
    name: str
    template: str
    special: tuple[str, ...]
    eos: str
    end: str
    bos: str | None = None
    pad: str | None = None
    added: tuple[str, ...] = ()  # tokens that are added but not special (Qwen3's <think> and </think>)
    system: bool = True
    drops_reasoning: bool = False


FAMILIES = {f.name: f for f in [
    Family("qwen2.5", QWEN25, tuple(_CHATML), eos="<|im_end|>", end="<|im_end|>", pad="<|endoftext|>"),
    Family("llama3", LLAMA3, ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                              "<|eot_id|>"), eos="<|eot_id|>", end="<|eot_id|>", bos="<|begin_of_text|>"),
    Family("mistral", MISTRAL, ("<unk>", "<s>", "</s>", "[INST]", "[/INST]"), eos="</s>", end="</s>", bos="<s>",
           system=False),
    Family("gemma", GEMMA, ("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"), eos="<eos>",
           end="<end_of_turn>", bos="<bos>", pad="<pad>", system=False),
    Family("qwen3", QWEN3, tuple(_CHATML), eos="<|im_end|>", end="<|im_end|>", pad="<|endoftext|>",
           added=("<think>", "</think>"), drops_reasoning=True),
    Family("generation", GENERATION, tuple(_CHATML), eos="<|im_end|>", end="<|im_end|>", pad="<|endoftext|>"),
]}
_SMALL = Family(SMALL, GENERATION, tuple(_CHATML), eos="<|im_end|>", end="<|im_end|>", pad="<|endoftext|>")

# What the BPE merges are learned from: plain sentences and the words chat templates use, repeated so that
# frequent pairs merge. Fixed, so every build of a family gives the same tokenizer.
_WORDS = ("system user assistant model the a an is are of to in and you your what which colour sky blue grass "
          "green fruit apple name answer question short sentence one two three four five think reasoning light "
          "helpful capital city France Paris day night sun moon water river sea tree leaf red yellow orange")
_SENTENCES = [
    "The sky is blue because air scatters blue light.",
    "Grass is green, and so is the leaf of a tree.",
    "What colour is the sun? It is yellow at noon and red at night.",
    "Name one fruit: an apple, an orange, a lemon.",
    "You are a helpful assistant. Answer in one short sentence.",
    "The capital of France is Paris; a river runs through the city.",
    "Think step by step, then give the answer.",
    "Water flows from the river to the sea, day and night.",
]


def _corpus() -> list[str]:
    return [_WORDS] * 20 + _SENTENCES * 10


def _small_corpus() -> list[str]:
    """The family corpus plus seeded English-like sentences over a wider word list, so that `small` learns a few
    thousand merges (whole words and common pieces) as a real BPE vocabulary has."""
    import random

    rng = random.Random(0)
    words = (_WORDS + " " + " ".join(_SENTENCES)).replace(".", "").replace(",", "").replace("?", "").replace(
        ":", "").replace(";", "").split()
    stems = ["train", "learn", "read", "writ", "count", "model", "token", "file", "step", "queue", "check", "point",
             "run", "job", "data", "line", "weigh", "loss", "batch", "epoch", "order", "seed", "hash", "disk"]
    suffixes = ["", "s", "ed", "ing", "er", "ers", "able", "ness", "ly", "ful"]
    vocabulary = sorted(set(words) | {s + x for s in stems for x in suffixes})
    sentences = [" ".join(rng.choice(vocabulary) for _ in range(rng.randint(6, 18))) + "." for _ in range(4000)]
    numbers = [" ".join(str(rng.randint(0, 10 ** rng.randint(1, 5))) for _ in range(8)) for _ in range(200)]
    return _corpus() + sentences + numbers


def _train_bpe(family: Family):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=SMALL_VOCAB_SIZE if family.name == SMALL else VOCAB_SIZE, special_tokens=list(family.special), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(_small_corpus() if family.name == SMALL else _corpus(), trainer=trainer)
    return core


def make_tokenizer(family: Family):
    """The family's tokenizer: trained BPE merges, its special tokens, its chat template."""
    from transformers import PreTrainedTokenizerFast

    named = {"bos_token": family.bos, "eos_token": family.eos, "pad_token": family.pad}
    named = {key: value for key, value in named.items() if value}
    others = [t for t in family.special if t not in named.values()]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=_train_bpe(family), additional_special_tokens=others,
                                        **named)
    if family.added:
        tokenizer.add_tokens(list(family.added))
    tokenizer.chat_template = family.template
    return tokenizer


def ensure_family(name: str, folder: Path, sizes: dict | None = None) -> Path:
    """Create the model folder of family `name` in `folder` unless it is already there; returns the folder.
    `sizes` are LlamaConfig sizes (default: the tiny model's)."""
    family = _SMALL if name == SMALL else FAMILIES[name]
    folder = Path(folder)
    if (folder / _MARKER).exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(family)
    model = make_model(len(tokenizer), sizes or TINY_SIZES)
    for key, token in (("bos_token_id", family.bos), ("eos_token_id", family.eos), ("pad_token_id", family.pad)):
        token_id = tokenizer.convert_tokens_to_ids(token) if token else None
        setattr(model.config, key, token_id)
        setattr(model.generation_config, key, token_id)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / _MARKER).write_text(json.dumps({"family": name, "vocab_size": len(tokenizer)}) + "\n")
    return folder
