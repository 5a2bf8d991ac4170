"""`conveyor generate` and `conveyor chat`: ask the current model (or a version), in this process, apart from
training.

The model is rebuilt as export does (the run's identity and the checkpoint's files, not conveyor.toml), once per
command and without the training stack: a plain LoRA adapter is folded into the base weights as they load (no
peft import, and a token costs what the base model's does). A run that trained chat files is asked through its chat
template (after a system prompt, when one is given; in `chat` with every earlier turn), any other with the prompt as
plain text, each line alone. An answer ends at the template's end-of-turn token or the end of text. Greedy by
default, so the same version answers the same prompt the same way; sampling (temperature, top-p) draws from a
seeded generator per answer, so the same seed gives the same answer.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data.chat import ChatError, as_rendered, load_tokenizer, stop_ids
from ..data.models import quiet_libraries
from ..errors import ConveyorError
from ..store import checkpoints as ck
from ..store import runs
from ..store.versions import at_step, checkpoint, name
from ..store.workspace import Workspace
from .export import ADAPTER_CONFIG, _base_model, _load, load_trained


@dataclass(frozen=True)
class Sampling:
    """How each next token is chosen: greedy (temperature 0), or drawn at `temperature` from the smallest set of
    tokens whose probabilities add up to `top_p`, by a generator seeded with `seed` for each answer."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if not self.temperature >= 0:  # also refuses NaN
            raise ConveyorError(f"--temperature {self.temperature}: must be 0 (greedy) or more, e.g. 0.7")
        if not 0 < self.top_p <= 1:
            raise ConveyorError(f"--top-p {self.top_p}: must be above 0 and at most 1, e.g. 0.9 (1: no cut)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def seeded(self) -> "Sampling":
        """This sampling with a seed: a random one when sampling without one (shown, so it can be repeated)."""
        if self.greedy or self.seed is not None:
            return self
        return Sampling(self.temperature, self.top_p, secrets.randbelow(2 ** 31))

    def unused(self) -> str | None:
        """What was given but does nothing: top-p and a seed only matter when sampling."""
        given = [f"--top-p {self.top_p:g}"] * (self.top_p != 1) + [f"--seed {self.seed}"] * (self.seed is not None)
        if not self.greedy or not given:
            return None
        return (f"{' and '.join(given)} ignored: greedy decoding (--temperature 0) draws nothing; give --temperature "
                "above 0 to sample")

    def to_json(self) -> dict:
        return {"temperature": self.temperature, "top_p": self.top_p, "seed": self.seed}


GREEDY = Sampling()


@dataclass
class Loaded:
    """A checkpoint rebuilt to answer: which run, step and version it is, and whether its run was trained on chats."""

    run: runs.Run
    checkpoint: ck.Checkpoint
    version: str | None  # None: the newest checkpoint is not at a job's end
    chat: bool
    tokenizer: Any
    model: Any
    context: int | None  # positions the model can attend to, when its config says
    threads: int | None = None  # torch threads while answering (None: torch's own count)

    def about(self) -> dict:
        return {"version": self.version, "run": self.run.id, "step": self.checkpoint.step, "chat": self.chat}

    @property
    def asks_chat(self) -> bool:
        """Whether prompts go through the chat template: the run trained chats and the tokenizer has a template."""
        return self.chat and bool(self.tokenizer.chat_template)

    def complete(self, ids: list[int], max_new_tokens: int, sampling: Sampling = GREEDY) -> str:
        """The continuation of `ids` up to an end token, decoded without special tokens."""
        import torch

        options = {"do_sample": False} if sampling.greedy else \
            {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0}
        device = self.model.device
        with torch.no_grad(), torch_threads(self.threads), \
                torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            if not sampling.greedy:
                torch.manual_seed(sampling.seed if sampling.seed is not None else secrets.randbelow(2 ** 31))
            out = self.model.generate(input_ids=torch.tensor([ids], device=device), max_new_tokens=max_new_tokens,
                                      attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
                                      pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self._ends(), **options)
        return self.tokenizer.decode(out[0][len(ids):], skip_special_tokens=True)

    def _ends(self) -> list[int]:
        return stop_ids(self.tokenizer, self.model.generation_config.eos_token_id, self.chat)


def load(ws: Workspace, version: str | None, chat: bool | None = None) -> Loaded:
    """The version's checkpoint, or the active run's newest verified one, with its tokenizer. `chat`: ask through
    the chat template (True) or the prompt alone (False); None: as the checkpoint was trained (asked_as)."""
    run, checkpoint, name = _checkpoint(ws, version)  # a refusal comes before torch and transformers are imported

    quiet_libraries()
    model_path = _base_model(ws, run, "the base weights and the tokenizer")
    tokenizer = load_tokenizer(model_path, _chat_template(ws), ws.root)
    chat = asked_as(ws.db, run.id, checkpoint.step, bool(tokenizer.chat_template)) if chat is None else chat
    model = rebuild(run.identity, model_path, checkpoint.path).eval()
    context = getattr(model.config, "max_position_embeddings", None)
    return Loaded(run, checkpoint, name, chat, tokenizer, model, context, _threads(model))


def asked_as(con, run_id: str, step: int, has_template: bool) -> bool:
    """Whether a checkpoint is asked through the chat template: the formats trained along its lineage up to its step
    (a rollback's run inherits its parent's up to the version it branched from) decide; chats trained: yes; only
    text or prompt/completion: no (the prompt alone, as trained); nothing yet: as the base model, an instruct model
    through its template."""
    formats = set()
    for lineage_run, bound in runs.ancestry(con, run_id):
        last = step if bound is None else min(step, bound)
        formats |= {r["format"] for r in con.execute(
            "SELECT DISTINCT format FROM jobs WHERE run_id = ? AND start_step IS NOT NULL AND start_step <= ?",
            (lineage_run, last))}
    if "messages" in formats:
        return True
    return has_template if not formats else False


# Below this many parameters a model answers on one CPU thread: a token's matrix-vector products are too small to
# share among threads, which cost more to keep in step than they save, and many times more on a busy machine, where
# they wait on each other (`small`, 26M: 64 tokens in 1.3 s on one thread, 14 s on two, with 2 cores loaded 4x).
ONE_THREAD_BELOW = 100_000_000


def _threads(model) -> int | None:
    """One thread for a small model on a CPU, unless OMP_NUM_THREADS chose a count; else torch's own."""
    if "OMP_NUM_THREADS" in os.environ or model.device.type != "cpu":
        return None
    return 1 if sum(p.numel() for p in model.parameters()) < ONE_THREAD_BELOW else None


@contextmanager
def torch_threads(count: int | None):
    """Torch on `count` CPU threads meanwhile (None: as it is), then as before."""
    import torch

    before = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def generate(ws: Workspace, prompt: str, version: str | None, max_new_tokens: int, sampling: Sampling = GREEDY,
             system: str | None = None, chat: bool | None = None) -> dict:
    """One prompt answered: the run, step and version that answered, the prompt as the model saw it, the answer."""
    return answer_all(load(ws, version, chat), [prompt], max_new_tokens, sampling, system)[0]


def answer_all(loaded: Loaded, prompts: list[str], max_new_tokens: int, sampling: Sampling = GREEDY,
               system: str | None = None) -> list[dict]:
    """Each prompt answered alone by one loaded model, as `generate` answers it (each from the same seed)."""
    used = system if loaded.asks_chat else None
    sampling = sampling.seeded()
    out = []
    for prompt in prompts:
        ids = conversation_ids(loaded.tokenizer, [], prompt, loaded.chat, used)
        out.append({**loaded.about(), "prompt": prompt, "system": used, "sampling": sampling.to_json(),
                    "rendered": loaded.tokenizer.decode(ids), "output": loaded.complete(ids, max_new_tokens, sampling)})
    return out


def notes(loaded: Loaded, asked: Sampling, used: Sampling, system: str | None) -> list[str]:
    """What to tell a person beside the answers: options that do nothing here, and the seed a draw used."""
    said = [asked.unused()]
    if used.seed != asked.seed:
        said.append(f"sampled with --seed {used.seed} (give it to get these answers again)")
    if system is not None and not loaded.asks_chat:  # a plain-text run is asked the prompt alone, as it was trained
        said.append(f"--system ignored: {loaded.run.id} was trained on plain text, not chats, so each prompt is asked "
                    "as it is, without a chat template; put the instruction into the prompt instead")
    return [text for text in said if text]


def conversation_ids(tokenizer, turns: list[dict], prompt: str, chat: bool, system: str | None = None) -> list[int]:
    """What the model is asked next: the system prompt, the earlier turns and the prompt through the chat template,
    or (a plain-text run) the prompt alone exactly as `generate` asks it."""
    from ..train.evaluation import prompt_ids  # torch: once a model is loaded

    if not (chat and tokenizer.chat_template):
        return prompt_ids(tokenizer, prompt, False)
    if not turns and not system:
        return prompt_ids(tokenizer, prompt, True)
    messages = [{"role": "system", "content": system}] * bool(system) + turns + [{"role": "user", "content": prompt}]
    try:
        messages = as_rendered(tokenizer, messages)  # merged into the first user turn where there is no system role
    except ChatError as e:
        raise ConveyorError(f"--system: {e}") from None
    return tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)


