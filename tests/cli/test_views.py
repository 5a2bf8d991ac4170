"""What the viewing commands print in an 80-column terminal: `versions` cuts no version id, run id or step, and
`logs -n` takes a count of 0 or more."""

from __future__ import annotations

import io
import json

from conftest import run_cli, text_file
from rich.console import Console

from conveyor.cli.views import versions_table

NARROW = {"COLUMNS": "80"}  # as in an 80-column terminal (run_cli runs a subprocess when given env)


def first_lines(out: str, job: int = 2) -> list[list[str]]:
    """The cells of the first line of each table row: the line with a job id in column `job` (a wrapped or folded
    cell goes on in the lines below)."""
    cells = [[c.strip() for c in line.strip().strip("│").split("│")] for line in out.splitlines()
             if line.startswith("│")]
    return [row for row in cells if row[job]]


def version(number: int, run: int, **fields) -> dict:
    return {"version": f"v{number}", "run": f"run-{run:04d}", "job": 100 + number,
            "file": "a_rather_long_name_for_the_training_file_of_this_week.jsonl", "step": 123456 + number,
            "eval": {"eval.file": 1.23456, "holdout job 1": 2.5, "holdout job 2": 3.25}, "pinned": number % 2 == 0,
            "gated": number % 3 == 0, "weights": "kept", "optimizer": "pruned", **fields}


def test_every_column_of_versions_fits_80_columns_with_ids_and_steps_whole():
    """The widest case: several runs, both kinds of evaluation, pinned and gated versions, long names."""
    rows = [version(n, run=1 + n // 3) for n in range(1, 13)]
    out = io.StringIO()
    Console(file=out, width=80).print(versions_table(rows))
    text = out.getvalue()
    assert max(map(len, text.splitlines())) <= 80, text
    assert "…" not in text, text
    shown = first_lines(text)
    assert [(r[0].split()[0], r[1], r[2], r[4]) for r in shown] == \
        [(v["version"], v["run"], str(v["job"]), str(v["step"])) for v in rows], text
    header = text.split("┡")[0]
    for word in ("version", "run", "job", "file", "step", "eval", "held-out", "checkpoint"):
        assert word in header, header


def test_versions_leave_out_what_no_version_has():
    """No evaluation, nothing pinned or gated, one run: no empty columns, and the run is said once, above."""
    rows = [version(n, run=1, eval={}, pinned=False, gated=False, weights="kept", optimizer="kept")
            for n in (1, 2)]
    out = io.StringIO()
    Console(file=out, width=80).print(versions_table(rows))
    text = out.getvalue()
    assert text.splitlines()[0].strip() == "versions of run-0001", text
    assert not any(word in text for word in ("eval", "held-out", "pinned", "gated")), text
    assert [row[:2] for row in first_lines(text, job=1)] == [["v1", "101"], ["v2", "102"]], text


def test_versions_in_an_80_column_terminal(workspace, tmp_path):
    """The real command: two runs (a rollback branched the second), read back whole at 80 columns."""
    ws = workspace()
    files = [text_file(tmp_path / f"{tag}.jsonl", 8, tag) for tag in ("a", "b", "c")]
    assert run_cli(ws, "train", *files[:2]).code == 0
    assert run_cli(ws, "rollback", "v1").code == 0
    assert run_cli(ws, "train", files[2]).code == 0
    versions = json.loads(run_cli(ws, "versions", "--json").out)
    assert len({v["run"] for v in versions}) == 2
    r = run_cli(ws, "versions", env=NARROW)
    assert r.code == 0, r.out + r.err
    assert max(map(len, r.out.splitlines())) <= 80 and "…" not in r.out, r.out
    assert [(row[0], row[1], row[2], row[4]) for row in first_lines(r.out)] == \
        [(v["version"], v["run"], str(v["job"]), str(v["step"])) for v in versions], r.out


def test_logs_take_a_count_of_0_or_more(workspace, tmp_path):
    ws = workspace()
    (tmp_path / "bad.jsonl").write_text("not json\n")
    run_cli(ws, "add", tmp_path / "bad.jsonl")  # rejected: an event in the log
    assert run_cli(ws, "logs", "-n", "1").out.count("\n") == 1
    r = run_cli(ws, "logs", "-n", "0")
    assert (r.code, r.out) == (0, "")
    r = run_cli(ws, "logs", "-n", "-5", env=NARROW)
    assert r.code == 2 and r.out == "", r.out
    assert "Invalid value for '-n'" in r.err and "greater than or equal to 0" in r.err, r.err
    assert "Traceback" not in r.err
