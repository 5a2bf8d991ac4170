"""Export: a run's newest verified checkpoint as a model folder others can load, built from the run's own
identity and the checkpoint's files, never from conveyor.toml (which may have changed, or be invalid, since)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .. import testhooks
from ..data.chat import load_tokenizer
from ..data.models import quiet_libraries
from ..errors import ConveyorError
from ..store import checkpoints as ck
from ..store import pending, runs
from ..store.versions import checkpoint
from ..store.workspace import Workspace
from . import gguf_export

EXPORT_FILE = "conveyor-export.json"
ADAPTER_CONFIG = "adapter_config.json"


def load_trained(identity: dict, model_path: str, checkpoint_dir: Path):
    """The model as trained: full weights from the checkpoint, or the base model plus the checkpoint's adapter.

    LoRA settings come from the checkpoint's adapter_config.json, the dtype from the run's identity. A sharded
    checkpoint (FSDP) is consolidated here, in this one process: what is saved is one ordinary model folder.
    """
    from transformers import AutoModelForCausalLM

    from ..train import sharding  # torch: imported once there is a model to load, not for a refusal
    from ..train.precision import DTYPES  # torch, as sharding

    method, precision = identity.get("adapter.method"), identity.get("model.precision")
    if method not in ("lora", "full") or precision not in DTYPES:
        raise ConveyorError(f"the run's identity has adapter.method={method!r}, model.precision={precision!r}; "
                            f"conveyor knows lora|full and {'|'.join(DTYPES)}, so it cannot rebuild this model")
    dtype = DTYPES[precision]
    if method == "full" and sharding.is_sharded(checkpoint_dir):  # distributed.strategy = "fsdp": DCP shards
        model = _load(lambda: sharding.load_whole(checkpoint_dir, dtype), checkpoint_dir)
    elif method == "full":
        model = _load(lambda: AutoModelForCausalLM.from_pretrained(str(checkpoint_dir), dtype=dtype), checkpoint_dir)
    else:
        from peft import PeftModel

        if not (checkpoint_dir / ADAPTER_CONFIG).exists():
            raise ConveyorError(f"{checkpoint_dir} has no {ADAPTER_CONFIG}, so its LoRA adapter cannot be loaded; "
                                "`conveyor doctor` checks every checkpoint")
        base = _load(lambda: AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype), model_path)
        model = _load(lambda: PeftModel.from_pretrained(base, str(checkpoint_dir)), checkpoint_dir)
    model.config.use_cache = True  # training turned it off; whoever loads the export will generate
    return model


def _load(make, where):
    try:
        return make()
    except (OSError, ValueError) as e:  # missing or unreadable files, an unreachable hub id
        raise ConveyorError(f"cannot load the model from {where}: {e}") from e


def export(ws: Workspace, out: Path, merge: bool, run_id: str | None,
           version: str | None = None, gguf: str | None = None) -> tuple[str, list[str]]:
    """Write a version's checkpoint, or the newest verified checkpoint of a run (default: the active one), to `out`:
    as a model folder, or with `gguf` (a quant type) as one GGUF file and an Ollama Modelfile.

    Returns the message to show and the warnings (skipped checkpoints, --merge on a full run, a changed base).
    """
    if version is not None and run_id is not None:
        raise ConveyorError("--version and --run both choose what to export; give one of them")
    out = Path(out)
    pending.recover(ws)
    if out.exists():
        raise ConveyorError(f"{out} already exists; pick a new folder (export never overwrites)")
    if version is not None:
        run, found, _ = checkpoint(ws.db, ws.runs, version)
        problems = []
    else:
        run = _find_run(ws, run_id)
        found, problems = ck.newest_verified(ws.run_dir(run.id), save=False)
    warnings = [f"skipped {p.path.name}: {p.reason}" for p in problems]
    if found is None:
        seen = "; ".join(warnings) or "it has none"
        raise ConveyorError(f"{run.id} has no verified checkpoint to export ({seen}); `conveyor doctor` shows "
                            "every checkpoint, and `conveyor export --run <id>` exports another run")
    identity = run.identity
    lora = identity.get("adapter.method") == "lora"
    model_path = _base_model(ws, run, needed_for="the base weights and the tokenizer" if lora else "the tokenizer")
    warnings += _base_changes(identity, model_path, lora)
    if merge and not lora:
        warnings.append(f"{run.id} is a full fine-tune: its checkpoint is already a full model, nothing to merge")
    merged = (merge or gguf is not None) and lora  # a GGUF file holds one plain model
    if gguf is not None:
        gguf_export.check_mappable(Path(model_path) if lora else found.path, gguf)

    quiet_libraries()
    model = load_trained(identity, model_path, found.path)
    if merged:
        model = model.merge_and_unload()
    tokenizer = load_tokenizer(model_path)
    record = {"run": run.id, "global_step": found.step, "checkpoint": found.path.name, "merged": merged,
              "identity": identity, **({"version": version} if version else {})}
    if gguf is not None:
        written = _write(ws, out, record, lambda tmp: _gguf(tmp, model, tokenizer, Path(model_path), gguf, out.name))
        what = f"{version} ({run.id}, global step {found.step})" if version else f"{run.id} at global step {found.step}"
        return (f"exported {what} as {out / written.file.name} ({gguf}, read back: largest logit difference "
                f"{written.max_logit_difference:.3g}, same top token at {written.top1_agreement:.1%} of probe "
                f"positions) with an Ollama Modelfile: `ollama create NAME -f {out / 'Modelfile'}`"), warnings
    _write(ws, out, record, lambda tmp: (model.save_pretrained(tmp), tokenizer.save_pretrained(tmp)))
    kind = "merged model" if merged else "adapter" if lora else "model"
    if version:
        return (f"exported the {kind} of {version} ({run.id}, global step {found.step}, {found.path.name}) to {out}",
                warnings)
    return f"exported the {kind} of {run.id} at global step {found.step} ({found.path.name}) to {out}", warnings


def _find_run(ws: Workspace, run_id: str | None) -> runs.Run:
    if run_id is None:
        found = runs.active(ws.db)
        if found is None:
            raise ConveyorError("nothing trained yet: there is no run to export; train a file first "
                                "(`conveyor train FILE`)")
        return found
    known = runs.all_runs(ws.db)
    found = next((r for r in known if r.id == run_id), None)
    if found is None:
        raise ConveyorError(f"--run {run_id!r}: no such run; the runs are "
                            f"{', '.join(r.id for r in known) or 'none yet'} (`conveyor status` lists them)")
    return found


def _base_model(ws: Workspace, run: runs.Run, needed_for: str) -> str:
    """The run's base model folder (or hub id); a missing local folder is named before anything loads."""
    name = run.identity.get("model.name")
    if not name:
        raise ConveyorError(f"{run.id}'s identity names no base model (model.name), which holds {needed_for}")
    # The identity hashes config.json only for a local folder; a hub id has none to hash.
    was_local = run.identity.get("model.config_hash") is not None or os.path.isabs(name)
    try:
        path = ws.model_path(name)
    except ConveyorError:
        if not was_local:
            raise
        path = name  # said below, as what the run was trained on
    if was_local and not Path(path).is_dir():
        raise ConveyorError(f"{run.id} was trained on the base model at {path}, which is missing; it holds "
                            f"{needed_for}, so put the model folder back there and export again")
    return path


