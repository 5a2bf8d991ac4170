"""What the viewing commands print in an 80-column terminal: `versions` cuts no version id, run id or step, and
`logs -n` takes a count of 0 or more; and what they say of preference jobs: the method and reference in `history`,
the share of held-out pairs preferred in `versions` and `eval --matrix`."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
from conftest import make_workspace, run_cli, text_file
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


# Preference jobs: the method and reference in the ledger, the share of held-out pairs preferred per version ------
def pair_file(path: Path, n: int = 12) -> Path:
    """A preference file of n pairs: "q<k>?" answered " yes <k>" (chosen) rather than " no <k>" (k from 1)."""
    path.write_text("".join(json.dumps({"prompt": f"q{i}?", "chosen": f" yes {i}", "rejected": f" no {i}"}) + "\n"
                            for i in range(1, n + 1)), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def preferred(tmp_path_factory, tiny_dir) -> Path:
    """A supervised job of 8 examples (v1, steps 1–2), then a DPO job of 12 pairs against v1 (v2, steps 3–5); a
    quarter of each file held out."""
    root = tmp_path_factory.mktemp("preferred")
    ws = make_workspace(root / "ws", tiny_dir, training={"batch_size": 4, "grad_accum": 1, "learning_rate": 1e-3,
                                                         "save_every": 2, "max_length": 64}, eval={"holdout": 0.25})
    r = run_cli(ws, "train", text_file(root / "a.jsonl", 8, "a"), pair_file(root / "pairs.jsonl"), "-q")
    assert r.code == 0, r.out + r.err
    return ws


def test_history_says_how_each_job_trained_and_a_preference_jobs_reference(preferred):
    rows = json.loads(run_cli(preferred, "history", "--json").out)
    assert [(r["job"], r["method"], r["start_step"], r["end_step"]) for r in rows] == [
        (1, "sft", 1, 2), (2, "dpo", 3, 5)]
    assert "reference" not in rows[0]
    reference = rows[1]["reference"]
    assert (reference["kind"], reference["step"], reference["name"]) == ("adapter", 2, "v1")
    r = run_cli(preferred, "history", env=NARROW)
    assert r.code == 0 and "…" not in r.out, r.out
    header = r.out.split("┡")[0]
    assert "method" in header and header.index("tokens") < header.index("method") < header.index("first"), header
    lines = [[c.strip() for c in line.strip("│").split("│")] for line in r.out.splitlines()
             if line.startswith("│")]
    names = next(line for line in header.splitlines() if line.startswith("┃"))
    column = [c.strip() for c in names.strip("┃").split("┃")].index("method")
    assert [line[column] for line in lines] == ["sft", "dpo", "ref v1"], r.out
    assert "ref: a preference job's reference, the model as the job found it" in " ".join(r.out.split())


def test_a_supervised_ledger_has_no_method_column_and_references_are_named_whole():
    from conveyor.cli import console as printing

    sft = {"run": "run-0001", "job": 1, "file": "a.jsonl", "fingerprint": "ab" * 32, "start_step": 1, "end_step": 2,
           "examples": 8, "replayed": 0, "epochs": 1, "tokens": 200, "first_loss": 5.5, "last_loss": 5.4,
           "outcome": "done", "method": "sft", "overrides": {}}
    with printing.console.capture() as shown:
        printing.print_ledger([sft])
    assert "method" not in shown.get() and "ref" not in shown.get()
    assert printing.method_cell(sft) == "sft"
    assert printing.method_cell({**sft, "method": "orpo"}) == "orpo"
    kto = {**sft, "method": "kto", "reference": {"kind": "logps", "step": 0, "name": "base"}}
    assert printing.method_cell(kto) == "kto\nref base"
    inside = {**sft, "job": 3, "method": "ipo", "start_step": 123457, "end_step": 123460,
              "reference": {"kind": "adapter", "step": 123456, "name": "step 123456"}}
    with printing.console.capture() as shown:
        printing.print_ledger([sft, kto, inside])
    text = shown.get()
    assert "…" not in text and "ref step 123456" in text and "ref base" in text and "123457–123460" in text, text


def test_a_reference_is_named_by_the_version_of_its_step_along_the_lineage(preferred, tmp_path):
    """base at step 0, a version where one ends (in whichever run of a rollback's lineage), else `step N`."""
    from conveyor.store.versions import step_name
    from conveyor.store.workspace import Workspace

    ws = tmp_path / "ws"
    shutil.copytree(preferred, ws)
    assert run_cli(ws, "rollback", "v1").code == 0  # run-0002 branches from v1 (step 2) of run-0001
    con = Workspace.open(ws).db
    assert [step_name(con, "run-0001", s) for s in (0, 2, 3, 5)] == ["base", "v1", "step 3", "v2"]
    assert [step_name(con, "run-0002", s) for s in (0, 2, 5)] == ["base", "v1", "step 5"]  # v2 is not its lineage's
    con.close()


def test_versions_and_the_matrix_show_held_out_pairs_preferred_in_80_columns(preferred):
    versions = json.loads(run_cli(preferred, "versions", "--json").out)
    assert [v["preference"] for v in versions[:1]] == [{}] and set(versions[1]["preference"]) == {"job 2"}
    share = versions[1]["preference"]["job 2"]
    assert 0.0 <= share <= 1.0
    r = run_cli(preferred, "versions", env=NARROW)
    assert r.code == 0 and max(map(len, r.out.splitlines())) <= 80 and "…" not in r.out, r.out
    held = " ".join(row[4] for row in cells_of(r.out, "v2"))
    assert f"pref {share:.0%}" in held, r.out
    assert "pref: the share of held-out pairs whose chosen answer the version finds more likely" in " ".join(
        r.out.split())
    matrix = json.loads(run_cli(preferred, "eval", "--matrix", "--json").out)
    assert [row["preference"] for row in matrix["rows"]] == [{}, {"job 2": share}]
    r = run_cli(preferred, "eval", "--matrix", env=NARROW)
    assert r.code == 0 and max(map(len, r.out.splitlines())) <= 80 and "…" not in r.out, r.out
    assert [row[3] for row in cells_of(r.out, "v2")][1] == f"pref {share:.0%}", r.out  # under job 2's loss
    assert not any("pref" in row[2] for row in cells_of(r.out, "v2"))  # job 1's set is not of pairs
    assert "pref: the share of held-out pairs" in r.out


def cells_of(out: str, version: str) -> list[list[str]]:
    """The lines of a version's table row, each as its cells (under its id: its pinned and gated marks)."""
    rows, current = [], None
    for line in out.splitlines():
        if line.startswith("│"):
            cells = [c.strip() for c in line.strip("│").split("│")]
            word = cells[0].split()[0] if cells[0] else ""
            current = word if word == "base" or word[:1] == "v" and word[1:].isdigit() else current
            if current == version:
                rows.append(cells)
    return rows


def test_every_version_with_pairs_still_fits_80_columns():
    rows = [version(n, run=1 + n // 3, preference={"holdout job 1": 0.625, "holdout job 2": 1.0},
                    answers={"holdout job 1": {"exact": 0.5, "f1": 0.75, "answered": 4}}) for n in range(1, 13)]
    out = io.StringIO()
    Console(file=out, width=80).print(versions_table(rows))
    text = out.getvalue()
    assert max(map(len, text.splitlines())) <= 80 and "…" not in text, text
    assert all("pref 81%" in " ".join(r[6] for r in cells_of(text, v["version"])) for v in rows), text
