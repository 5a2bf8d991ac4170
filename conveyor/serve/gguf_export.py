"""`conveyor export OUT --gguf`: a trained model as one GGUF file (llama.cpp's format, the one Ollama and LM Studio
run), beside an Ollama Modelfile, written with the `gguf` package and then read back through transformers' GGUF
loader and compared with the model it came from before the export is reported done.

Only what conveyor can map is written: the Llama architecture (SmolLM2, Llama 2/3-style models without rope scaling,
TinyLlama, conveyor's own built-in models) and byte-level BPE tokenizers whose pre-tokenizer llama.cpp knows by
name. Anything else is refused by name, before a file is written; llama.cpp's own convert_hf_to_gguf.py, run on a
`conveyor export --merge` folder, maps many more.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..data.gguf import INSTALL, MARKER
from ..errors import ConveyorError

QUANTS = ("f32", "f16", "bf16", "q8_0")
DEFAULT_QUANT = "f16"
# The largest difference between a logit of the model and of its GGUF read back that passes, per type, on the probe
# below. Measured on SmolLM2-135M-Instruct (docs/models.md, Export): f32 0, f16 0.04, bf16 0.28, q8_0 1.32 (its top token
# the same at 98.6% of positions); the bounds leave room for other models' logit scales. f32 is exact: any
# difference there is a mapping fault.
TOLERANCE = {"f32": 1e-4, "f16": 0.25, "bf16": 1.5, "q8_0": 3.0}
# And the share of probe positions whose most likely next token must be the same.
AGREEMENT = {"f32": 1.0, "f16": 0.97, "bf16": 0.9, "q8_0": 0.9}
PROBE = ["The capital of France is", "Here is a list of three colors: red,",
         "Question: what is two plus three?\nAnswer:", "conveyor trains one model on file after file."]
MAPPED = {"LlamaForCausalLM": "llama"}


@dataclass
class Written:
    file: Path
    quant: str
    tensors: int
    max_logit_difference: float
    top1_agreement: float
    tokens_identical: bool

    def record(self) -> dict:
        return {"file": self.file.name, "quant": self.quant, "tensors": self.tensors,
                "max_logit_difference": self.max_logit_difference, "top1_agreement": self.top1_agreement,
                "tokenizer_identical_on_probe": self.tokens_identical, "tolerance": TOLERANCE[self.quant],
                "agreement_required": AGREEMENT[self.quant]}


def check_mappable(model_folder: Path, quant: str) -> None:
    """Refuse by name what this exporter cannot write (from the model folder's config.json and tokenizer.json),
    before a model loads or a file is written."""
    if quant not in QUANTS:
        raise ConveyorError(f"--quant {quant!r}: conveyor writes {', '.join(QUANTS)}")
    _require_gguf()
    try:
        config = json.loads((model_folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConveyorError(f"--gguf: cannot read {model_folder / 'config.json'}: {e}") from None
    arch = (config.get("architectures") or ["(none named)"])[0]
    if arch not in MAPPED:
        raise ConveyorError(f"--gguf: conveyor maps the {', '.join(MAPPED)} architecture to GGUF, not {arch}; "
                            "export with --merge and convert that folder with llama.cpp's convert_hf_to_gguf.py")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    for setting, value, what in (("rope_type", rope_type != "default" and rope_type, "rope scaling"),
                                 ("attention_bias", config.get("attention_bias"), "attention biases"),
                                 ("mlp_bias", config.get("mlp_bias"), "MLP biases")):
        if value:
            raise ConveyorError(f"--gguf: the model uses {what} ({setting} = {value!r}), which conveyor's GGUF "
                                "exporter does not map; export with --merge and convert with llama.cpp's tools")
    _pre_tokenizer(model_folder)


def write(model, tokenizer, tokenizer_folder: Path, folder: Path, quant: str, name: str) -> Written:
    """Write `model` (a plain, merged model) as `folder/<name>-<quant>.gguf` with its tokenizer and chat template,
    read it back through transformers and compare; raise if the comparison fails its tolerance."""
    import gguf

    path = folder / f"{name}-{quant}.gguf"
    writer = gguf.GGUFWriter(str(path), MAPPED[type(model).__name__])
    _metadata(writer, model.config, name, quant)
    _tokenizer(writer, tokenizer, tokenizer_folder, model.config.vocab_size)
    count = _tensors(writer, model, quant)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    difference, agreement, same_tokens = compare(model, tokenizer, path)
    written = Written(path, quant, count, difference, agreement, same_tokens)
    if difference > TOLERANCE[quant] or agreement < AGREEMENT[quant] or not same_tokens:
        raise ConveyorError(
            f"the GGUF file read back does not match the model: largest logit difference {difference:.4g} (allowed "
            f"{TOLERANCE[quant]}), same top token at {agreement:.1%} of positions (required {AGREEMENT[quant]:.0%}), "
            f"tokenizer {'identical' if same_tokens else 'DIFFERENT'} on the probe; nothing was exported. "
            "Export with --merge and convert with llama.cpp's convert_hf_to_gguf.py")
    return written


def _require_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ConveyorError(f"--gguf needs the gguf package: {INSTALL}") from None


def _metadata(writer, config, name: str, quant: str) -> None:
    import gguf

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_rope_freq_base(float(_rope_theta(config)))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config.vocab_size)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quant]
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _rope_theta(config) -> float:
    theta = getattr(config, "rope_theta", None)
    if theta is None:  # transformers 5 keeps it in rope_parameters
        theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    return theta


# The pre-tokenizers llama.cpp knows by name that conveyor recognises in a tokenizer.json: how text is split into
# words before byte-level BPE. A name llama.cpp does not know makes it fall back to another split, silently.
def _pre_tokenizer(folder: Path) -> str:
    source = _source_gguf(folder)
    if source is not None:
        pre = _read_field(source, "tokenizer.ggml.pre")
        if pre:
            return pre
    try:
        data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise ConveyorError(f"--gguf: {folder} has no readable tokenizer.json; conveyor maps fast byte-level BPE "
                            "tokenizers only") from None
    model, decoder = data.get("model") or {}, data.get("decoder") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder.get("type") != "ByteLevel":
        raise ConveyorError(f"--gguf: the tokenizer in {folder} is {model.get('type')!r} with a "
                            f"{decoder.get('type')!r} decoder; conveyor maps byte-level BPE tokenizers only (GPT-2, "
                            "SmolLM, Llama 3 style); convert a --merge export with llama.cpp's tools")
    pre = data.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [(s.get("type"), s.get("individual_digits"), s.get("use_regex", True)) for s in steps]
    if kinds == [("ByteLevel", None, True)]:
        return "gpt-2"
    if kinds == [("Digits", True, True), ("ByteLevel", None, True)]:
        return "smollm"
    if kinds == [("ByteLevel", None, False)]:  # conveyor's built-in models: bytes, no word split
        return "default"
    raise ConveyorError(f"--gguf: the tokenizer's pre-tokenizer in {folder} ({[k[0] for k in kinds]}) has no "
                        "llama.cpp name conveyor knows; convert a --merge export with llama.cpp's convert_hf_to_gguf.py")


def _tokenizer(writer, tokenizer, folder: Path, vocab_size: int) -> None:
    import gguf

    vocab = tokenizer.get_vocab()
    tokens = [""] * max(vocab_size, len(vocab))
    for text, index in vocab.items():
        tokens[index] = text
    special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    added = set(tokenizer.added_tokens_decoder)
    types = []
    for index, text in enumerate(tokens):
        if index >= len(vocab) or not text:  # the embedding has rows past the tokenizer's last token
            tokens[index] = f"[PAD{index}]"
            types.append(gguf.TokenType.UNUSED)
        else:
            types.append(gguf.TokenType.CONTROL if index in special else
                         gguf.TokenType.USER_DEFINED if index in added else gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(folder))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    specials = gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens))
    if not specials.merges:  # every token one byte (the built-in models): readers then derive merges from scores
        writer.add_token_scores([0.0] * len(tokens))
    specials.add_to_gguf(writer, quiet=True)


def _permute(weights, heads: int):
    """Hugging Face's Llama keeps each head's rotary halves apart (rotate_half); llama.cpp pairs them: rows of
    each head reordered from [first half; second half] to interleaved pairs (transformers' GGUF loader undoes it)."""
    rows = weights.shape[0]
    return weights.reshape(heads, 2, rows // heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def _tensors(writer, model, quant: str) -> int:
    import gguf
    import torch

    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    kv_heads = config.num_key_value_heads or config.num_attention_heads
    state = model.state_dict()
    tied = getattr(config, "tie_word_embeddings", False)
    count = 0
    for key, tensor in state.items():
        if key == "lm_head.weight" and tied:
            continue
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ConveyorError(f"--gguf: the tensor {key} has no GGUF name; nothing was exported")
        data = tensor.detach().to(torch.float32).cpu().numpy()
        if key.endswith("self_attn.q_proj.weight"):
            data = _permute(data, config.num_attention_heads)
        elif key.endswith("self_attn.k_proj.weight"):
            data = _permute(data, kv_heads)
        _add(writer, name, data, quant)
        count += 1
    return count


def _add(writer, name: str, data, quant: str) -> None:
    """Vectors (norms) stay f32, as llama.cpp keeps them; q8_0 needs rows in blocks of 32, else f16."""
    import gguf
    import numpy as np

    if data.ndim == 1 or quant == "f32":
        writer.add_tensor(name, data.astype(np.float32))
    elif quant == "f16" or (quant == "q8_0" and data.shape[-1] % 32):
        writer.add_tensor(name, data.astype(np.float16))
    else:
        qtype = gguf.GGMLQuantizationType.BF16 if quant == "bf16" else gguf.GGMLQuantizationType.Q8_0
        writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)


def compare(model, tokenizer, path: Path) -> tuple[float, float, bool]:
    """The file read back through transformers' GGUF loader (dequantized to f32) against the model it came from,
    on the probe: the largest logit difference, the share of positions with the same top token, and whether the
    GGUF's tokenizer splits the probe as the model's own does."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    back = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    back_tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    texts = list(PROBE)
    if tokenizer.chat_template:
        texts.append(tokenizer.apply_chat_template([{"role": "user", "content": PROBE[0]}], tokenize=False,
                                                   add_generation_prompt=True))
    worst, same, positions, same_tokens = 0.0, 0, 0, True
    original = model.to(torch.float32).eval()
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
            same_tokens &= back_tokenizer(text, add_special_tokens=False).input_ids == ids[0].tolist()
            a, b = original(input_ids=ids).logits[0], back(input_ids=ids).logits[0]
            worst = max(worst, (a - b).abs().max().item())
            same += int((a.argmax(-1) == b.argmax(-1)).sum())
            positions += ids.shape[1]
    return worst, same / max(positions, 1), same_tokens


def modelfile(tokenizer, gguf_name: str) -> str:
    """An Ollama Modelfile for the GGUF: the file, its chat template as Ollama's Go template where conveyor knows
    the form (ChatML, as SmolLM2 and Qwen use), the system prompt the model's own template adds when none is given,
    and the stop tokens. Other templates are left to Ollama, which reads tokenizer.chat_template from the file."""
    lines = [f"FROM ./{gguf_name}"]
    template = tokenizer.chat_template or ""
    stops = [tokenizer.eos_token] if tokenizer.eos_token else []
    if "<|im_start|>" in template:
        system = _default_system(tokenizer)
        lines += ['TEMPLATE """{{- if .System }}<|im_start|>system',
                  "{{ .System }}<|im_end|>",
                  "{{ end }}{{- range .Messages }}<|im_start|>{{ .Role }}",
                  "{{ .Content }}<|im_end|>",
                  '{{ end }}<|im_start|>assistant', '"""']
        if system:
            lines.append(f'SYSTEM """{system}"""')
        stops = ["<|im_end|>", *[s for s in stops if s != "<|im_end|>"]]
    else:
        lines.append("# chat template: Ollama reads the one stored in the GGUF file (tokenizer.chat_template)")
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines) + "\n"


def _default_system(tokenizer) -> str | None:
    """The system prompt a ChatML template inserts when the conversation has none (SmolLM2's does)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    start = "<|im_start|>system\n"
    if start not in text:
        return None
    return text.split(start, 1)[1].split("<|im_end|>", 1)[0] or None


def _source_gguf(folder: Path) -> Path | None:
    """The GGUF file a converted base model folder came from, when it is still there."""
    try:
        source = Path(json.loads((folder / MARKER).read_text(encoding="utf-8"))["source"])
    except (OSError, ValueError, KeyError):
        return None
    return source if source.is_file() else None


def _read_field(path: Path, key: str):
    from gguf import GGUFReader

    field = GGUFReader(str(path)).get_field(key)
    return None if field is None else field.contents()
