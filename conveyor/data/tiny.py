"""The built-in `tiny` model, and the Llama architecture every built-in model shares (models.py lists them), made
offline and deterministically: seeded random weights, 0.1M parameters, a byte-level tokenizer, made in a second; for
tests and demos."""

from __future__ import annotations

import json
from pathlib import Path

TINY = "tiny"
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
# The generation-prompt form lets conveyor mask the role header and train only on the reply.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
_SEED = 0
_MARKER = "conveyor-tiny.json"


def _make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for char in sorted(alphabet):
        vocab[char] = len(vocab)
    # No merges: every byte is one token, so the tokenizer needs no training data.
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<|pad|>",
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        additional_special_tokens=SPECIAL_TOKENS[3:],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


TINY_SIZES = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 2048}
# A 26M-parameter Llama: big enough that a step's cost is in its matrix products, not Python (benchmarks).
SMALL_SIZES = {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 8, "num_attention_heads": 8,
               "num_key_value_heads": 4, "max_position_embeddings": 4096}


def make_model(vocab_size: int, sizes: dict = TINY_SIZES):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        **sizes,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(_SEED)
    return LlamaForCausalLM(config)


def ensure_tiny(folder: Path) -> Path:
    """Create the tiny model in `folder` unless it is already there; returns the folder."""
    folder = Path(folder)
    if (folder / _MARKER).exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = _make_tokenizer()
    model = make_model(len(tokenizer))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / _MARKER).write_text(json.dumps({"name": TINY, "seed": _SEED}) + "\n")
    return folder
