"""Resume cost vs position: seconds from the start of a resuming process to its first NEW optimizer step.

A `text` JSONL file of --examples short lines (tiny model, LoRA, batch 8, grad_accum 1, max_length 64) is resumed
at 1%, 50% and 99% of its steps by conveyor (`conveyor run --drain -q` on a crashed job) and by a plain HF
Trainer + PEFT script (`train(resume_from_checkpoint=...)`, sequential sampling; it fast-forwards its dataloader
past the trained batches). Each resume is a fresh child process, timed from the top of this file (after its
stdlib imports; interpreter start-up is alike for both) to the first new step's `on_step_end`. Split out: the
torch/transformers/peft imports, parse + tokenize of the whole file (O(file), not O(position)), and the rest
(model load, reconcile or dataloader skip, setup, the step). The child's CPU seconds are given too: unlike wall
seconds, they barely move when other processes share the machine.
Training to 99% would take hours on a CPU, so each side trains one real step and relabels its checkpoint (files
unchanged; a LoRA checkpoint's size does not depend on its step): conveyor's manifest and audit/metric/job/run
rows become what a kill right after step k+1 leaves; HF's trainer_state.json gets global_step = k.

    python benchmarks/resume.py [--examples N] [--repeats R] [--threads T]
"""

import argparse
import json
import os
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

T0 = time.perf_counter()  # a child's clock
os.environ["HF_HUB_OFFLINE"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parent))  # for hf_baseline, a sibling script
BATCH, MAX_LENGTH, POSITIONS = 8, 64, (0.01, 0.50, 0.99)
WORDS = "the a model file step token queue batch run ledger audit learns trains reads writes every one".split()


def write_data(path: Path, n: int) -> None:
    rng = random.Random(0)  # seeded: every run trains the same bytes
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"text": f"example {i}: " + " ".join(rng.choices(WORDS, k=rng.randint(3, 6)))}) + "\n")


# Child side: one resume, timed ---------------------------------------------------------------------------
def _done(args, step: int, marks: dict) -> None:
    """The first new step has trained: record and leave at once (nothing after it is part of the measure)."""
    Path(args.out).write_text(json.dumps({"step": step, "seconds": time.perf_counter() - T0,
                                          "cpu": time.process_time(), **marks}))
    os._exit(0)


def time_into(marks: dict, owner, name: str) -> None:
    """Wrap owner.name so its duration lands in marks["tokenize"] (parse + tokenize of the whole file)."""
    fn = getattr(owner, name)

    def timed(*a, **kw):
        start = time.perf_counter()
        result = fn(*a, **kw)
        marks["tokenize"] = time.perf_counter() - start
        return result

    setattr(owner, name, timed)


def child_conveyor(args, marks: dict) -> None:
    from conveyor import cli
    from conveyor.train import trainer
    from conveyor.train.worker import Worker

    time_into(marks, Worker, "prepare")
    trainer._JobCallback.on_step_end = lambda self, *a, **kw: _done(args, self.pos.last_step + 1, marks)
    sys.argv = ["conveyor", "-w", args.target, "run", "--drain", "-q"]  # exactly what a restart runs
    cli.main()


def hf_trainer(tiny: str, data: str, out_dir: Path, max_steps: int, save: bool, marks: dict, callbacks=()):
    import hf_baseline
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        PrinterCallback,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    tokenizer = AutoTokenizer.from_pretrained(tiny)
    time_into(marks, hf_baseline, "tokenize_text_file")
    rows = hf_baseline.tokenize_text_file(Path(data), tokenizer, MAX_LENGTH)
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    model.config.use_cache = False
    set_seed(42)  # conveyor's defaults: seed 42, LoRA r 8 / alpha 16 on q_proj and v_proj, constant LR 2e-4
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16.0, target_modules=["q_proj", "v_proj"],
                                             task_type="CAUSAL_LM"))
    args = TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=BATCH, max_steps=max_steps, learning_rate=2e-4,
        lr_scheduler_type="constant", train_sampling_strategy="sequential", logging_steps=1, report_to="none",
        save_strategy="steps" if save else "no", save_steps=1, seed=42, disable_tqdm=True, dataloader_pin_memory=False)
    trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=list(callbacks),
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
    trainer.remove_callback(PrinterCallback)
    return trainer


