"""Commands that queue and train: init, add, train, run (the daemon), its controls and the queue.
Each imports what it runs when it runs (cli/__init__.py says why)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ..config import Config
from ..errors import ConfigError, ConveyorError
from ..fingerprint import short
from ..store import jobs
from ..store.workspace import Workspace
from .console import ConsoleReporter, console, err
from .root import _print_json, _state, _ws, app


@app.command()
def init(
    folder: Path = typer.Argument(Path("."), help="Folder to make a workspace (created if missing)."),
    model: str = typer.Option("tiny", "--model", "-m", help='A built-in model ("tiny", "small": random weights, '
                              'for trying conveyor offline), a local model folder or a hub id.'),
):
    """Create a workspace: conveyor.toml (every setting, commented) and inbox/."""
    config = Config()
    config.model.name = model
    ws = Workspace.create(folder, config)
    console.print(f"workspace ready at {ws.root}\n  settings: {ws.config_path}\n  drop JSONL files into: {ws.inbox}")


def _priority(value: str) -> str:
    """A usage error (exit 2) for a priority that is not one."""
    if value not in jobs.PRIORITIES:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(jobs.PRIORITIES)}")
    return value


def _enqueue_all(ws: Workspace, files: list[Path], priority: int, epochs: int | None = None,
                 ids: list[int] | None = None, settings: list[str] | None = None) -> bool:
    """Enqueue each file, saying what became of it; False if any was rejected. `ids` collects the jobs to train;
    `settings` are `--set KEY=VALUE` items for these jobs (checked before anything is queued)."""
    from .. import overrides
    from ..data.models import check
    from ..queue.inbox import enqueue

    config = ws.config()
    check(config.model.name)  # a typo in model.name is said now, before anything is queued or a run is made
    try:
        own = overrides.parse(settings or [], config)
    except ConfigError as e:  # a bad --set is a usage error (exit 2), as a bad --epochs is
        raise typer.BadParameter(str(e), param_hint="--set") from None
    epochs = epochs or own.get("training.epochs") or config.training.epochs
    ok = True
    for file in files:
        result = enqueue(ws, file, priority, epochs, overrides=own or None)
        for text in result.messages:
            err.print(text, style="yellow" if result.job.state != jobs.JobState.REJECTED else "red", markup=False)
        if ids is not None and result.job.id not in ids:
            ids.append(result.job.id)
        if result.job.state == jobs.JobState.REJECTED:
            ok = False
            err.print(f"job {result.job.id}: kept in {ws.rejected} with the reason", style="red")
        elif not result.new:
            console.print(f"no new job: {file.name} continues as job {result.job.id} ({result.job.state.value})")
        else:
            console.print(f"queued job {result.job.id}: {file.name} ({result.job.examples} examples, "
                          f"{result.job.format}, {short(result.job.fingerprint)})")
    return ok


@app.command()
def add(
    files: list[Path] = typer.Argument(..., help="JSONL files, enqueued in the order given."),
    priority: str = typer.Option("normal", callback=_priority, help="high | normal | low"),
    epochs: Optional[int] = typer.Option(None, min=1, help="Passes over these files (default: training.epochs)."),
    settings: Optional[list[str]] = typer.Option(None, "--set", metavar="KEY=VALUE",
                                                 help="A setting for these files' jobs only, e.g. "
                                                 "training.learning_rate=1e-4 (repeatable; not model.* or adapter.*)."),
):
    """Validate and enqueue files without training them."""
    ok = _enqueue_all(_ws(), files, jobs.PRIORITIES[priority], epochs, settings=settings)
    raise typer.Exit(0 if ok else 1)


def _drain(ws: Workspace, quiet: bool = False) -> bool:
    return _drain_code(ws, quiet) == 0


def _drain_code(ws: Workspace, quiet: bool = False) -> int:
    """Train everything waiting in this process; the exit code (follow.py: 0, 1, 130 for Ctrl-C, 143)."""
    from ..queue.daemon import Daemon
    from ..store.lock import Lock
    from .follow import drain_code

    reporter = ConsoleReporter(quiet)
    try:
        with Lock(ws):
            daemon = Daemon(ws, reporter)
            ok = daemon.work(drain=True)
            return drain_code(ws, ok, daemon.stop_reason)
    finally:
        reporter.close()


@app.command()
def train(
    files: list[Path] = typer.Argument(..., help="JSONL files to train, in this order."),
    epochs: Optional[int] = typer.Option(None, min=1, help="Passes over these files (default: training.epochs)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
    settings: Optional[list[str]] = typer.Option(None, "--set", metavar="KEY=VALUE",
                                                 help="A setting for these files' jobs only, e.g. "
                                                 "training.learning_rate=1e-4 (repeatable; not model.* or adapter.*)."),
):
    """Enqueue the files in order and train everything queued in this process, then exit: 0 when all trained, 1 if
    any failed or was rejected, 130 on Ctrl-C. With a daemon running, it trains them and this command follows."""
    from ..store.controls import pause_text
    from ..store.lock import daemon_pid
    from .follow import follow

    ws = _ws()
    paused = pause_text(ws.db)
    if paused:  # refused before anything is queued: the files would wait behind the pause
        raise ConveyorError(f"{paused}. Nothing was queued")
    ids: list[int] = []
    pid = daemon_pid(ws)
    ok = _enqueue_all(ws, files, jobs.PRIORITIES["normal"], epochs, ids, settings)
    if pid is not None:  # handed to the daemon, followed to their end (never queued, then refused)
        raise typer.Exit(max(follow(ws, ids, pid, lambda: _drain_beside(ws, quiet)), 0 if ok else 1))
    code = _drain_code(ws, quiet)
    raise typer.Exit(code or (0 if ok else 1))


def _drain_beside(ws: Workspace, quiet: bool) -> int | None:
    """The daemon a `train` followed has stopped: drain here, or None if another daemon holds the workspace."""
    try:
        return _drain_code(ws, quiet)
    except ConveyorError:
        return None


@app.command()
def run(
    drain: bool = typer.Option(False, "--drain", help="Train everything queued in this process, then exit."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
    dashboard: bool = typer.Option(False, "--dashboard", help="Also serve the web dashboard (see `dashboard`)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Dashboard address; anything but loopback needs --token."),
    port: int = typer.Option(8750, "--port", min=1, max=65535, help="Dashboard port."),
    token: Optional[str] = typer.Option(None, "--token", envvar="CONVEYOR_DASHBOARD_TOKEN", help="Dashboard token."),
):
    """The daemon: watch inbox/, train each job in a worker process, until `conveyor stop` or SIGTERM."""
    ws = _ws()
    ws.config()  # refuse to start on invalid settings, naming every problem
    if drain:
        raise typer.Exit(_drain_code(ws, quiet))
    from ..queue.daemon import Daemon
    from ..store.lock import Lock

    with Lock(ws), _dashboard_thread(ws, dashboard, host, port, token):
        console.print(f"conveyor daemon (pid {os.getpid()}) watching {ws.inbox}; `conveyor stop` ends it")
        Daemon(ws, ConsoleReporter(quiet=True), isolate=True, watch=True).work(drain=False)
    console.print("daemon stopped")


@contextlib.contextmanager
def _dashboard_thread(ws: Workspace, enabled: bool, host: str, port: int, token: Optional[str]):
    if not enabled:
        yield
        return
    import threading

    from ..serve.dashboard import build_server

    server = build_server(ws.root, host, port, token)  # refuses a public address without a token
    thread = threading.Thread(target=server.run, name="dashboard", daemon=True)
    thread.start()
    console.print(f"dashboard: http://{host}:{port}/" + ("?token=<your token>" if token else ""))
    try:
        yield
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@app.command(hidden=True)
def worker(job: Optional[int] = typer.Option(None, "--job", help="The job to train; without it, read it from stdin."),
           claim: Optional[str] = typer.Option(None, "--claim", help="The daemon's claim on the job.")):
    """Internal: a worker process trains one claimed job and exits with its outcome (report.EXIT_CODES).

    Without --job it imports the training stack first and then waits for {"job": N, "claim": C, "config": {...}}
    on stdin: the daemon keeps one such warm worker ready, so a new file starts training in about a second.
    """
    from ..queue.process import run_worker

    raise typer.Exit(run_worker(_state["workspace"], job, claim))


def _control(action: str, reason: Optional[str], wait: float) -> None:
    from ..store import controls
    from ..store.lock import daemon_pid

    ws = _ws()
    if daemon_pid(ws) is None:
        raise ConveyorError(f"no conveyor daemon is running in {ws.root}; start one with `conveyor run`")
    request_id = controls.ask(ws.db, controls.Action(action), who=f"cli (pid {os.getpid()})", reason=reason)
    result = controls.wait(ws.db, request_id, wait)
    if result is None:
        raise ConveyorError(f"the daemon did not act on `{action}` within {wait:.0f} s; nothing was changed. "
                            "Check `conveyor logs`")
    console.print(result)


@app.command()
def pause(wait: float = typer.Option(60.0, help="Seconds to wait for the daemon to act.")):
    """Checkpoint and hold training after the current optimizer step (with no daemon: the queue starts paused)."""
    from ..store import controls
    from ..store.lock import daemon_pid

    ws = _ws()
    if daemon_pid(ws) is not None:
        return _control("pause", None, wait)
    if controls.paused(ws.db):  # a pause holds across stops and restarts: nothing to add
        console.print(f"already paused: {controls.pause_text(ws.db)}", markup=False)
        return
    controls.hold(ws.db, f"cli (pid {os.getpid()})", "paused by `conveyor pause` while no daemon ran")
    console.print("paused: no daemon runs now, so `conveyor run`, `run --drain` and `train` start paused until "
                  "`conveyor resume`", markup=False)


@app.command()
def resume(wait: float = typer.Option(60.0, help="Seconds to wait for the daemon to act.")):
    """Continue after `conveyor pause` (or after eval.gate held the queue)."""
    from ..store import controls
    from ..store.lock import daemon_pid

    ws = _ws()
    if daemon_pid(ws) is None:
        if not controls.paused(ws.db):
            raise ConveyorError(f"no conveyor daemon is running in {ws.root} and the queue is not paused; "
                                "start one with `conveyor run`")
        console.print(controls.release(ws.db, f"cli (pid {os.getpid()})"))
        return
    _control("resume", None, wait)


@app.command()
def stop(wait: float = typer.Option(60.0, help="Seconds to wait for the daemon to act.")):
    """Checkpoint and exit the daemon; the job in progress resumes on the next start."""
    _control("stop", None, wait)


@app.command()
def skip(
    reason: Optional[str] = typer.Option(None, "--reason", help="Why; recorded with the job."),
    wait: float = typer.Option(60.0, help="Seconds to wait for the daemon to act."),
):
    """Checkpoint, mark the current job skipped (its steps so far stay in the ledger) and go on."""
    _control("skip", reason, wait)


queue_app = typer.Typer(help="The queue: list, reprioritise or remove queued jobs.", invoke_without_command=True)
app.add_typer(queue_app, name="queue")


@queue_app.callback()
def queue_list(ctx: typer.Context, as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")):
    """List queued and running jobs in the order they will train."""
    if ctx.invoked_subcommand:
        return
    ws = _ws()
    queued = [j.to_json() for j in jobs.running_and_waiting(ws.db)]
    if as_json:
        return _print_json(queued)
    table = Table("#", "job", "file", "priority", "state", "examples", "steps")
    for i, j in enumerate(queued, 1):
        table.add_row(str(i), str(j["id"]), j["file"], j["priority"], j["state"], str(j["examples"]),
                      f"{j['steps_done']}/{j['planned_steps']}" if j["planned_steps"] else "-")
    console.print(table)


@queue_app.command("move")
def queue_move(job: int = typer.Argument(..., help="Job id."),
               priority: str = typer.Option(..., callback=_priority, help="high | normal | low")):
    """Change a waiting job's priority."""
    from ..queue import edits as queue

    console.print(queue.move(_ws(), job, jobs.PRIORITIES[priority]))


@queue_app.command("remove")
def queue_remove(job: int = typer.Argument(..., help="Job id."),
                 reason: str = typer.Option("removed by a person", help="Why; kept with the file.")):
    """Remove a waiting job; its file is kept in removed/ with the reason."""
    from ..queue import edits as queue

    console.print(queue.remove(_ws(), job, reason))
