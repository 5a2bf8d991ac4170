"""The `conveyor` command. Package errors and machine faults print as one `error:` line (exit 1), usage errors as
one message with the `--help` hint (exit 2); `--debug` shows the traceback of the former."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table
from typer.core import TyperGroup

from . import jobs, ledger, runs
from .config import Config
from .console import ConsoleReporter, console, err, print_ledger
from .errors import ConveyorError
from .faults import explain
from .fingerprint import short
from .workspace import Workspace

_state = {"workspace": Path("."), "debug": False}
_SHARED = ("workspace", "debug")  # the global options every subcommand takes too


def _set_shared(ctx, param, value):
    if value:  # given after the subcommand (a Path is always true); absent, the value before it stands
        _state[param.name] = value


class _Conveyor(TyperGroup):
    """The root command. Every subcommand (and each of `queue`'s) also takes -w/--workspace and --debug, so they work
    before or after its name. They are copies of the root's options that set `_state` rather than pass a value, so no
    command function declares them. Click parses them along with each command's own options, so another option's
    value that reads `-w` stays that option's and `train -- -w` names a file, which moving `-w X` to the front of
    argv by hand could not promise. Given on both sides, the one after the subcommand wins.
    """

    def __init__(self, **attrs):
        super().__init__(**attrs)
        shared = [copy.copy(p) for p in self.params if p.name in _SHARED]
        for option in shared:
            option.default, option.expose_value, option.callback = None, False, _set_shared
        _share(self.commands.values(), shared)
        _bare_flags([self])


def _bare_flags(commands) -> None:
    """A flag takes no value: its help shows none (typer 0.29 would show `<bool>` beside every flag)."""
    for command in commands:
        for param in command.params:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""
        command.get_help_option = _bare_help(command.get_help_option)  # --help is made when help is asked for
        if isinstance(command, TyperGroup):
            _bare_flags(command.commands.values())


def _bare_help(make):
    def help_option(ctx):
        option = make(ctx)
        if option is not None:
            option.metavar = ""
        return option

    return help_option


def _share(commands, options) -> None:
    for command in commands:
        command.params.extend(options)
        if isinstance(command, TyperGroup):
            _share(command.commands.values(), options)


def _version() -> str:
    try:
        return metadata.version("conveyor")
    except metadata.PackageNotFoundError:  # a source tree run without `pip install`
        from . import __version__

        return __version__


def _show_version(value: bool) -> None:
    if value:
        console.print(f"conveyor {_version()}", markup=False, highlight=False)
        raise typer.Exit(0)


app = typer.Typer(cls=_Conveyor, add_completion=False, no_args_is_help=True,
                  help="Continuous fine-tuning of causal LMs.")


@app.callback()
def _global(
    workspace: Path = typer.Option(Path("."), "--workspace", "-w", help="Workspace folder (default: current)."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors."),
    version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True, expose_value=False,
                                 help="Print conveyor's version and exit."),
):
    _state["workspace"], _state["debug"] = workspace, debug


def _ws() -> Workspace:
    """The workspace, with any multi-step command that was cut off (SIGKILL, power loss) finished or undone."""
    from .pending import recover

    ws = Workspace.open(_state["workspace"])
    recover(ws)
    return ws


def _print_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


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


def _priority(value: str) -> int:
    if value not in jobs.PRIORITIES:
        raise ConveyorError(f"--priority {value!r} is not one of {', '.join(jobs.PRIORITIES)}")
    return jobs.PRIORITIES[value]


def _enqueue_all(ws: Workspace, files: list[Path], priority: int, epochs: int | None = None,
                 ids: list[int] | None = None, settings: list[str] | None = None) -> bool:
    """Enqueue each file, saying what became of it; False if any was rejected. `ids` collects the jobs to train;
    `settings` are `--set KEY=VALUE` items for these jobs (checked before anything is queued)."""
    from . import overrides
    from .inbox import enqueue

    config = ws.config()
    own = overrides.parse(settings or [], config)
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
    priority: str = typer.Option("normal", help="high | normal | low"),
    epochs: Optional[int] = typer.Option(None, min=1, help="Passes over these files (default: training.epochs)."),
    settings: Optional[list[str]] = typer.Option(None, "--set", metavar="KEY=VALUE",
                                                 help="A setting for these files' jobs only, e.g. "
                                                 "training.learning_rate=1e-4 (repeatable; not model.* or adapter.*)."),
):
    """Validate and enqueue files without training them."""
    ok = _enqueue_all(_ws(), files, _priority(priority), epochs, settings=settings)
    raise typer.Exit(0 if ok else 1)


def _drain(ws: Workspace, quiet: bool = False) -> bool:
    return _drain_code(ws, quiet) == 0


def _drain_code(ws: Workspace, quiet: bool = False) -> int:
    """Train everything waiting in this process; the exit code (follow.py: 0, 1, 130 for Ctrl-C, 143)."""
    from .daemon import Daemon
    from .follow import drain_code
    from .lock import Lock

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
    from .controls import pause_text
    from .follow import follow
    from .lock import daemon_pid

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
    from .daemon import Daemon
    from .lock import Lock

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

    from .dashboard import build_server

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
    """Internal: a worker process trains one claimed job and exits with its outcome (worker.EXIT_CODES).

    Without --job it imports the training stack first and then waits for {"job": N, "claim": C, "config": {...}}
    on stdin: the daemon keeps one such warm worker ready, so a new file starts training in about a second.
    """
    from .process import run_worker

    raise typer.Exit(run_worker(_state["workspace"], job, claim))


def _control(action: str, reason: Optional[str], wait: float) -> None:
    from . import controls
    from .lock import daemon_pid

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
    """Checkpoint and hold training after the current optimizer step."""
    _control("pause", None, wait)


@app.command()
def resume(wait: float = typer.Option(60.0, help="Seconds to wait for the daemon to act.")):
    """Continue after `conveyor pause` (or after eval.gate held the queue)."""
    from . import controls
    from .lock import daemon_pid

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
               priority: str = typer.Option(..., help="high | normal | low")):
    """Change a waiting job's priority."""
    from . import queue

    console.print(queue.move(_ws(), job, _priority(priority)))


@queue_app.command("remove")
def queue_remove(job: int = typer.Argument(..., help="Job id."),
                 reason: str = typer.Option("removed by a person", help="Why; kept with the file.")):
    """Remove a waiting job; its file is kept in removed/ with the reason."""
    from . import queue

    console.print(queue.remove(_ws(), job, reason))


@app.command()
def logs(follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new lines."),
         lines: int = typer.Option(50, "-n", help="Lines to show first.")):
    """The workspace log (one JSON object a line)."""
    ws = _ws()
    path = ws.logs / "conveyor.log"
    if not path.exists():
        raise ConveyorError(f"no log yet at {path}")
    with open(path, encoding="utf-8") as f:
        for line in f.readlines()[-lines:]:
            sys.stdout.write(line)
        while follow:
            line = f.readline()
            if line:
                sys.stdout.write(line)
                sys.stdout.flush()
            else:
                time.sleep(0.3)


@app.command()
def status(
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    watch: bool = typer.Option(False, "--watch", help="Refresh every 2 seconds until Ctrl-C."),
):
    """One screen: active run and identity, global step, current job and ETA, losses, queue, failures, disk. With
    --watch: the screen redrawn every 2 seconds on a terminal; in a pipe, one line a frame."""
    from rich.console import Console
    from rich.live import Live

    from .status import one_line, render, status_data

    ws = _ws()
    if as_json:
        return _print_json(status_data(ws))
    if not watch:
        return console.print(render(status_data(ws)))
    try:
        if not console.is_terminal:  # a pipe or a file: a frame a line, flushed, until Ctrl-C or a closed pipe
            while True:
                sys.stdout.write(one_line(status_data(ws)) + "\n")
                sys.stdout.flush()
                time.sleep(2)
        screen = Console(highlight=False)  # wraps long lines at the terminal's width instead of cutting them
        with Live(render(status_data(ws)), console=screen, refresh_per_second=1) as live:
            while True:
                time.sleep(2)
                live.update(render(status_data(ws)))
    except KeyboardInterrupt:
        return
    except BrokenPipeError:  # `status --watch | head`
        sys.stderr.close()


def _check_run(ws: Workspace, run_id: str | None) -> None:
    known = [r.id for r in runs.all_runs(ws.db)]
    if run_id is not None and run_id not in known:
        raise ConveyorError(f"--run {run_id!r}: no such run; the runs are {', '.join(known) or 'none yet'}")


@app.command()
def history(
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    examples: bool = typer.Option(False, "--examples", help="Per optimizer step: the job and the file lines trained."),
    run_id: Optional[str] = typer.Option(None, "--run", help="Run id (default: the active run)."),
    own: bool = typer.Option(False, "--own", help="Only the run's own steps, not those a rollback's run inherited."),
):
    """The ledger: which job trained which global steps, on how many examples and tokens, with its loss. A run
    branched by `conveyor rollback` lists first the steps it inherited (up to the version it branched from; each
    row names its run and says `"inherited": true`), then its own."""
    ws = _ws()
    _check_run(ws, run_id)
    run_id = run_id or (runs.active(ws.db).id if runs.active(ws.db) else None)
    if examples:
        rows = ledger.audit_rows(ws.db, run_id, own)
        if as_json:
            return _print_json(rows)
        for r in rows:
            replayed = ", ".join(f"{x['job']}:{x['line']}" for x in r.get("replay", []))
            console.print(f"step {r['step']}" + (f" ({r['run']}, inherited)" if r["inherited"] else "")
                          + f": job {r['job']} lines {r['lines']}" + (f" replayed (job:line) {replayed}" if replayed
                                                                      else ""), markup=False)
        return
    rows = ledger.rows(ws.db, run_id, own)
    if as_json:
        return _print_json(rows)
    print_ledger(rows)


@app.command()
def versions(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")):
    """The versions: the checkpoint at the end of each job (v1, v2, ...), its step and evaluation, pinned or not,
    and whether retention kept its weights and optimizer state."""
    from .versions import all_versions

    ws = _ws()
    rows = all_versions(ws.db, ws.runs)
    if as_json:
        return _print_json(rows)
    table = Table("version", "run", "job", "file", "step", "eval loss", "held-out sets", "pinned", "gated",
                  "weights", "optimizer")
    for v in rows:
        loss = v["eval"].get("eval.file")
        held = [x for k, x in v["eval"].items() if k != "eval.file"]
        table.add_row(v["version"], v["run"], str(v["job"]), v["file"], str(v["step"]),
                      f"{loss:.4f}" if loss is not None else "-",
                      f"{len(held)}, mean {sum(held) / len(held):.4f}" if held else "-",
                      "yes" if v["pinned"] else "", "yes" if v["gated"] else "", v["weights"], v["optimizer"])
    console.print(table if rows else "no versions yet: a version is made when a job ends")
    if any(v["weights"] == "kept" and v["optimizer"] == "pruned" for v in rows):
        console.print("optimizer pruned: retention (training.keep_job_ends) kept the weights only; a rollback to "
                      "such a version starts the optimizer moments from zero")
    if any(v["weights"] == "pruned" for v in rows):
        console.print("weights pruned: by retention (training.prune_version_weights); such a version can no longer "
                      "be exported, tried or rolled back to")


@app.command("eval")
def eval_(
    matrix: bool = typer.Option(False, "--matrix", show_default=False,
                                help="Versions × evaluation sets (the one view there is; accepted for scripts)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    run_id: Optional[str] = typer.Option(None, "--run", help="This run's versions, after those of the versions it "
                                         "branched from (default: the active run)."),
):
    """The forgetting matrix: each version's loss on every held-out set (eval.holdout) and on eval.file."""
    from .versions import matrix as forgetting

    ws = _ws()
    _check_run(ws, run_id)
    data = forgetting(ws.db, run_id)
    if as_json:
        return _print_json(data)
    if not data["rows"]:
        console.print("no versions yet: a version is made when a job ends")
        return
    if not data["sets"]:
        console.print("no evaluation sets: set eval.holdout (examples held out of each job) or eval.file")
        return
    try:
        named = Path(ws.config().eval.file or "eval.file").name  # eval.file's set is named by the file it reads
    except ConveyorError:
        named = "eval.file"
    table = Table("version", "step", *[f"{s['name']}\n{s['file'] if s['job'] is not None else named}"
                                       for s in data["sets"]],
                  title="loss per evaluation set (change since the set's first score)")
    first: dict[str, float] = {}
    for row in data["rows"]:
        cells = []
        for s in data["sets"]:
            loss = row["loss"][s["name"]]
            if loss is None:
                cells.append("-")
                continue
            base = first.setdefault(s["name"], loss)
            cells.append(f"{loss:.4f}" + (f" ({(loss - base) / base:+.1%})" if base and loss != base else ""))
        table.add_row(row["version"] + (" gated" if row["gated"] else ""), str(row["step"]), *cells)
    console.print(table)


@app.command()
def rollback(
    version: str = typer.Argument(..., help="The version to go back to, e.g. v1 (see `conveyor versions`)."),
    requeue: bool = typer.Option(False, "--requeue", help="Queue again the jobs trained after that version."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
):
    """Start a new run from a version (weights, optimizer, scheduler, RNG, step); the old run is kept as it is."""
    from .rollback import rollback as branch

    result = branch(_ws(), version, requeue)
    if as_json:
        return _print_json(result)
    console.print(result["message"], markup=False)


@app.command()
def pin(version: str = typer.Argument(..., help="A version name, e.g. v3 (see `conveyor versions`).")):
    """Keep a version's checkpoint from retention forever (`conveyor unpin` undoes)."""
    from .versions import set_pinned

    ws = _ws()
    console.print(set_pinned(ws.db, ws.runs, version, True), markup=False)


@app.command()
def unpin(version: str = typer.Argument(..., help="A pinned version, e.g. v3.")):
    """Let retention treat a pinned version's checkpoint like any other again."""
    from .versions import set_pinned

    ws = _ws()
    console.print(set_pinned(ws.db, ws.runs, version, False), markup=False)


_TEMPERATURE = "0: greedy (the default; the same prompt, the same answer). Above 0: sample, higher is more varied."
_TOP_P = "With --temperature: sample from the likeliest tokens that together hold this probability (0 < P <= 1)."
_SEED = "With --temperature: the seed of each answer's draw, so sampled answers repeat (default: a random one)."
_SYSTEM = ("A system prompt before the conversation, through the chat template (chat-trained runs; a plain-text run "
           "ignores it, with a note).")


def _temperature(value: float) -> float:
    if not value >= 0:
        raise typer.BadParameter(f"{value} is below 0; give 0 for greedy decoding or more to sample, e.g. 0.7")
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
    seed: Optional[int] = typer.Option(None, "--seed", min=0, help=_SEED),
    system: Optional[str] = typer.Option(None, "--system", help=_SYSTEM),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
):
    """Answer a prompt with the current model or a version (greedy unless --temperature; chat template for
    chat-trained runs). An answer ends at the end-of-turn or end-of-text token, or after --max-new-tokens."""
    from .generate import Sampling, answer_all, load, notes, read_prompts

    if (prompt is None) == (prompts is None):
        raise typer.BadParameter("nothing to ask: give a PROMPT or --prompts FILE" if prompt is None else
                                 "give a PROMPT or --prompts FILE, not both", ctx=ctx, param_hint="PROMPT")
    asked = [prompt] if prompts is None else read_prompts(prompts)
    sampling = Sampling(temperature, top_p, seed)
    loaded = load(_ws(), version)
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
    seed: Optional[int] = typer.Option(None, "--seed", min=0, help=_SEED),
    system: Optional[str] = typer.Option(None, "--system", help=_SYSTEM + " /reset keeps it."),
):
    """Talk with the current model or a version, line by line (loaded once; greedy unless --temperature). A
    chat-trained run keeps the conversation; /reset starts over, /quit or end of input ends."""
    from .generate import Sampling, input_lines, talk

    talk(_ws(), version, max_new_tokens, input_lines(), Sampling(temperature, top_p, seed), system)


@app.command()
def export(
    out: Path = typer.Argument(..., help="Folder to write (must not exist yet)."),
    merge: bool = typer.Option(False, "--merge", help="Fold the LoRA adapter into the base weights (a plain model)."),
    run_id: Optional[str] = typer.Option(None, "--run", help="Run id (default: the active run)."),
    version: Optional[str] = typer.Option(None, "--version", help="Export this version (see `conveyor versions`) "
                                          "instead of the newest checkpoint."),
):
    """Export the newest verified checkpoint of a run (or a version), as it was trained (not as conveyor.toml says
    now)."""
    from .export import export as export_run

    message, warnings = export_run(_ws(), out, merge, run_id, version)
    for text in warnings:
        err.print(f"warning: {text}", style="yellow", markup=False)
    console.print(message, markup=False)


@app.command()
def doctor(as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
           deep: bool = typer.Option(False, "--deep", help="Hash every checkpoint file again (slow on big models)."),
           repair: bool = typer.Option(False, "--repair", help="Move a damaged, missing or mismatched conveyor.db "
                                       "aside (never deleted) and rebuild it from the checkpoint manifests, saying "
                                       "what could not be rebuilt; a whole, matching one is left alone.")):
    """Check the workspace (settings, database, stored data, every checkpoint, disk) and say how to fix it."""
    from .doctor import check
    from .faults import DatabaseDamaged

    try:
        ws = _ws()
    except DatabaseDamaged:  # doctor says so below; a cut-off command is finished once the database is whole
        ws = Workspace.open(_state["workspace"])
    report = None
    if repair:
        from .repair import repair as rebuild

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
    from .dashboard import check_bind, serve

    ws = _ws()
    check_bind(host, token)  # refuse before printing a URL
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
    from .preview import describe, preview_file

    shown = preview_file(_ws(), file, lines)
    if as_json:
        return _print_json([s.to_json() for s in shown.examples])
    for text in describe(shown, plain=not console.is_terminal or console.no_color):
        console.print(text)


@app.command()
def demo(folder: Path = typer.Argument(Path("demo-workspace"), help="Where to make the demo workspace.")):
    """Make a workspace with the tiny model and two sample files (what animals do, then questions about them), train
    them one after the other, print the ledger, then ask the model questions it was never trained on."""
    from .demo import ask_held_out, demo_config, one_thread, write_samples

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


def main() -> None:
    """The console script. Usage errors: the usage line, the `--help` hint and one message, exit 2, never a traceback.
    Package errors and machine faults (a full disk, a damaged database): one `error:` line, exit 1, the traceback
    with --debug. Ctrl-C: 130. standalone_mode=False hands all of them to us instead of typer's own handler; typer
    (0.28 on) raises its bundled copy of click's exceptions, whose public base is typer.TyperException, not click's.
    """
    try:
        code = app(standalone_mode=False)  # a typer.Exit raised in a command (Ctrl-C too: 130) comes back as its code
    except typer.TyperException as e:  # UsageError (exit 2) and the rest of typer's click exceptions
        if hasattr(e, "show"):
            e.show()
        else:
            err.print(f"Error: {e.format_message()}", markup=False, highlight=False)
        if e.exit_code == 2 and getattr(e, "ctx", None) is None:  # `-w` without a value: no command to name
            err.print("Try 'conveyor --help' for help.", markup=False, highlight=False)
        code = e.exit_code
    except typer.Exit as e:
        code = e.exit_code
    except (typer.Abort, KeyboardInterrupt):
        err.print("aborted", style="red")
        code = 130
    except Exception as e:
        fault = e if isinstance(e, ConveyorError) else explain(e, Path(_state["workspace"]).resolve())
        if fault is None or _state["debug"]:
            raise
        err.print(f"error: {fault}", style="red", markup=False)
        code = 1
    sys.exit(code if isinstance(code, int) else 0)