def child_hf(args, marks: dict) -> None:
    from transformers import TrainerCallback

    class FirstStep(TrainerCallback):
        def on_step_end(self, _args, state, control, **kw):
            _done(args, state.global_step, marks)

    target = Path(args.target)
    trainer = hf_trainer(args.tiny, args.data, target.parent / "out", args.planned, False, marks, [FirstStep()])
    trainer.train(resume_from_checkpoint=str(target))


def child(args) -> None:
    import peft  # noqa: F401  (both sides need all three; imported first, their cost is comparable)
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    transformers.utils.logging.set_verbosity_error()
    marks = {"imports": time.perf_counter() - T0}
    (child_conveyor if args.child == "conveyor" else child_hf)(args, marks)
    raise SystemExit("training ended without a new step")


# Parent side: a real short prefix, relabelled checkpoints, timed resumes -------------------------------
def conveyor_prefix(root: Path, tiny: Path, data: Path) -> Path:
    """A workspace whose job really was killed right after step 2, with step 1's checkpoint on disk."""
    from conveyor.config import Config
    from conveyor.queue.inbox import enqueue
    from conveyor.store.workspace import Workspace

    config = Config()
    config.training.batch_size, config.training.grad_accum, config.training.max_length = BATCH, 1, MAX_LENGTH
    config.training.save_every = 1
    ws = Workspace.create(root, config)
    shutil.copytree(tiny, ws.models / "tiny")
    enqueue(ws, data, epochs=1)
    cmd = [sys.executable, "-m", "conveyor", "-w", str(root), "run", "--drain", "-q"]
    rc = subprocess.run(cmd, env={**os.environ, "CONVEYOR_FAILPOINT": "step:2"}, capture_output=True).returncode
    assert rc == -9, f"the prefix run should have been killed at step 2 (exit {rc})"
    return root


