"""conveyor adds bookkeeping, not hidden changes: its weights equal a plain HF Trainer + PEFT script's."""

from __future__ import annotations

import sys
from pathlib import Path

from conftest import adapter_weights, audit, max_abs_diff, run_cli, status, text_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from hf_baseline import Settings, train_plain  # noqa: E402


def test_same_weights_as_a_plain_trainer_script(workspace, tmp_path, tiny_dir):
    ws = workspace(training={"batch_size": 4, "grad_accum": 2, "learning_rate": 1e-3, "warmup_steps": 2,
                             "save_every": 100, "max_length": 64}, adapter={"dropout": 0.0})
    data = text_file(tmp_path / "d.jsonl", 37, "d")  # 5 steps, the last one partial
    assert run_cli(ws, "train", data, "-q").code == 0
    run_id = status(ws)["run"]["id"]
    ours = adapter_weights(ws / "runs" / run_id / "checkpoints" / "step-000005")
    # The same data order conveyor used, as file indices, handed to the plain script.
    order = [line - 1 for row in audit(ws) for line in row["lines"]]
    plain = train_plain(str(tiny_dir), data, order,
                        Settings(batch_size=4, grad_accum=2, learning_rate=1e-3, warmup_steps=2, max_length=64),
                        tmp_path / "plain")
    assert plain["steps"] == 5
    theirs = {k.replace(".default", ""): v for k, v in plain["weights"].items()}
    ours = {k.replace(".default", ""): v for k, v in ours.items()}
    assert max_abs_diff(ours, theirs) <= 1e-6
    base_b = {k: v for k, v in ours.items() if "lora_B" in k}
    assert max(float(v.abs().max()) for v in base_b.values()) > 1e-4  # training really moved the weights
