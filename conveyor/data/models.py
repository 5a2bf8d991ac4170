"""Where a model named in `model.name` is found: the built-in models (`tiny`, `small`) are made in the workspace
on first use; any other name is a local model folder or a hub id, used as it is."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

from .families import SMALL, ensure_family
from .tiny import SMALL_SIZES, TINY, ensure_tiny


def ensure_small(folder: Path) -> Path:
    """Create the small model in `folder` unless it is already there; returns the folder."""
    return ensure_family(SMALL, folder, SMALL_SIZES)


BUILTIN = {TINY: ensure_tiny, SMALL: ensure_small}  # model.name -> maker of its folder


def model_path(models: Path, name: str) -> str:
    """Where the base model's files are: a built-in model is made in `models/<name>` on first use."""
    if name in BUILTIN:
        quiet_libraries()
        return str(BUILTIN[name](models / name))
    return name


def quiet_libraries() -> None:
    """conveyor prints its own progress; silence the libraries' bars, info logs and deprecation chatter."""
    import transformers  # here, not at the top: a command that loads no model never pays for the import

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    # bitsandbytes on CPU warns at import that an optional hub-downloaded kernel is missing: nothing to act on.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
