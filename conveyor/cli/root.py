"""The `conveyor` command's root: its global options (before or after any command), the workspace every command
opens, and `main`, which turns usage errors, package errors and machine faults into messages and exit codes."""

from __future__ import annotations

import copy
import json
import sys
from importlib import metadata
from pathlib import Path

import typer
from typer.core import TyperGroup

from ..errors import ConveyorError
from ..faults import explain
from ..store.workspace import Workspace
from .console import console, err

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
        from .. import __version__

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
    from ..store.pending import recover

    ws = Workspace.open(_state["workspace"])
    recover(ws)
    return ws


def _print_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


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
