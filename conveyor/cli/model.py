"""Commands on the trained model: rollback, pin and unpin a version, generate, chat and export.
Each imports what it runs when it runs (cli/__init__.py says why)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .console import console, err
from .root import _print_json, _ws, app


@app.command()
def rollback(
    version: str = typer.Argument(..., help="The version to go back to, e.g. v1 (see `conveyor versions`)."),
    requeue: bool = typer.Option(False, "--requeue", help="Queue again the jobs trained after that version."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
):
    """Start a new run from a version (weights, optimizer, scheduler, RNG, step); the old run is kept as it is."""
    from ..store.rollback import rollback as branch

    result = branch(_ws(), version, requeue)
    if as_json:
        return _print_json(result)
    console.print(result["message"], markup=False)


@app.command()
def pin(version: str = typer.Argument(..., help="A version name, e.g. v3 (see `conveyor versions`).")):
    """Keep a version's checkpoint from retention forever (`conveyor unpin` undoes)."""
    from ..store.versions import set_pinned

    ws = _ws()
    console.print(set_pinned(ws.db, ws.runs, version, True), markup=False)


@app.command()
def unpin(version: str = typer.Argument(..., help="A pinned version, e.g. v3.")):
    """Let retention treat a pinned version's checkpoint like any other again."""
    from ..store.versions import set_pinned

    ws = _ws()
    console.print(set_pinned(ws.db, ws.runs, version, False), markup=False)


_TEMPERATURE = "0: greedy (the default; the same prompt, the same answer). Above 0: sample, higher is more varied."
_TOP_P = "With --temperature: sample from the likeliest tokens that together hold this probability (0 < P <= 1)."
_SEED = "With --temperature: the seed of each answer's draw, so sampled answers repeat (default: a random one)."
_CHAT = ("Ask through the model's chat template (--chat) or the prompt alone (--raw); default: as the version was "
         "trained along its lineage (chats: the template; text: the prompt alone; nothing yet: the template if any).")
_SYSTEM = ("A system prompt before the conversation, through the chat template (chat-trained runs; a plain-text run "
           "ignores it, with a note).")


MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-3, 100.0  # below, the logits divided by it overflow to inf (nan draws)
MAX_SEED = 2**63 - 1  # torch's generator takes a 64-bit seed


def _temperature(value: float) -> float:
    if not value >= 0:
        raise typer.BadParameter(f"{value} is below 0; give 0 for greedy decoding or more to sample, e.g. 0.7")
    if value != 0 and not MIN_TEMPERATURE <= value <= MAX_TEMPERATURE:
        raise typer.BadParameter(f"{value:g} is outside {MIN_TEMPERATURE:g}..{MAX_TEMPERATURE:g}; give 0 for greedy "
                                 "decoding (what a tiny temperature approaches) or e.g. 0.7 to sample")
    return value


def _top_p(value: float) -> float:
    if not 0 < value <= 1:
        raise typer.BadParameter(f"{value} is not above 0 and at most 1; give e.g. 0.9, or 1 for no cut")
    return value


