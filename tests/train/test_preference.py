"""Preference (DPO, IPO, ORPO) and feedback (KTO) jobs in the same queue as supervised ones, under the same laws:
steps accumulate across methods, every pair once per epoch in the fixed order, a SIGKILL mid-job resumes to the
uninterrupted weights, and the reference (the model as the job found it) is recorded, kept and verified."""

from __future__ import annotations

import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import adapter_weights, audit, ledger, make_workspace, max_abs_diff, run_cli, status, text_file

SETTINGS = {"training": {"batch_size": 2, "grad_accum": 2, "save_every": 2, "max_length": 48, "learning_rate": 1e-3,
                         "preference_learning_rate": 1e-3},
            "adapter": {"dropout": 0.1}}  # dropout > 0: the RNG must be restored exactly too


def pair_file(path: Path, n: int, tag: str = "q") -> Path:
    """n preference pairs; line k asks "<tag> k?" and prefers " yes k" to " no k, never" (k from 1)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prompt": f"{tag} {k}?", "chosen": f" yes {k}",
                                        "rejected": f" no {k}, never"}) + "\n" for k in range(1, n + 1)))
    return path


def feedback_file(path: Path, n: int) -> Path:
    """n feedback answers, good (true) on even lines and bad (false) on odd ones."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prompt": f"tell me {k}", "completion": f" fine {k}" if k % 2 == 0
                                        else f" awful {k} x", "label": k % 2 == 0}) + "\n" for k in range(1, n + 1)))
    return path


def _db(ws: Path, query: str, args: tuple = ()) -> list[tuple]:
    con = sqlite3.connect(ws / "conveyor.db", timeout=30)
    try:
        return con.execute(query, args).fetchall()
    finally:
        con.close()


def _drain(ws: Path) -> None:
    r = run_cli(ws, "run", "--drain", "-q")
    assert r.code == 0, r.out + r.err


def _lines_once(ws: Path, job: int, n: int, epochs: int = 1) -> None:
    seen = Counter(line for row in audit(ws) if row["job"] == job for line in row["lines"])
    assert seen == Counter({line: epochs for line in range(1, n + 1)}), (job, seen)


def test_sft_then_dpo_then_sft_steps_accumulate_and_every_pair_trains_once(workspace, tmp_path):
    ws = workspace(**SETTINGS, replay={"fraction": 0.25})
    files = [text_file(tmp_path / "a.jsonl", 8, "a"), pair_file(tmp_path / "b.jsonl", 12),
             text_file(tmp_path / "c.jsonl", 8, "c")]
    r = run_cli(ws, "add", *map(str, files))
    assert r.code == 0 and "12 examples, preference" in r.out, r.out + r.err
    r = run_cli(ws, "run", "--drain", "-q")
    assert r.code == 0, r.out + r.err
    assert "job 2 replays nothing: it is a preference file" in r.out
    # Law 1: 8/4 = 2 steps, 12/4 = 3, then job 3's 8 own + 2 replayed (replay.fraction 0.25) = 10 → 3 steps.
    rows = ledger(ws)
    assert [(r["job"], r["start_step"], r["end_step"], r["method"]) for r in rows] == \
        [(1, 1, 2, "sft"), (2, 3, 5, "dpo"), (3, 6, 8, "sft")]
    # Law 2: every pair once, in the audit like any example; job 3 replays job 1 only (pairs are no demonstrations).
    for job, n in ((1, 8), (2, 12), (3, 8)):
        _lines_once(ws, job, n)
    replayed = [item["job"] for row in audit(ws) for item in row.get("replay", [])]
    assert replayed and set(replayed) == {1}
    # The reference: the model as job 2 found it, the version at global step 2, kept as a frozen adapter copy.
    reference = rows[1]["reference"]
    assert (reference["kind"], reference["step"], reference["path"]) == ("adapter", 2, "references/job-00002")
    assert reference["weights"].startswith("step-000002:")
    run_dir = ws / "runs" / status(ws)["run"]["id"]
    copy = run_dir / "references" / "job-00002" / "adapter_model.safetensors"
    assert max_abs_diff(adapter_weights(copy.parent), adapter_weights(run_dir / "checkpoints" / "step-000002")) == 0
    manifest = json.loads((run_dir / "checkpoints" / "step-000005" / "manifest.json").read_text())
    assert manifest["hyperparameters"]["method"] == "dpo" and manifest["hyperparameters"]["beta"] == 0.1
    assert manifest["hyperparameters"]["reference"] == {k: v for k, v in reference.items() if k != "name"}
    # The checkpoints hold the adapter that trains, never the reference beside it.
    assert not (run_dir / "checkpoints" / "step-000005" / "reference").exists()
    # Per step: DPO's loss starts at ln 2 (policy = reference), margins and accuracy only on preference steps.
    metrics = _db(ws, "SELECT step, loss, margin, accuracy FROM metrics ORDER BY step")
    assert [m[0] for m in metrics] == list(range(1, 9))
    assert math.isclose(metrics[2][1], math.log(2), abs_tol=1e-4)
    assert all(m[2] is not None and m[3] is not None for m in metrics[2:5])
    assert all(m[2] is None and m[3] is None for m in metrics[:2] + metrics[5:])
    assert metrics[4][2] > 0 and metrics[4][3] == 1.0  # the chosen answers pull ahead of the rejected ones


