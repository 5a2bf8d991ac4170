"""GGUF files as model sources: a `.gguf` (llama.cpp's format, the one many models are shared in) is read once by
transformers' GGUF loader, dequantized, and kept as a plain Hugging Face model folder in the workspace's models/;
that folder is what trains, what the run's identity hashes, and what a merged export starts from."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..errors import ConveyorError
from ..fingerprint import FileHashes, fsync_dir

MARKER = "conveyor-gguf.json"  # in a converted folder: the file it came from and its sha256
INSTALL = "pip install gguf"


def gguf_file(name: str) -> Path | None:
    """The .gguf file `name` points to: the file itself, or the only .gguf in a folder that is not already a
    Hugging Face model folder (no config.json); None otherwise."""
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and not (path / "config.json").exists():
        found = sorted(path.glob("*.gguf"))
        if len(found) > 1:
            raise ConveyorError(f"model.name = {name!r}: the folder holds {len(found)} .gguf files "
                                f"({', '.join(p.name for p in found[:4])}); name the one to train")
        return found[0] if found else None
    return None


def folder_for(models: Path, gguf: Path) -> Path:
    """Where a GGUF file's conversion is kept: models/gguf-<its sha256, 16 digits>. Its hash is taken once and
    trusted while the file is unchanged (fingerprint.trusted), so naming it costs a stat."""
    models.mkdir(parents=True, exist_ok=True)
    hashes = FileHashes(models)
    digest = hashes.sha256(gguf.resolve())
    if hashes.changed:
        hashes.save()
    return models / f"gguf-{digest[:16]}"


def ensure_converted(gguf: Path, folder: Path) -> Path:
    """Convert `gguf` into `folder` unless done: written to a temporary folder, flushed, renamed (a cut leaves no
    half folder). An architecture or tensor type the loader does not read is refused by name."""
    if (folder / MARKER).exists():
        return folder
    _require_gguf_package()
    from transformers import AutoModelForCausalLM, AutoTokenizer  # seconds to import: only for a conversion

    tmp = folder.with_name(f".tmp-{folder.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        except (ValueError, KeyError, NotImplementedError) as e:
            raise ConveyorError(f"{gguf} cannot be read as a model: {_first_line(e)}. transformers' GGUF loader "
                                "reads the Llama, Mistral, Qwen2/3, Gemma, Phi-3 and a few other families, in "
                                "F32/F16/BF16/Q8_0/Q4_K-style types; convert it with llama.cpp's tools or give "
                                "model.name a Hugging Face model folder") from None
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None:  # the tensors are dequantized already; the marker only forbids saving them
            quantizer.remove_quantization_config(model)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps({"source": str(gguf.resolve()), "file": gguf.name,
                                              "architecture": type(model).__name__}, indent=2) + "\n")
        for path in tmp.iterdir():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(tmp)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / MARKER).exists():
                raise
            # another process converted it meanwhile: its folder is as good
        fsync_dir(folder.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _require_gguf_package() -> None:
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise ConveyorError(f"reading a .gguf model needs the gguf package: `{INSTALL}`")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__
