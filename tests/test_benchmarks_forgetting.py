"""benchmarks/forgetting.py in --smoke mode: both sides run, conveyor without replay matches the plain Trainer
script, and replay costs the steps it should."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "forgetting.py"


def _row(out: str, side: str) -> list[str]:
    line = next(line for line in out.splitlines() if line.startswith(f"| {side} "))
    return [cell.strip() for cell in line.strip("|").split("|")]


@pytest.mark.slow
def test_the_forgetting_benchmark_runs_and_replay_0_is_the_plain_trainer():
    p = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--replays", "0", "0.3"], capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    plain, none, some = (_row(p.stdout, s) for s in ("plain HF Trainer, A then B", "conveyor, replay 0",
                                                      "conveyor, replay 0.3"))
    # 24 examples, 4 held out: 20 a job, 4 a step; replay 0.3 adds round(20 × 0.3 / 0.7) = 9 examples.
    assert [plain[6], none[6], some[6]] == ["5", "5", "8"]
    assert plain[1] == none[1] == some[1]  # A before B: the same A job, the same held-out examples
    gap = float(p.stdout.split("largest loss difference ")[1].split()[0])
    assert gap < 1e-4, p.stdout  # only replay differs from the plain script, and replay 0 is none