@app.command()
def generate(
    ctx: typer.Context,
    prompt: Optional[str] = typer.Argument(None, help="What to ask the model (or --prompts FILE)."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="A file of prompts, each answered alone by the "
                                           "model loaded once: one prompt a line, or (FILE.jsonl) a JSON object "
                                           "with \"prompt\" a line. With --json: a list."),
    version: Optional[str] = typer.Option(None, "--version", help="A version (see `conveyor versions`); default: "
                                          "the newest checkpoint."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1, max=4096),
    temperature: float = typer.Option(0.0, "--temperature", callback=_temperature, help=_TEMPERATURE),
    top_p: float = typer.Option(1.0, "--top-p", callback=_top_p, help=_TOP_P),
    seed: Optional[int] = typer.Option(None, "--seed", min=0, max=MAX_SEED, help=_SEED),
    system: Optional[str] = typer.Option(None, "--system", help=_SYSTEM),
    chat: Optional[bool] = typer.Option(None, "--chat/--raw", help=_CHAT),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
):
    """Answer a prompt with the current model or a version (greedy unless --temperature; chat template for
    chat-trained runs). An answer ends at the end-of-turn or end-of-text token, or after --max-new-tokens."""
    from ..serve.generate import Sampling, answer_all, load, notes, read_prompts

    if (prompt is None) == (prompts is None):
        raise typer.BadParameter("nothing to ask: give a PROMPT or --prompts FILE" if prompt is None else
                                 "give a PROMPT or --prompts FILE, not both", ctx=ctx, param_hint="PROMPT")
    asked = [prompt] if prompts is None else read_prompts(prompts)
    sampling = Sampling(temperature, top_p, seed)
    loaded = load(_ws(), version, chat)
    used = sampling.seeded()
    for note in notes(loaded, sampling, used, system):
        err.print(f"note: {note}", markup=False)
    results = answer_all(loaded, asked, max_new_tokens, used, system)
    if as_json:
        return _print_json(results[0] if prompts is None else results)
    for result in results:
        if prompts is not None:
            console.print(f"> {result['prompt']}", markup=False)
        console.print(result["output"], markup=False)



@app.command()
def chat(
    version: Optional[str] = typer.Option(None, "--version", help="A version (see `conveyor versions`); default: "
                                          "the newest checkpoint."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1, max=4096, help="Per answer."),
    temperature: float = typer.Option(0.0, "--temperature", callback=_temperature, help=_TEMPERATURE),
    top_p: float = typer.Option(1.0, "--top-p", callback=_top_p, help=_TOP_P),
    seed: Optional[int] = typer.Option(None, "--seed", min=0, max=MAX_SEED, help=_SEED),
    system: Optional[str] = typer.Option(None, "--system", help=_SYSTEM + " /reset keeps it."),
    chat: Optional[bool] = typer.Option(None, "--chat/--raw", help=_CHAT),
):
    """Talk with the current model or a version, line by line (loaded once; greedy unless --temperature). A
    chat-trained run keeps the conversation; /reset starts over, /quit or end of input ends."""
    from ..serve.generate import Sampling, input_lines, talk

    talk(_ws(), version, max_new_tokens, input_lines(), Sampling(temperature, top_p, seed), system, chat)


@app.command()
def export(
    out: Path = typer.Argument(..., help="Folder to write (must not exist yet)."),
    merge: bool = typer.Option(False, "--merge", help="Fold the LoRA adapter into the base weights (a plain model)."),
    run_id: Optional[str] = typer.Option(None, "--run", help="Run id (default: the active run)."),
    version: Optional[str] = typer.Option(None, "--version", help="Export this version (see `conveyor versions`) "
                                          "instead of the newest checkpoint."),
    gguf: bool = typer.Option(False, "--gguf", help="One GGUF file for llama.cpp, Ollama, LM Studio (merged), "
                              "read back and compared before it is reported done, beside an Ollama Modelfile."),
    quant: Optional[str] = typer.Option(None, "--quant", help="With --gguf: f16 (default), bf16, q8_0 or f32."),
):
    """Export the newest verified checkpoint of a run (or a version), as it was trained (not as conveyor.toml says
    now)."""
    from ..serve.export import export as export_run
    from ..serve.gguf_export import DEFAULT_QUANT, QUANTS

    if quant is not None and not gguf:
        raise typer.BadParameter("--quant chooses the GGUF tensor type; add --gguf", param_hint="--quant")
    if quant is not None and quant not in QUANTS:
        raise typer.BadParameter(f"{quant!r}: choose one of {', '.join(QUANTS)}", param_hint="--quant")
    kind = (quant or DEFAULT_QUANT) if gguf else None
    message, warnings = export_run(_ws(), out, merge, run_id, version, kind)
    for text in warnings:
        err.print(f"warning: {text}", style="yellow", markup=False)
    console.print(message, markup=False)