def _base_changes(identity: dict, model_path: str, lora: bool) -> list[str]:
    """Warn when the base model folder no longer holds what the run was trained on (its hashes differ)."""
    if not Path(model_path).is_dir():
        return []
    now = {"model.tokenizer_hash": runs.tokenizer_hash(model_path)}
    if lora:  # a full checkpoint carries its own weights; only the adapter sits on the base's
        now["model.weights_hash"] = runs._weights_hash(Path(model_path))
    changed = [k for k, v in now.items() if identity.get(k) and v != identity[k]]
    return [f"the base model at {model_path} changed since this run was trained ({', '.join(changed)} differ); "
            "the export uses it as it is now"] if changed else []




def _gguf(tmp: Path, model, tokenizer, model_folder: Path, quant: str, name: str) -> gguf_export.Written:
    written = gguf_export.write(model, tokenizer, model_folder, tmp, quant, name)
    (tmp / "Modelfile").write_text(gguf_export.modelfile(tokenizer, written.file.name), encoding="utf-8")
    return written


def _write(ws: Workspace, out: Path, record: dict, fill):
    """Write into a temporary sibling folder (`fill(tmp)` writes the model; its result, when it has a `record()`,
    joins the export's record) and rename it into place: a failed export leaves no half OUT, and one cut off
    (SIGKILL, power loss) leaves its temporary folder only until the next conveyor command (pending)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    with pending.intent(ws, pending.EXPORT, tmp=str(tmp.resolve()), out=str(out.resolve())):
        tmp.mkdir()
        made = fill(tmp)  # a raise (a read-back that does not match, a full disk) is undone by the intent
        if hasattr(made, "record"):
            record = {**record, "gguf": made.record()}
        (tmp / EXPORT_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        testhooks.failpoint("export-written", record["global_step"])
        os.rename(tmp, out)
    return made