CHAOS = {"a.jsonl": 8, "b.jsonl": 12, "k.jsonl": 12}  # 2 + 3 + 3 = 8 steps: sft 1–2, dpo 3–5, kto 6–8


def _chaos_files(folder: Path) -> list[str]:
    return [str(text_file(folder / "a.jsonl", 8, "a")), str(pair_file(folder / "b.jsonl", 12)),
            str(feedback_file(folder / "k.jsonl", 12))]


def _final(ws: Path, step: int = 8) -> dict:
    return adapter_weights(ws / "runs" / status(ws)["run"]["id"] / "checkpoints" / f"step-{step:06d}")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_dir):
    root = tmp_path_factory.mktemp("preference-reference")
    ws = make_workspace(root / "ws", tiny_dir, **SETTINGS)
    assert run_cli(ws, "add", *_chaos_files(root / "data")).code == 0
    _drain(ws)
    return ws


def test_sigkill_mid_dpo_and_mid_kto_resumes_to_the_uninterrupted_weights(tmp_path, tiny_dir, uninterrupted):
    ws = make_workspace(tmp_path / "ws", tiny_dir, **SETTINGS)
    assert run_cli(ws, "add", *_chaos_files(tmp_path / "data")).code == 0
    references = {}
    # step 5: mid DPO (its checkpoint at step 4 is its step 2); step 7: mid KTO (checkpoint 6 is its step 1).
    for failpoint, job in (("step:5", 2), ("step:7", 3)):
        env = {**os.environ, "CONVEYOR_FAILPOINT": failpoint}
        p = subprocess.run([sys.executable, "-m", "conveyor", "-w", str(ws), "run", "--drain", "-q"],
                           capture_output=True, text=True, env=env, timeout=600)
        assert p.returncode == -signal.SIGKILL, (failpoint, p.stdout, p.stderr)
        references[job] = _db(ws, "SELECT reference FROM jobs WHERE id = ?", (job,))[0][0]
        assert references[job], f"job {job}'s reference is recorded before its first step"
    _drain(ws)
    s = status(ws)
    assert s["run"]["global_step"] == 8 and [j["state"] for j in s["jobs"]] == ["done"] * 3
    for job, n in ((1, 8), (2, 12), (3, 12)):
        _lines_once(ws, job, n)
    # The reference a resume loaded is the one recorded when the job started, unchanged.
    for job, recorded in references.items():
        assert _db(ws, "SELECT reference FROM jobs WHERE id = ?", (job,))[0][0] == recorded
    assert [r["method"] for r in ledger(ws) if r["outcome"] == "done"] == ["sft", "dpo", "kto"]
    # Law 3: the same weights as the run never killed, and the same references (content-equal adapter copies).
    assert max_abs_diff(_final(ws), _final(uninterrupted)) <= 1e-6
    for job in (2, 3):
        ours = json.loads(_db(ws, "SELECT reference FROM jobs WHERE id = ?", (job,))[0][0])
        theirs = json.loads(_db(uninterrupted, "SELECT reference FROM jobs WHERE id = ?", (job,))[0][0])
        assert ours["sha256"] == theirs["sha256"] and ours["step"] == theirs["step"]