def copy_workspace(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    con = sqlite3.connect(dst / "conveyor.db")  # jobs.stored is absolute: point the copy at its own data
    con.execute("UPDATE jobs SET stored = replace(stored, ?, ?)", (str(src), str(dst)))
    con.commit()
    con.close()
    return dst


def conveyor_crash_at(root: Path, k: int) -> None:
    """Step 1's checkpoint becomes step k's, and the database what a kill right after step k+1 leaves."""
    from conveyor.data.plan import JobOrder
    from conveyor.store import checkpoints as ck
    from conveyor.store import jobs, ledger, runs
    from conveyor.store import manifest as mf
    from conveyor.store.workspace import Workspace

    ws = Workspace.open(root)
    job, run = jobs.all_jobs(ws.db)[0], runs.active(ws.db)
    folder = ck.checkpoints_dir(ws.run_dir(run.id))
    os.rename(folder / ck.folder_name(1), folder / ck.folder_name(k))
    path = folder / ck.folder_name(k) / mf.MANIFEST  # not in its own "files": the other hashes stay valid
    content = json.loads(path.read_text())
    content[mf.K_STEP] = job.start_step + k - 1
    content[mf.K_JOB].update({"steps_done": k, "position": k * BATCH, "epoch": 0, "position_in_epoch": k * BATCH})
    path.write_text(json.dumps(content, indent=2, sort_keys=True))
    (folder / mf.LATEST).write_text(ck.folder_name(k) + "\n")
    # Flushed at step k's checkpoint: audit rows to k, metrics to k-1 (placeholder values; resume never reads them).
    order = JobOrder(ws.config().training.seed, job.fingerprint, job.examples, 1)
    audit = [(job.start_step + s - 1, job.id, [order[p][1] + 1 for p in range((s - 1) * BATCH, s * BATCH)])
             for s in range(2, k + 1)]  # lines are 1-based; the file has no blank or excluded lines
    metrics = [{"step": job.start_step + s - 1, "job_id": job.id, "loss": 1.0, "learning_rate": 2e-4,
                "grad_norm": 1.0, "tokens": 0, "examples": BATCH, "step_time": 0.0} for s in range(1, k)]
    ledger.write_steps(ws.db, run.id, audit, metrics)
    jobs.update(ws.db, job.id, steps_done=k)
    runs.set_step(ws.db, run.id, job.start_step + k - 1)
    ws.db.close()


def hf_crash_at(first: Path, k: int, planned: int) -> Path:
    target = first.parent.parent / f"at-{k}" / f"checkpoint-{k}"
    shutil.copytree(first, target)
    state = json.loads((target / "trainer_state.json").read_text())
    state.update(global_step=k, max_steps=planned, epoch=k / planned)
    (target / "trainer_state.json").write_text(json.dumps(state, indent=2))
    return target


def measure(side: str, target: Path, k: int, args, tiny: Path, data: Path, planned: int) -> dict:
    out = target.parent / f"{side}-{target.name}-result.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--child", side, "--target", str(target), "--out", str(out), "--tiny", str(tiny),
           "--data", str(data), "--planned", str(planned), "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not out.exists():
        raise SystemExit(f"{side} child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(out.read_text())
    assert result["step"] == k + 1, f"{side} resumed at step {result['step']}, expected {k + 1}"
    return result


def report(results: dict, steps: dict, args, planned: int) -> None:
    from rich.console import Console
    from rich.table import Table

    for r in (r for rows in results.values() for r in rows):  # model load, reconcile/skip, setup, the step
        r["rest"] = r["seconds"] - r["tokenize"] - r["imports"]
    med = lambda side, p, key="seconds": statistics.median(r[key] for r in results[side, p])  # noqa: E731
    table = Table(title="process start → first new optimizer step (s)", caption=f"{args.examples} examples, "
                  f"{planned} steps, batch {BATCH}, median of {args.repeats}, {args.threads} torch thread(s), "
                  f"load avg {os.getloadavg()[0]:.2f}")
    keys = ("seconds", "tokenize", "imports", "rest")
    for col in ("resume at", "conveyor", "tokenize", "imports", "rest", "plain HF", "tokenize", "imports", "rest"):
        table.add_column(col, justify="right")
    for p in POSITIONS:
        table.add_row(f"{p:.0%} (step {steps[p] + 1})",
                      *(f"{med(side, p, key):.2f}" for side in ("conveyor", "hf") for key in keys))
    console = Console(width=120)
    console.print(table)
    ratio = lambda side, key="seconds": med(side, POSITIONS[-1], key) / med(side, POSITIONS[0], key)  # noqa: E731
    # CPU seconds of the child are far less disturbed by other busy processes than wall seconds.
    console.print(f"99%/1% wall: conveyor {ratio('conveyor'):.3f}, plain HF {ratio('hf'):.3f}; "
                  f"CPU: conveyor {ratio('conveyor', 'cpu'):.3f}, plain HF {ratio('hf', 'cpu'):.3f}")
    console.print(f"target (conveyor 99% within 1.2x of 1%, wall): {'met' if ratio('conveyor') <= 1.2 else 'MISSED'}")
    for side, p in sorted(results):
        console.print(f"  {side} {p:.0%} each repeat, wall (CPU): "
                      + ", ".join(f"{r['seconds']:.2f} ({r['cpu']:.2f})" for r in results[side, p]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per child (1: steadier timings)")
    for hidden in ("--child", "--target", "--out", "--tiny", "--data", "--planned"):  # parent → child only
        parser.add_argument(hidden, type=int if hidden == "--planned" else str, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    from conveyor.data.models import quiet_libraries
    from conveyor.data.tiny import ensure_tiny

    quiet_libraries()
    with tempfile.TemporaryDirectory(prefix="conveyor-resume-") as tmp:
        tmp = Path(tmp).resolve()
        tiny, data = ensure_tiny(tmp / "tiny"), tmp / "data.jsonl"
        write_data(data, args.examples)
        planned = -(-args.examples // BATCH)
        steps = {p: max(1, round(p * planned)) for p in POSITIONS}
        prefix = conveyor_prefix(tmp / "conveyor-prefix", tiny, data)
        hf_trainer(str(tiny), str(data), tmp / "hf" / "first", 1, True, {}).train()
        results: dict = {}
        for r in range(args.repeats):
            # Positions and sides interleaved, first position rotated: drift in machine load hits all alike.
            for p, k in list(steps.items())[r % 3:] + list(steps.items())[:r % 3]:
                ws = copy_workspace(prefix, tmp / f"ws-{r}-{k}")
                conveyor_crash_at(ws, k)
                results.setdefault(("conveyor", p), []).append(measure("conveyor", ws, k, args, tiny, data, planned))
                shutil.rmtree(ws)
                hf = hf_crash_at(tmp / "hf" / "first" / "checkpoint-1", k, planned)
                results.setdefault(("hf", p), []).append(measure("hf", hf, k, args, tiny, data, planned))
                shutil.rmtree(hf.parent)
        report(results, steps, args, planned)


if __name__ == "__main__":
    main()
