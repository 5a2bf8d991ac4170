"""The house's wings: every import of conveyor's own modules (function-level and type-only ones included) points down
the layout below, and no module reaches itself through its imports. Read from the source with `ast`, so a wrong-way
import fails here before anything runs it."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "conveyor"
TOP = "conveyor"  # the few modules at the top: errors, faults, config, overrides, fingerprint, testhooks

# Each wing and the wings it may import. `serve` and `queue` stand side by side: neither imports the other.
LAYOUT = {
    "conveyor.cli": ["conveyor.serve", "conveyor.queue", "conveyor.train", "conveyor.store", "conveyor.data", TOP],
    "conveyor.serve": ["conveyor.train", "conveyor.store", "conveyor.data", TOP],
    "conveyor.queue": ["conveyor.train", "conveyor.store", "conveyor.data", TOP],
    "conveyor.train": ["conveyor.store", "conveyor.data", TOP],
    "conveyor.store": ["conveyor.data", TOP],
    "conveyor.data": [TOP],
    TOP: [],
}
# What a wing's modules are about (docs/design.md says the same, one line each).
WINGS = {"cli", "serve", "queue", "train", "store", "data"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """(module of conveyor imported, line) for every import statement in the file, wherever it stands."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "conveyor"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "conveyor":
                continue
            for alias in node.names:  # `from conveyor.store import jobs` imports the module jobs
                target = f"{base}.{alias.name}"
                found.append((target if target in known else base, node.lineno))
    return found


def wing(name: str) -> str:
    if name == "conveyor.__main__":  # `python -m conveyor`: the command line, as cli
        return "conveyor.cli"
    parts = name.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 or (len(parts) == 2 and parts[1] in WINGS) else TOP


def graph() -> dict[str, list[tuple[str, int]]]:
    found = modules()
    return {name: [(t, line) for t, line in imports(name, path, set(found)) if t != name and t in found]
            for name, path in found.items()}


def test_the_package_has_the_six_wings_one_level_deep_and_their_init_files_are_empty():
    packages = {p.parent.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("__init__.py")} - {"."}
    assert packages == WINGS
    for name in WINGS - {"cli"}:  # cli/__init__.py is the entry point (`conveyor = conveyor.cli:main`)
        assert (PACKAGE / name / "__init__.py").read_text() == "", f"conveyor/{name}/__init__.py is not empty"


def test_every_import_points_down_the_layout():
    wrong = []
    for name, targets in graph().items():
        here = wing(name)
        for target, line in targets:
            there = wing(target)
            if there != here and there not in LAYOUT[here] and target != "conveyor":  # `conveyor`: __version__
                wrong.append(f"{name}:{line} imports {target} ({here} may import {LAYOUT[here] or 'only its own'})")
    assert not wrong, "imports that point up or sideways:\n" + "\n".join(wrong)


def test_no_module_reaches_itself_through_its_imports():
    edges = {name: sorted({t for t, _ in targets}) for name, targets in graph().items()}
    circles = strongly_connected(edges)
    assert not circles, "import circles:\n" + "\n".join(" → ".join(c) for c in circles)


def strongly_connected(edges: dict[str, list[str]]) -> list[list[str]]:
    """Tarjan's components of more than one module (a circle), iteratively: the graph is small, but no recursion."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(edges[root]))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(edges.get(child, []))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


@pytest.mark.parametrize("edges, circles", [
    ({"a": ["b"], "b": ["c"], "c": []}, []),
    ({"a": ["b"], "b": ["a"], "c": ["a"]}, [["a", "b"]]),
    ({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["d"]}, [["a", "b", "c"]]),
])
def test_the_circle_finder_finds_circles(edges, circles):
    assert strongly_connected(edges) == circles


def test_the_layout_check_sees_a_wrong_way_import(tmp_path, monkeypatch):
    """The check is not vacuous: a store module that imports the trainer is named with its line."""
    fake = tmp_path / "conveyor"
    for wing_name in ("store", "train"):
        (fake / wing_name).mkdir(parents=True)
        (fake / wing_name / "__init__.py").write_text("")
    (fake / "__init__.py").write_text("")
    (fake / "train" / "trainer.py").write_text("X = 1\n")
    (fake / "store" / "jobs.py").write_text("def f():\n    from ..train import trainer\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    with pytest.raises(AssertionError, match=r"conveyor.store.jobs:2 imports conveyor.train.trainer"):
        test_every_import_points_down_the_layout()


# One writer per table (docs/design.md, "State"): the module that may write each table of conveyor.db.
WRITERS = {
    "runs": "conveyor.store.runs", "jobs": "conveyor.store.jobs", "versions": "conveyor.store.versions",
    "controls": "conveyor.store.controls", "ledger": "conveyor.store.ledger", "audit": "conveyor.store.ledger",
    "metrics": "conveyor.store.ledger", "evals": "conveyor.store.ledger", "set_evals": "conveyor.store.ledger",
    "samples": "conveyor.store.ledger", "metrics_rollup": "conveyor.store.series", "events": "conveyor.store.database",
    "notify_cursor": "conveyor.queue.notify",
}
WRITE = re.compile(r"\b(?:INSERT(?:\s+OR\s+[A-Z]+)?\s+INTO|REPLACE\s+INTO|UPDATE|DELETE\s+FROM)\s+(\w+)")


def table_writes() -> list[tuple[str, str, int]]:
    """(table, module, line) for every SQL write in a string of conveyor's source (f-strings included)."""
    found = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                found += [(m.group(1), name, node.lineno) for m in WRITE.finditer(node.value)]
    return found


def test_each_table_has_one_writing_module():
    from conveyor.store.database import SCHEMA

    tables = set(re.findall(r"CREATE TABLE IF NOT EXISTS (\w+)", SCHEMA))
    assert tables == set(WRITERS), "a table without a named writer, or a writer of no table"
    writes = [(table, module, line) for table, module, line in table_writes() if table in tables]
    # Every table is written somewhere by name, but metrics and its siblings: ledger.forget_after's `{table}`.
    assert {table for table, _, _ in writes} >= set(WRITERS) - {"metrics"}
    wrong = [f"{module}:{line} writes {table} (its writer is {WRITERS[table]})"
             for table, module, line in writes if WRITERS[table] != module]
    assert not wrong, "tables written outside their module:\n" + "\n".join(wrong)