@pytest.mark.slow
def test_a_damaged_reference_copy_stops_the_job_with_what_to_do_and_the_queue_goes_on(tmp_path, tiny_dir):
    ws = make_workspace(tmp_path / "ws", tiny_dir, **SETTINGS)
    files = [str(pair_file(tmp_path / "b.jsonl", 12)), str(text_file(tmp_path / "c.jsonl", 8, "c"))]
    assert run_cli(ws, "add", *files).code == 0
    env = {**os.environ, "CONVEYOR_FAILPOINT": "step:3"}  # mid job 1 (checkpoint at its step 2)
    p = subprocess.run([sys.executable, "-m", "conveyor", "-w", str(ws), "run", "--drain", "-q"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == -signal.SIGKILL, p.stdout + p.stderr
    copy = ws / "runs" / "run-0001" / "references" / "job-00001" / "adapter_model.safetensors"
    data = bytearray(copy.read_bytes())
    data[-8] ^= 0xFF
    copy.write_bytes(bytes(data))
    r = run_cli(ws, "run", "--drain", "-q")
    jobs = {j["id"]: j for j in status(ws)["jobs"]}
    assert jobs[1]["state"] == "failed", r.out + r.err
    assert "reference" in jobs[1]["error"] and "no longer matches its sha256" in jobs[1]["error"]
    assert "conveyor rollback" in jobs[1]["error"]
    assert jobs[2]["state"] == "done"  # nothing in one job's data ends the queue


FULL = {"training": {"batch_size": 2, "grad_accum": 2, "save_every": 2, "max_length": 48, "learning_rate": 1e-4,
                     "preference_learning_rate": 1e-4},
        "adapter": {"method": "full"}}


def _full_weights(ws: Path, step: int) -> dict:
    from safetensors.torch import load_file

    folder = ws / "runs" / status(ws)["run"]["id"] / "checkpoints" / f"step-{step:06d}"
    return load_file(str(folder / "model.safetensors"))


def test_full_fine_tune_reference_logps_are_cached_verified_and_a_changed_cache_is_rebuilt(tmp_path, tiny_dir):
    files = lambda folder: [str(text_file(folder / "a.jsonl", 8, "a")),  # noqa: E731
                            str(pair_file(folder / "b.jsonl", 12)), str(feedback_file(folder / "k.jsonl", 12))]
    straight = make_workspace(tmp_path / "straight", tiny_dir, **FULL)
    assert run_cli(straight, "add", *files(tmp_path / "d1")).code == 0
    _drain(straight)
    pairs, feedback = ledger(straight)[1]["reference"], ledger(straight)[2]["reference"]
    assert (pairs["kind"], pairs["step"], feedback["kind"], feedback["step"]) == ("logps", 2, "logps", 5)
    cache = straight / pairs["path"]
    assert sorted(p.name for p in cache.iterdir()) == ["logps.bin", "meta.json"]
    assert json.loads((cache / "meta.json").read_text())["shape"] == [12, 2]  # chosen and rejected per pair
    # Feedback: each answer's, then (one epoch) its KL row's, with the answer before it in the epoch's order.
    assert json.loads((straight / feedback["path"] / "meta.json").read_text())["shape"] == [12, 2]

    ws = make_workspace(tmp_path / "ws", tiny_dir, **FULL)
    assert run_cli(ws, "add", *files(tmp_path / "d2")).code == 0
    env = {**os.environ, "CONVEYOR_FAILPOINT": "step:5"}  # mid the DPO job: resumes from step 4, its step 2
    p = subprocess.run([sys.executable, "-m", "conveyor", "-w", str(ws), "run", "--drain", "-q"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == -signal.SIGKILL, p.stdout + p.stderr
    recorded = json.loads(_db(ws, "SELECT reference FROM jobs WHERE id = 2")[0][0])
    logps = ws / recorded["path"] / "logps.bin"
    values = bytearray(logps.read_bytes())
    values[:8] = (1.0).hex().encode()[:8]  # a changed value, same size
    logps.write_bytes(bytes(values))
    env = {**os.environ, "CONVEYOR_FAILPOINT": "step:7"}  # mid the KTO job: resumes from step 6, its step 1
    p = subprocess.run([sys.executable, "-m", "conveyor", "-w", str(ws), "run", "--drain", "-q"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == -signal.SIGKILL, p.stdout + p.stderr
    _drain(ws)
    warnings = [w for j in status(ws)["jobs"] for w in j["warnings"]]
    assert any("no longer matches its sha256" in w and "computed again from the reference's weights" in w
               for w in warnings), warnings
    # Rebuilt from the checkpoint at step 2 (the reference's weights), never used as it was: the same weights.
    assert max_abs_diff(_full_weights(ws, 5), _full_weights(straight, 5)) <= 1e-6
    assert json.loads(_db(ws, "SELECT reference FROM jobs WHERE id = 2")[0][0])["sha256"] == recorded["sha256"]
    assert max_abs_diff(_full_weights(ws, 8), _full_weights(straight, 8)) <= 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("method, first_loss", [("ipo", (0 - 1 / (2 * 0.2)) ** 2), ("orpo", None)])
def test_ipo_and_orpo_train_pairs_set_per_job(workspace, tmp_path, method, first_loss):
    ws = workspace(**SETTINGS)
    r = run_cli(ws, "add", str(pair_file(tmp_path / "b.jsonl", 8)), "--set", f"training.preference={method}",
                "--set", "training.beta=0.2")
    assert r.code == 0, r.out + r.err
    _drain(ws)
    row = ledger(ws)[0]
    assert (row["method"], row["start_step"], row["end_step"]) == (method, 1, 2)
    _lines_once(ws, 1, 8)
    manifest = json.loads((ws / "runs" / "run-0001" / "checkpoints" / "step-000002" / "manifest.json").read_text())
    assert (manifest["hyperparameters"]["method"], manifest["hyperparameters"]["beta"]) == (method, 0.2)
    if first_loss is not None:  # IPO: (0 - 1/(2β))² while the policy is the reference
        assert math.isclose(row["first_loss"], first_loss, rel_tol=1e-4)
    else:  # ORPO needs no reference: none is made or recorded
        assert "reference" not in row
        assert not (ws / "runs" / "run-0001" / "references").exists()


def test_held_out_pairs_are_scored_as_preference_accuracy_per_version(workspace, tmp_path):
    ws = workspace(**SETTINGS, eval={"holdout": 0.25})
    assert run_cli(ws, "add", str(pair_file(tmp_path / "b.jsonl", 16)), str(text_file(tmp_path / "c.jsonl", 8))
                   ).code == 0
    _drain(ws)
    rows = _db(ws, "SELECT step, name, preference FROM set_evals ORDER BY step, name")
    pairs = [(step, p) for step, name, p in rows if name == "job 1"]
    assert [step for step, _ in pairs] == [3, 5]  # at the end of each job (v1, v2)
    assert all(p is not None and 0.0 <= p <= 1.0 for _, p in pairs)
    assert all(p is None for _, name, p in rows if name != "job 1")  # a text set has no pairs to compare


# The losses, on numbers worked by hand ------------------------------------------------------------------------

def test_the_losses_are_trls_definitions():
    from conveyor.train import preference as pref

    policy = torch.tensor([-4.0, -6.0, -5.0, -5.0])  # chosen of 2 pairs, then rejected
    reference = torch.tensor([-5.0, -5.0, -5.0, -5.0])
    tokens = torch.tensor([2, 4, 5, 1])
    weights = torch.ones(2)
    dpo = pref.pair_step("dpo", 0.1, policy, tokens, reference, weights)
    assert torch.allclose(dpo.losses, -torch.nn.functional.logsigmoid(torch.tensor([0.1, -0.1])))
    assert torch.allclose(dpo.chosen - dpo.rejected, torch.tensor([0.1, -0.1]))
    ipo = pref.pair_step("ipo", 0.1, policy, tokens, reference, weights)  # log-ratios per answer token
    assert torch.allclose(ipo.losses, torch.tensor([(1 / 2 - 0 - 5) ** 2, (-1 / 4 - 0 - 5) ** 2]))
    orpo = pref.pair_step("orpo", 0.1, policy, tokens, None, weights)
    mean_c, mean_r = torch.tensor([-2.0, -1.5]), torch.tensor([-1.0, -5.0])
    log_odds = (mean_c - mean_r) - (torch.log1p(-mean_c.exp()) - torch.log1p(-mean_r.exp()))
    assert torch.allclose(orpo.losses, -mean_c - 0.1 * torch.nn.functional.logsigmoid(log_odds))
    # KTO: the KL estimate from the mismatched rows, clamped at 0 and without gradient; fillers (-1) weigh nothing.
    answers = torch.tensor([-3.0, -7.0, -1.0], requires_grad=True)
    kl_policy, kl_reference = torch.tensor([-6.0, -6.0, -9.0]), torch.tensor([-6.5, -6.5, -6.5])
    kto = pref.kto_step(0.1, 1.0, 2.0, torch.cat([answers, kl_policy]),
                        torch.cat([torch.tensor([-5.0, -5.0, -5.0]), kl_reference]), torch.tensor([1.0, 0.0, -1.0]))
    kl = 0.5  # the mean over the two real rows of (policy - reference): (0.5 + 0.5) / 2
    assert torch.allclose(kto.losses[:2], torch.tensor([1 - torch.sigmoid(torch.tensor(0.1 * (2 - kl))),
                                                        2 * (1 - torch.sigmoid(torch.tensor(0.1 * (kl + 2))))]))
    assert kto.weights.tolist() == [1.0, 1.0, 0.0]


def test_kto_pairs_each_prompt_with_the_answer_before_it_in_the_epochs_order():
    from conveyor.data.plan import JobOrder
    from conveyor.train.preference import kl_partner

    order = JobOrder(42, "f" * 64, 5, 2)
    for position in range(len(order)):
        epoch, offset = divmod(position, 5)
        before = epoch * 5 + (offset - 1) % 5
        assert kl_partner(order, position) == order[before][1]
    assert {kl_partner(order, p) for p in range(5)} == set(range(5))  # every answer serves once per epoch


@pytest.mark.slow
def test_a_job_keeps_the_method_it_began_with_when_the_setting_changes_meanwhile(tmp_path, tiny_dir, uninterrupted):
    from conftest import set_setting

    ws = make_workspace(tmp_path / "ws", tiny_dir, **SETTINGS)
    assert run_cli(ws, "add", *_chaos_files(tmp_path / "data")).code == 0
    env = {**os.environ, "CONVEYOR_FAILPOINT": "step:5"}  # mid the DPO job
    p = subprocess.run([sys.executable, "-m", "conveyor", "-w", str(ws), "run", "--drain", "-q"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == -signal.SIGKILL, p.stdout + p.stderr
    set_setting(ws, "training", "preference", '"ipo"')
    _drain(ws)
    job = next(j for j in status(ws)["jobs"] if j["id"] == 2)
    assert any("began as dpo: a job keeps its method" in w for w in job["warnings"]), job["warnings"]
    assert [r["method"] for r in ledger(ws) if r["job"] == 2] == ["dpo"]
    assert max_abs_diff(_final(ws), _final(uninterrupted)) <= 1e-6  # the KTO job after it is unaffected too


DISTRIBUTED = {"training": {"batch_size": 2, "grad_accum": 2, "save_every": 2, "max_length": 48,
                            "preference_learning_rate": 5e-5},
               "adapter": {"dropout": 0.1}, "distributed": {"nproc_per_node": 2},
               "daemon": {"retry_backoff_seconds": 0.2, "min_free_mb": 0}}


@pytest.mark.slow
def test_two_processes_train_pairs_exactly_across_a_kill_and_a_change_of_world_size(workspace, tmp_path):
    from conftest import drain_with_requests, set_setting

    files = [str(pair_file(tmp_path / "b.jsonl", 26)), str(text_file(tmp_path / "c.jsonl", 8, "c"))]
    # 26 pairs / (2 × 2 × 2) → 4 steps, the last with 2 pairs and fillers that weigh nothing.
    straight = workspace("straight", **DISTRIBUTED)
    r = run_cli(straight, "train", *files, "-q", subprocess_=True)
    assert r.code == 0, r.out + r.err
    rows = audit(straight)
    assert [len(row["lines"]) for row in rows if row["job"] == 1] == [8, 8, 8, 2]
    _lines_once(straight, 1, 26)
    # Margins and accuracy over both ranks' pairs: the last step's 2 pairs give an accuracy of 0, 0.5 or 1.
    metrics = _db(straight, "SELECT margin, accuracy FROM metrics WHERE job_id = 1 ORDER BY step")
    assert len(metrics) == 4 and all(m is not None and a is not None for m, a in metrics)
    assert metrics[3][1] in (0.0, 0.5, 1.0)

    killed = workspace("killed", **DISTRIBUTED)
    marker = tmp_path / "fired"
    r = run_cli(killed, "train", *files, "-q", subprocess_=True, env={"CONVEYOR_FAILPOINT": f"step:3:{marker}"})
    assert r.code == 0 and marker.exists(), r.out + r.err
    assert "job 1 resumes at global step 3" in r.out + r.err
    assert audit(killed) == rows
    final = lambda ws: adapter_weights(ws / "runs" / "run-0001" / "checkpoints" / "step-000005")  # noqa: E731
    assert max_abs_diff(final(killed), final(straight)) <= 1e-6

    # Stopped at 2 processes after step 2, resumed at 1: the rest of the pairs, each once (law 2).
    resized = workspace("resized", **DISTRIBUTED)
    assert run_cli(resized, "add", *files).code == 0
    r = drain_with_requests(resized, "stop@2")
    assert r.code == 75, r.out + r.err  # stopped as asked
    assert [len(row["lines"]) for row in audit(resized)] == [8, 8]
    set_setting(resized, "distributed", "nproc_per_node", "1")
    _drain(resized)
    assert [j["state"] for j in status(resized)["jobs"]] == ["done", "done"]
    _lines_once(resized, 1, 26)
    _lines_once(resized, 2, 8)
    assert [len(row["lines"]) for row in audit(resized) if row["job"] == 1] == [8, 8, 4, 4, 2]  # 4 a step at 1


@pytest.mark.slow
@pytest.mark.parametrize("settings", [{"model": {"quantization": "nf4"}},
                                      {"training": {"gradient_checkpointing": True}},
                                      {"training": {"mixed_precision": "bf16"}}], ids=["nf4", "checkpointing", "bf16"])
def test_pairs_train_on_4_bit_layers_with_checkpointing_and_under_bf16_autocast(workspace, tmp_path, settings):
    """The GPU paths, on CPU: QLoRA (the reference adapter applied per row over 4-bit layers), gradient
    checkpointing (the reference's forward runs without gradients), bf16 autocast (log-probabilities in fp32)."""
    ws = workspace(**{**SETTINGS, **settings, "training": {**SETTINGS["training"], **settings.get("training", {})}})
    assert run_cli(ws, "add", str(pair_file(tmp_path / "b.jsonl", 12))).code == 0
    _drain(ws)
    metrics = _db(ws, "SELECT loss, margin, accuracy FROM metrics ORDER BY step")
    assert len(metrics) == 3 and math.isclose(metrics[0][0], math.log(2), abs_tol=2e-3)
    assert metrics[-1][1] > 0


@pytest.mark.slow
def test_preference_jobs_train_at_their_own_learning_rate_unless_the_job_sets_one(workspace, tmp_path):
    ws = workspace(training={**SETTINGS["training"], "preference_learning_rate": 1e-6})
    files = [str(text_file(tmp_path / "a.jsonl", 8)), str(pair_file(tmp_path / "b.jsonl", 8)),
             str(pair_file(tmp_path / "c.jsonl", 8, "r"))]
    assert run_cli(ws, "add", *files[:2]).code == 0
    assert run_cli(ws, "add", files[2], "--set", "training.learning_rate=3e-4").code == 0
    r = run_cli(ws, "run", "--drain", "-q")
    assert r.code == 0, r.out + r.err
    assert "job 2 is a preference file: it trains at training.preference_learning_rate = 1e-06" in r.out
    assert "settings changed since" not in r.out + r.err  # a job's own learning rate is no change of settings
    assert "job 2 (DPO against the model at global step 2): last step's reward margin" in r.out
    rates = dict(_db(ws, "SELECT job_id, MAX(learning_rate) FROM metrics GROUP BY job_id"))
    assert rates == pytest.approx({1: 1e-3, 2: 1e-6, 3: 3e-4})


@pytest.mark.slow
def test_a_reference_lost_from_the_database_is_read_from_the_jobs_checkpoint(tmp_path, tiny_dir, uninterrupted):
    """A database rebuilt by `doctor --repair` knows no reference; the checkpoint's manifest still records it."""
    ws = make_workspace(tmp_path / "ws", tiny_dir, **SETTINGS)
    assert run_cli(ws, "add", *_chaos_files(tmp_path / "data")).code == 0
    env = {**os.environ, "CONVEYOR_FAILPOINT": "step:5"}  # mid the DPO job, which resumes from its checkpoint 4
    p = subprocess.run([sys.executable, "-m", "conveyor", "-w", str(ws), "run", "--drain", "-q"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == -signal.SIGKILL, p.stdout + p.stderr
    recorded = _db(ws, "SELECT reference FROM jobs WHERE id = 2")[0][0]
    con = sqlite3.connect(ws / "conveyor.db")
    with con:
        con.execute("UPDATE jobs SET reference = NULL WHERE id = 2")
    con.close()
    _drain(ws)
    assert json.loads(_db(ws, "SELECT reference FROM jobs WHERE id = 2")[0][0] or "null") in (None,
                                                                                          json.loads(recorded))
    assert max_abs_diff(_final(ws), _final(uninterrupted)) <= 1e-6


@pytest.mark.slow
def test_a_preference_job_overtaken_by_a_higher_priority_file_resumes_against_its_own_reference(workspace, tmp_path):
    from conftest import drain_with_requests

    ws = workspace(**SETTINGS)
    assert run_cli(ws, "add", str(pair_file(tmp_path / "b.jsonl", 16))).code == 0
    assert drain_with_requests(ws, "stop@2").code == 75  # 2 of its 4 steps
    assert run_cli(ws, "add", str(text_file(tmp_path / "a.jsonl", 8, "a")), "--priority", "high").code == 0
    _drain(ws)
    rows = ledger(ws)
    assert [(r["job"], r["start_step"], r["end_step"], r["method"], r["outcome"]) for r in rows] == \
        [(1, 1, 2, "dpo", "interrupted"), (2, 3, 4, "sft", "done"), (1, 5, 6, "dpo", "done")]
    _lines_once(ws, 1, 16)
    # Both segments compare with the model as the job first found it (the base, step 0), not the one at step 4.
    assert rows[0]["reference"]["step"] == rows[2]["reference"]["step"] == 0
    assert rows[0]["reference"]["sha256"] == rows[2]["reference"]["sha256"]


@pytest.mark.slow
def test_two_processes_full_fine_tune_reads_the_cached_reference_with_fillers_in_the_last_step(workspace, tmp_path):
    settings = {**DISTRIBUTED, "adapter": {"method": "full"},
                "training": {**DISTRIBUTED["training"], "preference_learning_rate": 1e-4}}
    ws = workspace(**settings)
    files = [str(pair_file(tmp_path / "b.jsonl", 26)), str(feedback_file(tmp_path / "k.jsonl", 26))]
    r = run_cli(ws, "train", *files, "-q", subprocess_=True)
    assert r.code == 0, r.out + r.err
    # 26 / 8 → 4 steps each; the last step's 2 examples leave one rank a micro-batch of fillers only.
    assert [len(row["lines"]) for row in audit(ws)] == [8, 8, 8, 2] * 2
    _lines_once(ws, 1, 26)
    _lines_once(ws, 2, 26)
    assert [(r["method"], r["reference"]["kind"]) for r in ledger(ws)] == [("dpo", "logps"), ("kto", "logps")]


@pytest.mark.slow
def test_doctor_checks_each_preference_jobs_reference_against_its_record(workspace, tmp_path):
    ws = workspace(**SETTINGS)
    assert run_cli(ws, "add", str(pair_file(tmp_path / "b.jsonl", 8))).code == 0
    _drain(ws)
    r = run_cli(ws, "doctor")
    assert r.code == 0 and "1 preference job reference(s) match the sha256 recorded" in r.out, r.out + r.err
    copy = ws / "runs" / "run-0001" / "references" / "job-00001" / "adapter_model.safetensors"
    data = bytearray(copy.read_bytes())
    data[-1] ^= 0xFF  # the last byte of a weight (of the step-0 adapter: a zero of a B matrix)
    copy.write_bytes(bytes(data))
    r = run_cli(ws, "doctor")
    assert "job 1 (b.jsonl, done): its reference runs/run-0001/references/job-00001/adapter_model.safetensors " \
           "no longer matches the sha256 recorded" in r.out, r.out + r.err


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_kill_after_the_reference_is_kept_but_before_it_is_recorded_makes_it_again(tmp_path, tiny_dir, method):
    """The copy (or cache) is written, then recorded on the job: a SIGKILL between leaves the job unstarted; the next
    start writes the same reference again and records it."""
    settings = FULL if method == "full" else SETTINGS
    files = lambda folder: [str(pair_file(folder / "b.jsonl", 8))]  # noqa: E731
    straight = make_workspace(tmp_path / "straight", tiny_dir, **settings)
    assert run_cli(straight, "add", *files(tmp_path / "d1")).code == 0
    _drain(straight)
    ws = make_workspace(tmp_path / "ws", tiny_dir, **settings)
    assert run_cli(ws, "add", *files(tmp_path / "d2")).code == 0
    env = {**os.environ, "CONVEYOR_FAILPOINT": "reference-kept:0"}
    p = subprocess.run([sys.executable, "-m", "conveyor", "-w", str(ws), "run", "--drain", "-q"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == -signal.SIGKILL, p.stdout + p.stderr
    assert _db(ws, "SELECT reference, steps_done FROM jobs WHERE id = 1")[0] == (None, 0)
    _drain(ws)
    ours, theirs = ledger(ws)[0]["reference"], ledger(straight)[0]["reference"]
    assert (ours["kind"], ours["step"], ours["sha256"]) == (theirs["kind"], theirs["step"], theirs["sha256"])
    _lines_once(ws, 1, 8)
