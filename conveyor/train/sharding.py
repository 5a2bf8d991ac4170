"""FSDP2 (distributed.strategy = "fsdp"): a full fine-tune, or the base under a LoRA adapter, sharded across the
ranks; a full fine-tune's sharded checkpoints.

The model is sharded at load by transformers' own FSDP2 (`from_pretrained(distributed_config=DistributedConfig(
fsdp_size=N))`, which the Trainer trains as it is). The Trainer's other FSDP path, `TrainingArguments(fsdp=True,
fsdp_config={"version": 2})`, goes through accelerate, which keeps the plugin only on accelerators: on CPU processes
(accelerate 1.16, AcceleratorState: DistributedType.FSDP is set for MULTI_GPU/NPU/... only) it trains plain DDP
without a word. A full fine-tune's checkpoints are torch.distributed.checkpoint (DCP) folders that every rank writes
its part of and that reshard at load to any world size; export consolidates them in one process. Under a LoRA adapter
only the frozen base is sharded: the adapter's weights and moments are whole on every rank (the Trainer broadcasts
them from rank 0 and averages their gradients, Trainer._sync_replicated_trainable_parameters), so its checkpoints
are the ones ddp writes, and the base is the base model's own files.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch

from ..config import Config
from ..errors import CheckpointError
from ..store import manifest as mf
from .precision import DTYPES, build_model, load_base


def sharded_training(config: Config) -> bool:
    """Whether the model's weights are sharded across the ranks (a full fine-tune's, or the base under LoRA)."""
    return config.distributed.strategy == "fsdp"


def sharded_checkpoints(config: Config) -> bool:
    """Whether checkpoints are DCP shards that every rank writes (a full fine-tune under fsdp); an adapter trained on
    a sharded base is whole on every rank and is saved as under ddp."""
    return sharded_training(config) and config.adapter.method == "full"


def layout(world_size: int) -> dict:
    """The manifest's record of a sharded checkpoint (mf.K_SHARDED)."""
    return {"format": mf.SHARDED_FORMAT, "strategy": "fsdp", "world_size": world_size, "torch": torch.__version__}


def is_sharded(folder: Path) -> bool:
    """Whether a checkpoint folder holds DCP shards (a sharded full fine-tune) rather than Hugging Face files."""
    return (folder / mf.MODEL_SHARDS / mf.DCP_METADATA).is_file()


def load_model(config: Config, path: str, world_size: int):
    """The model at `path` in model.precision, each rank holding 1/world_size of every weight (FSDP2). Alone there is
    nothing to shard across: the whole model trains (its checkpoints are DCP all the same, so the run goes on at
    any world size)."""
    if world_size <= 1:
        return load_base(config, path)
    from torch.distributed.tensor import DTensor
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    m = config.model
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[m.precision],
                                                 attn_implementation=m.attn_implementation,
                                                 distributed_config=DistributedConfig(fsdp_size=world_size))
    model.config.use_cache = False
    whole = [n for n, p in model.named_parameters() if not isinstance(p, DTensor)]
    if whole:  # never a silent fallback to every rank holding everything
        raise RuntimeError(f"distributed.strategy = \"fsdp\": transformers left {len(whole)} weight(s) unsharded "
                           f"({', '.join(whole[:3])}); this is a bug")
    return model


def build(config: Config, model_path: str, resume, world_size: int):
    """The model to train on from `resume` (a checkpoints.Checkpoint or None), under distributed.strategy:
    sharded for fsdp, whole for ddp. A checkpoint of the other kind is converted, exactly: whole-model files are
    loaded sharded, shards are loaded whole (DCP reshards). A LoRA adapter goes on the base sharded at load."""
    sharded = sharded_training(config)
    if config.adapter.method != "full":  # an adapter's checkpoint is whole whatever the strategy: nothing to convert
        return build_model(config, model_path, resume.path if resume else None,
                           load=lambda c, path: load_model(c, path, world_size if sharded else 1))
    if resume is not None and resume.manifest.sharded is None:  # Hugging Face files, written under ddp
        return load_model(config, str(resume.path), world_size if sharded else 1)
    model = load_model(config, model_path, world_size) if sharded else load_base(config, model_path)
    if resume is not None:
        restore_model(model, resume.path)
    return model


