"""benchmarks/peer.py without TRL: the model it measures is chosen by --model, and its table shows each side's peak
memory. (The comparison itself needs TRL in a venv of its own: see the script's docstring.)"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "peer.py"


def _peer():
    spec = importlib.util.spec_from_file_location("peer", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_trl_it_says_how_to_install_it_and_exits_0_and_an_unknown_model_is_refused():
    ok = subprocess.run([sys.executable, str(SCRIPT), "--model", "smollm2-135m-instruct", "--trl-python",
                         "/nonexistent/python"], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "TRL is not installed" in ok.stdout, ok.stdout + ok.stderr
    bad = subprocess.run([sys.executable, str(SCRIPT), "--model", "huge"], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and "smollm2-135m-instruct" in bad.stderr


def test_the_table_shows_each_sides_peak_memory_as_the_median_of_its_runs(capsys):
    peer = _peer()
    runs = lambda rss: [{"e2e": 10.0 + k, "cpu": 9.0, "phase": 5.0, "steps": 4, "rss": r} for k, r in enumerate(rss)]
    conv, trl = peer.summary(runs([900, 1000, 2000]), 1000), peer.summary(runs([1500, 1600, 1700]), 1000)
    assert (conv["rss"], trl["rss"]) == (1000, 1600)
    peer.report([("skewed", 32, conv, trl)], 3)
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("data"))
    assert header.endswith("peak RSS MB")
    rows = [line.split() for line in lines if line.startswith("skewed ") and line.split()[2] in ("conveyor", "TRL")]
    assert [(row[2], row[-1]) for row in rows] == [("conveyor", "1,000"), ("TRL", "1,600")]
