"""`conveyor generate`: ask the current model (or a version) a question, in this process, apart from training.

The model is rebuilt as export does (the run's identity and the checkpoint's files, not conveyor.toml); a run that
trained chat files is asked through its chat template, any other with the prompt as plain text. Greedy decoding,
so the same version answers the same prompt the same way.
"""

from __future__ import annotations

from pathlib import Path

from . import checkpoints as ck
from . import runs
from .errors import ConveyorError
from .workspace import Workspace


def generate(ws: Workspace, prompt: str, version: str | None, max_new_tokens: int) -> dict:
    import torch

    from .chat import load_tokenizer
    from .evaluation import prompt_ids
    from .export import _base_model, load_trained

    run, checkpoint, name = _checkpoint(ws, version)
    model_path = _base_model(ws, run, "the base weights and the tokenizer")
    chat = ws.db.execute("SELECT 1 FROM jobs WHERE run_id = ? AND format = 'messages' LIMIT 1",
                         (run.id,)).fetchone() is not None
    tokenizer = load_tokenizer(model_path, _chat_template(ws), ws.root)
    model = load_trained(run.identity, model_path, checkpoint.path).eval()
    ids = prompt_ids(tokenizer, prompt, chat)
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.decode(out[0][len(ids):], skip_special_tokens=True)
    return {"version": name, "run": run.id, "step": checkpoint.step, "chat": chat, "prompt": prompt, "output": text}


def _checkpoint(ws: Workspace, version: str | None) -> tuple[runs.Run, ck.Checkpoint, str | None]:
    """The checkpoint to answer with: the version's, or the active run's newest verified one."""
    from . import manifest as mf
    from .versions import find, name

    if version is not None:
        row = find(ws.db, version)
        run = next(r for r in runs.all_runs(ws.db) if r.id == row["run_id"])
        path = ck.checkpoints_dir(ws.run_dir(run.id)) / ck.folder_name(row["step"])
        try:
            return run, ck.Checkpoint(path, row["step"], mf.verify(path)), name(row["id"])
        except ValueError as e:
            raise ConveyorError(f"{version}'s checkpoint {path.name} cannot be used ({e}); pin versions you want "
                                "to keep (`conveyor pin`)") from None
    run = runs.active(ws.db)
    found = ck.newest_verified(ws.run_dir(run.id))[0] if run else None
    if found is None:
        raise ConveyorError("nothing trained yet: there is no checkpoint to answer with; train a file first "
                            "(`conveyor train FILE`)")
    latest = ws.db.execute("SELECT id FROM versions WHERE run_id = ? AND step = ? AND lost = 0",
                           (run.id, found.step)).fetchone()
    return run, found, name(latest["id"]) if latest else None


def _chat_template(ws: Workspace) -> str:
    try:
        return ws.config().data.chat_template
    except ConveyorError:  # invalid settings: the model's own template
        return ""