@contextlib.contextmanager
def _quiet():
    """DCP warns at every load in a process without a process group that it assumes one: that is what we mean."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled, unavailable or uninitialized.*")
        yield


def restore_model(model, folder: Path) -> None:
    """The checkpoint's weights into this model, resharded to however it is held now (any world size, or whole);
    every key must be there."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    state = get_model_state_dict(model)
    _load(state, folder, mf.MODEL_SHARDS)
    set_model_state_dict(model, state)


def _load(state: dict, folder: Path, part: str) -> None:
    """DCP's load into `state` (each rank reads the chunks of its shards, from whichever files hold them)."""
    import torch.distributed.checkpoint as dcp

    try:
        with _quiet():
            dcp.load(state, checkpoint_id=folder / part)
    except Exception as e:  # DCP gathers every rank's failure into one CheckpointException
        raise CheckpointError(f"{folder.name}/{part} (DCP) cannot be loaded into this model with torch "
                              f"{torch.__version__}: {str(e).strip()[:500]}") from e


def _flat():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Keyed by parameter name, not by index in a parameter group: what another world size (or whole) can map.
    return StateDictOptions(flatten_optimizer_state_dict=True)


def save_state(folder: Path, model, optimizer) -> None:
    """Every rank: its shards of the weights and of the optimizer state, into folder/model and folder/optimizer."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    with _quiet():
        dcp.save(get_model_state_dict(model), checkpoint_id=folder / mf.MODEL_SHARDS)
        dcp.save(get_optimizer_state_dict(model, optimizer, options=_flat()),
                 checkpoint_id=folder / mf.OPTIMIZER_SHARDS)


def restore_optimizer(model, optimizer, folder: Path) -> None:
    """The optimizer state of a checkpoint, sharded (DCP, resharded) or whole (optimizer.pt, written under ddp:
    indexed by parameter, mapped to names through the same parameter groups and distributed to the shards)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    if is_sharded(folder):
        state = get_optimizer_state_dict(model, optimizer, options=_flat())
        _load(state, folder, mf.OPTIMIZER_SHARDS)
        set_optimizer_state_dict(model, optimizer, state, options=_flat())
        return
    saved = torch.load(folder / mf.OPTIMIZER, weights_only=False)
    if not holds_shards(model):  # alone: the whole model, as the file was written
        optimizer.load_state_dict(saved)
        return
    groups = optimizer.param_groups
    if [len(g["params"]) for g in saved["param_groups"]] != [len(g["params"]) for g in groups]:
        raise CheckpointError(f"{folder.name}/{mf.OPTIMIZER} groups its parameters otherwise than this model's "
                              "optimizer does, so it cannot be sharded; set distributed.strategy = \"ddp\" to "
                              "resume this run as it was written")
    names = {id(p): n for n, p in model.named_parameters()}
    name = {i: names[id(p)] for s, g in zip(saved["param_groups"], groups) for i, p in zip(s["params"], g["params"])}
    state = {"state": {name[i]: v for i, v in saved["state"].items()},
             "param_groups": [{**s, "params": [name[i] for i in s["params"]]} for s in saved["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def reshard(model) -> None:
    """Free the gathered weights a forward left on modules that keep them (reshard_after_forward=False), so that
    the optimizer is made over the shards (as the Trainer does before it makes its own)."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def held(model) -> tuple[int, int]:
    """How many of the model's parameters are sharded across the ranks, and how many are whole on every rank."""
    from torch.distributed.tensor import DTensor

    sharded = sum(isinstance(p, DTensor) for p in model.parameters())
    return sharded, sum(1 for _ in model.parameters()) - sharded


def holds_shards(model) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def save_config(folder: Path, model) -> None:
    """Rank 0: the model's config.json and generation_config.json, which export builds the whole model from (the
    config does not record how the model was sharded: a consolidated model is whole)."""
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)


def load_whole(folder: Path, dtype):
    """A sharded checkpoint's model in this one process, with no process group: built from its config.json, the
    shards consolidated into it by DCP (export, generate, eval of a version)."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(folder)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    restore_model(model, folder)
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model