def read_prompts(path: Path) -> list[str]:
    """--prompts FILE: JSONL with a "prompt" on each line when FILE ends in .jsonl, else one prompt a line; blank
    lines are skipped. Every bad line is named (the first five and a count)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConveyorError(f"--prompts {path}: cannot read it ({e}); give a UTF-8 text file, one prompt a line, "
                            "or a .jsonl file with a \"prompt\" on each line") from None
    lines = [(n, line.rstrip("\r")) for n, line in enumerate(text.split("\n"), 1) if line.strip()]
    if not Path(path).name.endswith(".jsonl"):
        prompts, bad = [line for _, line in lines], []
    else:
        prompts, bad = [], []
        for n, line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                bad.append(f"line {n}: not JSON ({e.msg})")
                continue
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                bad.append(f"line {n}: no \"prompt\" text")
            else:
                prompts.append(record["prompt"])
    if bad:
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise ConveyorError(f"--prompts {path}: {len(bad)} bad line(s): {'; '.join(bad[:5])}{more}; each line of a "
                            ".jsonl file is an object such as {\"prompt\": \"What does the owl do?\"}")
    if not prompts:
        raise ConveyorError(f"--prompts {path}: no prompts in it; write one prompt a line")
    return prompts


class Conversation:
    """A talk with one loaded model. A run trained on chats sees the system prompt and every earlier turn (the oldest
    exchanges are dropped when they would outgrow the model's context); any other run answers each prompt alone,
    as it was trained."""

    def __init__(self, loaded: Loaded, max_new_tokens: int, sampling: Sampling = GREEDY, system: str | None = None):
        self.loaded, self.max_new_tokens, self.sampling = loaded, max_new_tokens, sampling
        self.keeps_history = loaded.asks_chat
        self.system = system if self.keeps_history else None
        self.turns: list[dict] = []  # user and assistant messages, oldest first

    def ask(self, prompt: str) -> tuple[str, int]:
        """The answer, and how many earlier exchanges were dropped to make room for it."""
        dropped = 0
        ids = self._ids(prompt)
        while self.turns and self.loaded.context and len(ids) + self.max_new_tokens > self.loaded.context:
            self.turns, dropped = self.turns[2:], dropped + 1
            ids = self._ids(prompt)
        answer = self.loaded.complete(ids, self.max_new_tokens, self.sampling)
        if self.keeps_history:
            self.turns += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        return answer, dropped

    def _ids(self, prompt: str) -> list[int]:
        return conversation_ids(self.loaded.tokenizer, self.turns, prompt, self.loaded.chat, self.system)

    def reset(self) -> None:
        self.turns = []  # the system prompt stays


def header(loaded: Loaded, keeps_history: bool, sampling: Sampling = GREEDY, system: str | None = None) -> str:
    """Who answers in `conveyor chat`, and how."""
    who = loaded.version or "the newest checkpoint (mid-job: not a version)"
    how = "chat template, the conversation is kept (/reset starts over)" if keeps_history else \
        "plain text, each line is answered alone"
    if system and keeps_history:
        how += ", after the system prompt"
    if not sampling.greedy:
        how += f"; sampled at temperature {sampling.temperature:g}, top-p {sampling.top_p:g}, seed {sampling.seed}"
    return f"{who} answers: run {loaded.run.id}, step {loaded.checkpoint.step}; {how}. /quit or end of input ends."


def talk(ws: Workspace, version: str | None, max_new_tokens: int, lines: Iterable[str], sampling: Sampling = GREEDY,
         system: str | None = None, chat: bool | None = None) -> None:
    """`conveyor chat`: load the model once, then answer line after line on stdout; notes go to stderr."""
    loaded = load(ws, version, chat)
    used = sampling.seeded()
    for note in notes(loaded, sampling, used, system):
        _note(f"note: {note}")
    conversation = Conversation(loaded, max_new_tokens, used, system)
    _say(header(loaded, conversation.keeps_history, used, system))
    for line in lines:
        prompt = line.rstrip("\r\n")
        word = prompt.strip()
        if not word:
            continue
        if word == "/quit":
            break
        if word == "/reset":
            conversation.reset()
            _note("(conversation cleared)" if conversation.keeps_history else
                      "(nothing to clear: each line is answered alone)")
        elif word.startswith("/") and " " not in word:  # "/etc/hosts is what?" is a prompt, "/rset" a typo
            _note(f"unknown command {word}: /reset starts over, /quit ends")
        else:
            answer, dropped = conversation.ask(prompt)
            if dropped:
                _note(f"({dropped} oldest exchange(s) dropped: the conversation outgrew the model's "
                          f"{loaded.context} positions)")
            _say(answer)


def input_lines() -> Iterator[str]:
    """Lines typed at a terminal (after a `> ` prompt, with line editing) or piped in, until end of input."""
    if not sys.stdin.isatty():
        yield from sys.stdin
        return
    try:
        import readline  # noqa: F401  (arrow keys and history for input())
    except ImportError:
        pass
    while True:
        try:
            yield input("> ")
        except EOFError:
            return


def _note(text: str) -> None:
    sys.stderr.write(text + "\n")  # plain, as _say: a note may quote a prompt with brackets in it
    sys.stderr.flush()


def _say(text: str) -> None:
    # Not rich: an answer is printed byte for byte, whatever brackets or :codes: it holds.
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _checkpoint(ws: Workspace, version: str | None) -> tuple[runs.Run, ck.Checkpoint, str | None]:
    """The checkpoint to answer with: the version's, or the active run's newest verified one."""
    if version is not None:
        return checkpoint(ws.db, ws.runs, version)
    run = runs.active(ws.db)
    found = ck.newest_verified(ws.run_dir(run.id), save=False)[0] if run else None
    if found is None:
        raise ConveyorError("nothing trained yet: there is no checkpoint to answer with; train a file first "
                            "(`conveyor train FILE`)")
    latest = at_step(ws.db, run.id, found.step)
    return run, found, name(latest) if latest is not None else None


def _chat_template(ws: Workspace) -> str:
    try:
        return ws.config().data.chat_template
    except ConveyorError:  # invalid settings: the model's own template
        return ""


# the model, quickly -------------------------------------------------------------------------------------
# adapter_config.json settings that make an adapter more than W + (alpha / r) · B·A on linear layers: such an
# adapter is loaded by peft (export.load_trained), as export does.
_NOT_PLAIN = ("use_rslora", "use_dora", "modules_to_save", "rank_pattern", "alpha_pattern", "fan_in_fan_out",
              "lora_bias", "layer_replication", "trainable_token_indices", "target_parameters", "use_qalora",
              "alora_invocation_tokens", "use_bdlora", "arrow_config")


def rebuild(identity: dict, model_path: str, checkpoint_dir: Path):
    """The model as trained, for answering: export.load_trained, with a plain LoRA adapter merged into the base
    weights instead of wrapped by peft (whose import alone takes seconds)."""
    adapter = _plain_lora(checkpoint_dir / ADAPTER_CONFIG) if identity.get("adapter.method") == "lora" else None
    if adapter is None:
        return load_trained(identity, model_path, checkpoint_dir)
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from ..train.precision import DTYPES  # precision imports torch at its top

    weights = _load(lambda: load_file(checkpoint_dir / "adapter_model.safetensors"), checkpoint_dir)
    pairs = _lora_pairs(weights)
    if pairs is None or identity.get("model.precision") not in DTYPES:
        return load_trained(identity, model_path, checkpoint_dir)
    model = _load(lambda: AutoModelForCausalLM.from_pretrained(model_path, dtype=DTYPES[identity["model.precision"]]),
                  model_path)
    modules = dict(model.named_modules())
    if not all(isinstance(modules.get(name), torch.nn.Linear) for name in pairs):
        return load_trained(identity, model_path, checkpoint_dir)
    scale = adapter["lora_alpha"] / adapter["r"]
    with torch.no_grad():
        for name, (a, b) in pairs.items():
            weight = modules[name].weight
            weight += (scale * (b.float() @ a.float())).to(weight.dtype)  # peft's merge: in fp32, then the dtype
    model.config.use_cache = True
    return model


def _plain_lora(config_path: Path) -> dict | None:
    try:
        adapter = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # load_trained says what is wrong with it
    plain = adapter.get("peft_type") == "LORA" and adapter.get("bias", "none") == "none" and \
        not any(adapter.get(key) for key in _NOT_PLAIN) and adapter.get("r") and adapter.get("lora_alpha")
    return adapter if plain else None


def _lora_pairs(weights: dict) -> dict | None:
    """{module name: (A, B)} from an adapter file's tensors, or None when it holds anything else."""
    pairs: dict[str, dict] = {}
    for key, tensor in weights.items():
        head, _, tail = key.rpartition(".lora_")
        if tail not in ("A.weight", "B.weight") or not head.startswith("base_model.model."):
            return None
        pairs.setdefault(head[len("base_model.model."):], {})[tail[0]] = tensor
    if not pairs or any(set(p) != {"A", "B"} for p in pairs.values()):
        return None
    return {name: (p["A"], p["B"]) for name, p in pairs.items()}
