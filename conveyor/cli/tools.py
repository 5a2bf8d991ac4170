"""The workspace's tools: doctor (and repair), the dashboard, preview and the demo.
Each imports what it runs when it runs (cli/__init__.py says why)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import ConveyorError
from ..store import jobs, ledger
from ..store.workspace import Workspace
from .console import console, print_ledger
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
    the trained tokens highlighted, the token count and the trainable-token count."""
    from ..serve.preview import describe, preview_file

    shown = preview_file(_ws(), file, lines)
    if as_json:
        return _print_json([s.to_json() for s in shown.examples])
    for text in describe(shown, plain=not console.is_terminal or console.no_color):
        console.print(text)


@app.command()
def demo(folder: Path = typer.Argument(Path("demo-workspace"), help="Where to make the demo workspace.")):
    """Make a workspace with the tiny model and two sample files (what animals do, then questions about them), train
    them one after the other, print the ledger, then ask the model questions it was never trained on."""
    from ..serve.demo import ask_held_out, demo_config, one_thread, write_samples

    folder = folder.resolve()
    if (folder / "conveyor.toml").exists():
        raise ConveyorError(f"{folder} already holds a workspace; remove it or pass another folder to `conveyor demo`")
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
