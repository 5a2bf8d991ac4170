"""Commands that show what was trained: logs, status, history, versions and the forgetting matrix.
Each imports what it runs when it runs (cli/__init__.py says why)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.table import Column, Table

from ..errors import ConveyorError
from ..store import ledger, runs
from ..store.workspace import Workspace
from .console import console, print_ledger
from .root import _print_json, _ws, app


@app.command()
def logs(follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new lines."),
         lines: int = typer.Option(50, "-n", min=0, help="Lines to show first (0: none, then --follow).")):
    """The workspace log (one JSON object a line)."""
    ws = _ws()
    path = ws.logs / "conveyor.log"
    if not path.exists():
        raise ConveyorError(f"no log yet at {path}")
    with open(path, encoding="utf-8") as f:
        shown = f.readlines()  # read to the end either way: --follow goes on from there
        for line in shown[-lines:] if lines else []:
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

    from ..serve.status import one_line, render, status_data

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
    from ..store.versions import all_versions

    ws = _ws()
    rows = all_versions(ws.db, ws.runs)
    if as_json:
        return _print_json(rows)
    if not rows:
        return console.print("no versions yet: a version is made when a job ends")
    console.print(versions_table(rows))
    if any(v["weights"] == "kept" and v["optimizer"] == "pruned" for v in rows):
        console.print("weights only: retention (training.keep_job_ends) pruned the optimizer state and kept the "
                      "weights; a rollback to such a version starts the optimizer moments from zero")
    if any(v["weights"] == "pruned" for v in rows):
        console.print("pruned: retention (training.prune_version_weights) deleted the weights; such a version can no "
                      "longer be exported, tried or rolled back to")
    if any(v.get("preference") for v in rows):
        console.print(f"pref: {PREFERRED} (the mean over its held-out sets of pairs)", soft_wrap=False)


CHECKPOINT = {("kept", "kept"): "kept", ("kept", "pruned"): "weights only", ("pruned", "pruned"): "pruned"}
PREFERRED = "the share of held-out pairs whose chosen answer the version finds more likely than the rejected one"


def versions_table(rows: list[dict]) -> Table:
    """The versions, readable in 80 columns: ids, runs, jobs and steps are never cut (a long file name folds
    instead), pinned and gated are said under the version, and a column the same for every version (the run, when
    there is one; eval loss and held-out sets, when none has them) is said once or left out."""
    losses = [v["eval"].get("eval.file") for v in rows]
    held = [[x for k, x in v["eval"].items() if k not in ("eval.file", "retention")] for v in rows]
    kept = [(v.get("answers") or {}).get("retention") for v in rows]
    one_run = len({v["run"] for v in rows}) == 1
    show_loss, show_held, show_kept = any(x is not None for x in losses), any(held), any(kept)
    table = Table(Column("version", width=7), *([] if one_run else [Column("run", no_wrap=True)]),
                  Column("job", no_wrap=True), Column("file", overflow="fold"), Column("step", no_wrap=True),
                  *([Column("eval loss", width=6)] if show_loss else []),
                  *([Column("held-out sets", width=8)] if show_held else []),
                  *([Column("retention", no_wrap=True)] if show_kept else []), Column("checkpoint", no_wrap=True),
                  title=f"versions of {rows[0]['run']}" if one_run else None, title_justify="left")
    for v, loss, sets, base in zip(rows, losses, held, kept):
        marks = ", ".join(mark for mark, on in (("pinned", v["pinned"]), ("gated", v["gated"])) if on)
        table.add_row(f"{v['version']} {marks}".strip(), *([] if one_run else [v["run"]]), str(v["job"]), v["file"],
                      str(v["step"]), *([f"{loss:.4f}" if loss is not None else "-"] if show_loss else []),
                      *([_held_cell(sets, {k: a for k, a in (v.get("answers") or {}).items() if k != "retention"},
                                    v.get("preference") or {})] if show_held else []),
                      *([f"F1 {base['f1']:.0%}" if base else "-"] if show_kept else []),
                      CHECKPOINT.get((v["weights"], v["optimizer"]), v["weights"]))
    return table


def _held_cell(losses: list[float], answers: dict[str, dict], preferred: dict[str, float]) -> str:
    """The held-out sets of a version: how many, their mean loss and, where answers were scored, their mean F1;
    where sets of pairs were scored, the mean share of their pairs preferred."""
    if not losses:
        return "-"
    f1, pref = [a["f1"] for a in answers.values()], list(preferred.values())
    return (f"{len(losses)}, mean {sum(losses) / len(losses):.4f}" + (f", F1 {sum(f1) / len(f1):.2f}" if f1 else "")
            + (f", pref {sum(pref) / len(pref):.0%}" if pref else ""))


@app.command("eval")
def eval_(
    matrix: bool = typer.Option(False, "--matrix", show_default=False,
                                help="Versions × evaluation sets (the one view there is; accepted for scripts)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    run_id: Optional[str] = typer.Option(None, "--run", help="This run's versions, after those of the versions it "
                                         "branched from (default: the active run)."),
    last: Optional[int] = typer.Option(None, "--last", min=0, show_default=False,
                                       help="The newest N versions (0: all; default 20, and all with --json)."),
    sets: int = typer.Option(8, "--sets", min=0, help="The newest N held-out sets as columns, beside eval.file and "
                             "retention (0: all; --json has all)."),
):
    """The forgetting matrix: each version's loss (and scored answers) on every held-out set (eval.holdout), on
    eval.file and on the probe (retention)."""
    from ..store.versions import matrix as forgetting

    ws = _ws()
    _check_run(ws, run_id)
    data = forgetting(ws.db, run_id)
    if as_json:
        if last:
            data["rows"] = data["rows"][-last:]
        return _print_json(data)
    last = 20 if last is None else last
    shown_rows = data["rows"][-last:] if last else data["rows"]
    held = [s for s in data["sets"] if s["job"] is not None]
    shown_sets = [s for s in data["sets"] if s["job"] is None] + (held[-sets:] if sets else held)
    left_out = []
    if len(shown_rows) < len(data["rows"]):
        left_out.append(f"the newest {len(shown_rows)} of {len(data['rows'])} versions (--last 0 shows all)")
    if len(shown_sets) < len(data["sets"]):
        left_out.append(f"the newest {len(shown_sets) - (len(data['sets']) - len(held))} of {len(held)} held-out sets "
                        "(--sets 0 shows all)")
    first_scores = {s["name"]: next((r["loss"][s["name"]] for r in data["rows"] if r["loss"][s["name"]] is not None),
                                    None) for s in data["sets"]}
    data = {"sets": shown_sets, "rows": shown_rows}
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
    table = Table("version", "step", *[f"{s['name']}\n{named if s['file'] == 'eval.file' else s['file']}"
                                       for s in data["sets"]],
                  title="loss per evaluation set (change since the set's first score), answers scored")
    first: dict[str, float] = {k: v for k, v in first_scores.items() if v is not None}
    for row in data["rows"]:
        cells = []
        for s in data["sets"]:
            loss = row["loss"][s["name"]]
            if loss is None:
                cells.append("-")
                continue
            base = first.setdefault(s["name"], loss)
            cells.append(f"{loss:.4f}" + (f" ({(loss - base) / base:+.1%})" if base and loss != base else "") +
                         _scores(row["answers"].get(s["name"]), row.get("preference", {}).get(s["name"])))
        table.add_row(row["version"] + (" gated" if row["gated"] else ""), str(row["step"]), *cells)
    console.print(table)
    if left_out:
        console.print("shown: " + "; ".join(left_out))
    if any(row["answers"] for row in data["rows"]):
        console.print("F1 · EM: the held-out questions' greedy answers against the references (token F1, exact "
                      "match; eval.answers per set); retention: the probe's answers against the base model's own "
                      "(eval.probe)")
    if any(row.get("preference") for row in data["rows"]):
        console.print(f"pref: {PREFERRED} (log-probability of the whole answer)", soft_wrap=False)


def _scores(answers: dict | None, preferred: float | None) -> str:
    """A matrix cell's second line: the set's scored answers (F1 · EM) and, for a set of pairs, the share preferred."""
    said = ([f"F1 {answers['f1']:.2f} · EM {answers['exact']:.0%}"] if answers else []) + \
        ([f"pref {preferred:.0%}"] if preferred is not None else [])
    return "\n" + " · ".join(said) if said else ""
