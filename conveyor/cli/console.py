"""What conveyor prints on a terminal: the daemon's messages and progress bars, and the ledger table."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Column, Table

from ..fingerprint import short
from ..store import jobs

# No fixed file: rich looks up sys.stdout / sys.stderr at each print, so a test runner can capture them.
console = Console(stderr=False, highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


class ConsoleReporter:
    """Prints the daemon's messages and a progress bar per job (step / planned, loss, examples/s, ETA)."""

    STYLES = {"info": "", "warning": "yellow", "error": "bold red"}

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.bar: Progress | None = None
        self.task = None

    def message(self, level: str, text: str) -> None:
        target = err if level != "info" else console
        prefix = "" if level == "info" else f"{level}: "
        target.print(f"[{self.STYLES[level]}]{prefix}{text}[/]" if self.STYLES[level] else prefix + text,
                     markup=bool(self.STYLES[level]))

    def job_started(self, job: jobs.Job) -> None:
        console.print(jobs.started_text(job), markup=False)
        if self.quiet:
            return
        self.bar = Progress(TextColumn("  job {task.fields[job]}"), BarColumn(), TaskProgressColumn(),
                            TextColumn("step {task.completed:.0f}/{task.total:.0f}"),
                            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]} ex/s"),
                            TimeRemainingColumn(), console=console, transient=True)
        self.bar.start()
        self.task = self.bar.add_task("train", total=job.planned_steps, completed=job.steps_done, job=job.id,
                                      loss="-", rate="-")

    def progress(self, job, done, planned, loss, rate) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=done, loss=f"{loss:.4f}" if loss is not None else "-",
                            rate=f"{rate:.1f}")

    def job_finished(self, job: jobs.Job) -> None:
        self.close()
        console.print(jobs.finished_text(job), markup=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def print_ledger(rows: list[dict]) -> None:
    """The ledger as a table: which job trained which global steps, on how much data, how (sft, or a preference
    method and the version it measured against), with its loss. Rows a rollback's run inherited from the run it
    branched from are dimmed and say so. The method column shows once a job trained otherwise than sft."""
    methods = [method_cell(r) for r in rows] if any(r.get("method", "sft") != "sft" for r in rows) else []
    whole = lambda name: Column(name, no_wrap=True)  # ids, steps and counts are never cut; names and words wrap
    table = Table(whole("run"), whole("job"), Column("file", overflow="fold"), whole("fingerprint"), whole("steps"),
                  "examples", "epochs", whole("tokens"), *([whole("method")] if methods else []), "first loss",
                  "last loss", whole("outcome"), title="ledger")
    # Wide enough for every column whole: the method column (when a job trained otherwise than sft) widens it more.
    method_width = max(len(line) for cell in methods + ["method"] for line in cell.split("\n")) + 3 if methods else 0
    console.width = max(console.width, 120 + method_width)
    for i, r in enumerate(rows):
        fmt = lambda v: f"{v:.4f}" if v is not None else "-"
        table.add_row(r["run"] + (" (inherited)" if r.get("inherited") else ""), str(r["job"]), r["file"],
                      short(r["fingerprint"]), f"{r['start_step']}–{r['end_step']}",
                      str(r["examples"]) + (f" + {r['replayed']} replayed" if r.get("replayed") else ""),
                      str(r["epochs"]), str(r["tokens"]), *([methods[i]] if methods else []),
                      fmt(r["first_loss"]), fmt(r["last_loss"]), r["outcome"] + (" *" if r.get("overrides") else ""),
                      style="dim" if r.get("inherited") else None)
    inherited = [r for r in rows if r.get("inherited")]
    notes = []
    if any(r.get("reference") for r in rows):
        notes.append("ref: a preference job's reference, the model as the job found it (a version, base, or `step N`: "
                     "a checkpoint inside a job); orpo has none")
    if inherited:
        notes.append(f"steps {inherited[0]['start_step']}–{inherited[-1]['end_step']}: inherited from "
                     f"{', '.join(dict.fromkeys(r['run'] for r in inherited))} (this run branched from it)")
    own = {r["job"]: r["overrides"] for r in rows if r.get("overrides")}
    notes += [f"* job {job} trained with " + ", ".join(f"{k}={v}" for k, v in settings.items())
              for job, settings in own.items()]
    table.caption = "\n".join(notes) or None
    console.print(table)


def method_cell(row: dict) -> str:
    """How a ledger row trained: `sft`, or a preference method over its reference (`dpo` / `ref v1`)."""
    ref = row.get("reference")
    name = (ref.get("name") or f"step {ref['step']}") if ref else None
    return row.get("method", "sft") + (f"\nref {name}" if name else "")
