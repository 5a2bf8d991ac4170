"""Typed settings of a workspace (`conveyor.toml`): validation, defaults and the commented template."""

from __future__ import annotations

import importlib.util
import re
import shlex
import urllib.parse
from pathlib import Path
from typing import Literal

import tomllib
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from .errors import ConfigError

CONFIG_FILE = "conveyor.toml"


class _Section(BaseModel):
    # allow_inf_nan=False: an inf or nan setting (weight_decay = inf) would train a run to NaN; refused on load.
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True,
                              allow_inf_nan=False)


class ModelConfig(_Section):
    name: str = "tiny"
    """"tiny" (built in, offline), a local Hugging Face model folder, or a hub id."""
    precision: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype the base model is loaded in (run identity); autocast is training.mixed_precision."""
    quantization: Literal["none", "nf4"] = "none"
    """nf4 loads the base in 4-bit through bitsandbytes and trains LoRA on it (QLoRA; run identity)."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    """Attention kernel: sdpa (PyTorch), eager, or flash_attention_2 (needs flash-attn and a CUDA GPU)."""

    @field_validator("quantization")
    @classmethod
    def _quantization_available(cls, value: str) -> str:
        if value == "nf4" and not installed("bitsandbytes"):
            raise PydanticCustomError("unavailable", "nf4 needs bitsandbytes (pip install 'conveyor[qlora]'); "
                                      "or set \"none\"")
        return value

    @field_validator("attn_implementation")
    @classmethod
    def _attention_available(cls, value: str) -> str:
        if value == "flash_attention_2" and not installed("flash_attn"):
            raise PydanticCustomError("unavailable", "flash_attention_2 needs the flash-attn package and a CUDA "
                                      "GPU (pip install flash-attn); use \"sdpa\" (the default) or \"eager\"")
        return value


class AdapterConfig(_Section):
    method: Literal["lora", "full"] = "lora"
    """lora trains a PEFT LoRA adapter; full trains every weight of the model."""
    r: int = Field(8, ge=1, le=4096)
    """LoRA rank."""
    alpha: float = Field(16.0, gt=0)
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the LoRA input."""
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], min_length=1)
    """Module names that get LoRA layers."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Which biases are trained with the adapter."""


class TrainingConfig(_Section):
    batch_size: int = Field(4, ge=1)
    """Examples per micro-batch per process."""
    grad_accum: int = Field(2, ge=1)
    """Micro-batches per optimizer step."""
    learning_rate: float = Field(2e-4, gt=0, le=1.0)
    """Peak learning rate."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warmup steps: once per run (constant) or at the start of each job (cosine)."""
    schedule: Literal["constant", "cosine"] = "constant"
    """constant: warmup once per run, then constant (a stream has no known end); cosine: warmup and cosine decay within each job."""
    weight_decay: float = Field(0.0, ge=0.0)
    """AdamW weight decay."""
    max_grad_norm: float = Field(1.0, ge=0.0)
    """Gradient clipping norm (0 disables clipping)."""
    max_length: int = Field(512, ge=8)
    """Tokens per example; longer examples are truncated (see data.too_long)."""
    epochs: int = Field(1, ge=1, le=1000)
    """Passes over each file."""
    save_every: int = Field(50, ge=1)
    """Write a checkpoint every N global steps (and always at the end of each job)."""
    keep_checkpoints: int = Field(3, ge=1)
    """The newest checkpoints kept per run (older ones are deleted once a newer one verifies)."""
    keep_job_ends: int = Field(3, ge=0)
    """Also kept whole: the end-of-job checkpoints of the last N jobs (the newest always) and pinned ones; older versions keep their weights, their optimizer state is pruned."""
    prune_version_weights: bool = False
    """Full fine-tunes only: retention also deletes the weights of versions beyond keep_job_ends (they can no longer be exported, tried or rolled back to); LoRA adapters are always kept."""
    seed: int = Field(42, ge=0)
    """Run seed: fixes adapter initialisation and each epoch's data order."""
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    """Autocast forward and backward in bf16 or fp16 while weights and optimizer stay fp32 (fp16: CUDA only)."""
    gradient_checkpointing: bool = False
    """Recompute each layer's activations in the backward pass: less memory, slower steps, the same weights."""
    optimizer: Literal["adamw_torch", "adamw_8bit"] = "adamw_torch"
    """adamw_torch (torch's AdamW) or adamw_8bit (bitsandbytes: 8-bit moments, less memory)."""
    packing: bool = True
    """Padding-free micro-batches (examples end to end, attention kept within each); padded where the model cannot."""
    deterministic: bool = False
    """Deterministic kernels only (GPU): a resumed run then ends with the uninterrupted run's weights; slower. CPU needs no flag."""
    preference: Literal["dpo", "ipo", "orpo"] = "dpo"
    """How preference-pair files train: dpo (sigmoid loss), ipo (squared, length-normalized) or orpo (no reference)."""
    preference_learning_rate: float = Field(1e-6, gt=0, le=1.0)
    """Peak learning rate of preference and feedback jobs (TRL's DPO/KTO default, 1e-6, set for full fine-tuning; LoRA
    usually wants 5e-6 to 5e-5); a job's own `--set training.learning_rate` comes first."""
    beta: float = Field(0.1, gt=0.0, le=100.0)
    """Preference and feedback jobs: DPO/IPO/KTO's beta (how far from the reference), ORPO's lambda; TRL's 0.1."""
    desirable_weight: float = Field(1.0, gt=0.0, le=100.0)
    """Feedback (KTO) jobs: the weight of answers labelled true (TRL's 1.0)."""
    undesirable_weight: float = Field(1.0, gt=0.0, le=100.0)
    """Feedback (KTO) jobs: the weight of answers labelled false (TRL's 1.0)."""

    @field_validator("mixed_precision")
    @classmethod
    def _autocast_available(cls, value: str) -> str:
        if value == "no":
            return value
        import torch

        if value == "fp16" and not torch.cuda.is_available():
            raise PydanticCustomError("unavailable", "fp16 autocast needs a CUDA GPU (on CPU the Trainer would "
                                      "silently train in fp32); use \"bf16\" or \"no\"")
        if value == "bf16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
            raise PydanticCustomError("unavailable", "this GPU has no bf16; use \"fp16\" or \"no\"")
        return value

    @field_validator("optimizer")
    @classmethod
    def _optimizer_available(cls, value: str) -> str:
        if value == "adamw_8bit" and not installed("bitsandbytes"):
            raise PydanticCustomError("unavailable", "adamw_8bit needs bitsandbytes (pip install 'conveyor[qlora]'); "
                                      "or use \"adamw_torch\"")
        return value


class DataConfig(_Section):
    too_long: Literal["truncate", "reject"] = "truncate"
    """truncate cuts examples to training.max_length (and reports how many); reject refuses such files."""
    skip_duplicates: bool = False
    """false trains a file again (with a warning) when its bytes match a finished job; true skips it."""
    chat_template: str = ""
    """A Jinja chat template file (workspace-relative or absolute) to use instead of the model's; empty: the model's."""


class EvalConfig(_Section):
    file: str = ""
    """Validation JSONL (path, relative to the workspace or absolute); empty: no evaluation loss."""
    every_steps: int = Field(0, ge=0)
    """Evaluate every N global steps as well as at the end of each job (0: only at job ends)."""
    batch_size: int = Field(8, ge=1)
    """Examples per evaluation batch (does not change the result, only speed and memory)."""
    max_examples: int = Field(256, ge=1)
    """Use the first N examples of the validation file."""
    sample_prompts: list[str] = Field(default_factory=list)
    """Prompts the current model answers (greedy) at each evaluation, shown in status and the dashboard."""
    max_new_tokens: int = Field(32, ge=1, le=4096)
    """Length limit of each sample answer."""
    holdout: float = Field(0, ge=0)
    """Examples of each job set aside and never trained (a count, or a fraction below 1), scored at every evaluation."""
    probe: str = "auto"
    """What the base model knew, measured per version (retention): a JSONL file of {"prompt": ...} lines, "general"
    (the built-in set of everyday questions), "auto" (that set for a model with a chat template, except the
    random-weight built-ins tiny and small) or "" (none)."""
    answers: int = Field(16, ge=0, le=10_000)
    """Held-out examples per set (prompt/completion or chat) whose greedy answers are scored against the reference
    (exact match, token F1) at each evaluation, beside the loss; 0: loss only."""
    answer_budget: int = Field(20_000, ge=0)
    """At most this many tokens generated to score answers per evaluation (answers x sets x max_new_tokens); an
    evaluation that would need more scores losses only and says so."""
    gate: float = Field(0.0, ge=0.0)
    """Pause the queue when a job raises an earlier held-out set's loss by more than this fraction (0.1 = 10%); 0: off."""
    gate_answers: float = Field(0.0, ge=0.0, le=1.0)
    """Pause the queue when a job lowers an earlier held-out set's answer F1 by more than this (0.2: from 0.9 to
    below 0.7); 0: off. Needs eval.holdout and eval.answers."""
    gate_retention: float = Field(0.0, ge=0.0, le=1.0)
    """Pause the queue when a version keeps less than this share of the base model's answers to the probe (F1;
    0.9 = 90%); 0: off. Needs eval.probe."""

    @field_validator("holdout")
    @classmethod
    def _count_or_fraction(cls, value: float) -> float:
        if value >= 1 and value != int(value):
            raise PydanticCustomError("holdout", "a count of examples (a whole number such as 3) or a fraction "
                                      "below 1 (such as 0.05)")
        return int(value) if value >= 1 else value


class ReplayConfig(_Section):
    fraction: float = Field(0.0, ge=0.0, le=0.5)
    """About this fraction of each step's examples are replayed from earlier jobs of the run (0 to 0.5; 0: off)."""
    rehearsal: float = Field(0.0, ge=0.0, le=0.5)
    """Self-rehearsal: about this fraction of each step's examples are the probe's prompts answered by the base
    model (eval.probe; recorded once), so that the model keeps what it knew (0 to 0.5, with fraction at most 0.5)."""

    @model_validator(mode="after")
    def _at_most_half(self) -> "ReplayConfig":
        if self.fraction + self.rehearsal > 0.5:
            raise PydanticCustomError("replay", "replay.fraction + replay.rehearsal = {t} leaves less than half of "
                                      "each step to the job's own examples; keep the two at most 0.5 together",
                                      {"t": round(self.fraction + self.rehearsal, 6)})
        return self


class NotifyConfig(_Section):
    webhook: str = ""
    """URL that gets a JSON POST on each event (job done, failed, rejected, gate, paused for disk, daemon stopped)."""
    secret_header: str = ""
    """A header sent with each POST, as "Name: value" (e.g. "Authorization: Bearer abc"); empty: none."""
    command: str = ""
    """A command run on each event, the event's JSON on its standard input; empty: none."""
    timeout_seconds: float = Field(5.0, gt=0.0, le=300.0)
    """How long one delivery may take before it counts as failed."""
    retries: int = Field(3, ge=0, le=20)
    """Further tries after a failed delivery (waiting 1, 2, 4, ... s); a failure is logged, never fatal."""

    @model_validator(mode="before")
    @classmethod
    def _hide_credentials(cls, data):
        # An error quotes the value it refuses ("found ..."): credentials in the webhook's URL are blanked first.
        if isinstance(data, dict) and isinstance(data.get("webhook"), str):
            try:
                parts = urllib.parse.urlsplit(data["webhook"])
            except ValueError:  # not a URL at all: _http_url says so
                return data
            if "@" in parts.netloc:
                data = {**data, "webhook": parts._replace(netloc="…@" + parts.netloc.rpartition("@")[2]).geturl()}
        return data

    @field_validator("webhook")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urllib.parse.urlsplit(value)
        if value and (parts.scheme not in ("http", "https") or not parts.netloc):
            raise PydanticCustomError("webhook", "an http:// or https:// URL such as "
                                      "https://hooks.example.com/conveyor, or \"\" for none")
        if "@" in parts.netloc:  # they would be logged with every failed delivery, and urllib does not send them
            raise PydanticCustomError("webhook", "credentials in the URL (user:password@) are refused; they are not "
                                      "shown or stored: remove them and send them with notify.secret_header instead, "
                                      "e.g. \"Authorization: Basic <base64 of user:password>\"")
        return value

    @field_validator("secret_header")
    @classmethod
    def _name_value(cls, value: str) -> str:
        name, colon, _ = value.partition(":")
        if value and (not colon or not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name.strip())
                      or "\n" in value or "\r" in value):
            raise PydanticCustomError("secret_header", "one header as \"Name: value\", e.g. \"Authorization: Bearer "
                                      "abc\", or \"\" for none")
        return value

    @field_validator("command")
    @classmethod
    def _splits(cls, value: str) -> str:
        try:
            shlex.split(value)
        except ValueError as e:
            raise PydanticCustomError("command", "a command line (split like a shell, without running one): "
                                      "{problem}", {"problem": str(e)})
        return value


class ReportConfig(_Section):
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "comet_ml", "clearml", "dvclive", "trackio"]] = Field(
        default_factory=list)
    """Also send metrics to these Hugging Face Trainer integrations (their packages must be installed)."""


class DistributedConfig(_Section):
    hosts: list[str] = Field(default_factory=list)
    """Hosts a job runs on, one torchrun agent each (the first is this machine, node rank 0); empty: this machine."""
    nproc_per_node: int = Field(1, ge=1, le=64)
    """Processes per host; above 1 (or with hosts) each worker is launched through torchrun (data parallel)."""
    launcher: Literal["local", "ssh", "slurm"] = "local"
    """How an agent starts on a host: local (this machine), ssh (`ssh HOST torchrun ...`), slurm (`srun -w HOST`)."""
    rdzv_port: int = Field(29400, ge=1024, le=65535)
    """Port of the c10d rendezvous on the first host."""
    timeout_seconds: float = Field(300.0, gt=0, le=86400)
    """How long a collective may hang (a lost host) before the attempt is ended and relaunched."""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """ddp: every rank holds the whole model; fsdp: FSDP2 shards the weights across the ranks (a full fine-tune's
    with their optimizer state; under LoRA the frozen base, the adapter being whole on every rank)."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """torch.distributed backend: auto picks nccl with CUDA, gloo on CPU."""


class InboxConfig(_Section):
    settle_seconds: float = Field(1.0, ge=0.0, le=3600)
    """A file in inbox/ is claimed once its size and mtime have not changed for this long."""
    poll_seconds: float = Field(0.5, gt=0.0, le=60)
    """How often the inbox is re-scanned when file-system events are unavailable (and as a safety net)."""


class DaemonConfig(_Section):
    max_attempts: int = Field(3, ge=1, le=100)
    """Worker deaths in a row without a new checkpoint before the job is marked failed (progress resets it)."""
    retry_backoff_seconds: float = Field(2.0, ge=0.0)
    """Wait before the first retry; doubles with each further attempt without progress."""
    max_backoff_seconds: float = Field(300.0, ge=0.0)
    """The longest wait between retries, however many attempts failed."""
    min_free_mb: int = Field(200, ge=0)
    """Free disk kept in reserve beyond the job's estimated checkpoint needs; the daemon pauses below it."""


class Config(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    replay: ReplayConfig = Field(default_factory=ReplayConfig)
    notify: NotifyConfig = Field(default_factory=NotifyConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    inbox: InboxConfig = Field(default_factory=InboxConfig)
    daemon: DaemonConfig = Field(default_factory=DaemonConfig)

    @model_validator(mode="after")
    def _sections_agree(self) -> "Config":
        if self.model.quantization != "none" and self.adapter.method != "lora":
            raise PydanticCustomError("conflict", "model.quantization = \"{q}\" trains a LoRA adapter on a frozen "
                                      "4-bit base, but adapter.method is \"{m}\"; set adapter.method = \"lora\" or "
                                      "model.quantization = \"none\"", {"q": self.model.quantization,
                                                                          "m": self.adapter.method})
        if self.distributed.strategy == "fsdp" and self.model.quantization != "none":
            raise PydanticCustomError("conflict", "distributed.strategy = \"fsdp\" shards the base's weights, but "
                                      "model.quantization = \"{q}\" holds them in 4-bit blocks that FSDP2 cannot "
                                      "shard; set model.quantization = \"none\" or distributed.strategy = \"ddp\"",
                                      {"q": self.model.quantization})
        if self.eval.gate_answers > 0 and not (self.eval.holdout and self.eval.answers):
            raise PydanticCustomError("conflict", "eval.gate_answers = {g} compares each job's held-out answers before "
                                      "and after later jobs, but eval.holdout or eval.answers is 0; set both (e.g. "
                                      "eval.holdout = 20, eval.answers = 16) or eval.gate_answers = 0",
                                      {"g": self.eval.gate_answers})
        if self.eval.gate_retention > 0 and not self.eval.probe:
            raise PydanticCustomError("conflict", "eval.gate_retention = {g} compares each version's answers to the "
                                      "probe with the base model's, but eval.probe is \"\" (none); set eval.probe "
                                      "(\"general\" or a file) or eval.gate_retention = 0",
                                      {"g": self.eval.gate_retention})
        if self.eval.gate > 0 and not self.eval.holdout:
            raise PydanticCustomError("conflict", "eval.gate = {g} compares each job's held-out loss before and after "
                                      "later jobs, but eval.holdout = 0 holds none out; set eval.holdout (e.g. 0.05 "
                                      "or 20) or eval.gate = 0", {"g": self.eval.gate})
        if self.training.mixed_precision == "fp16" and self.adapter.method == "full" \
                and self.model.precision == "float16":
            raise PydanticCustomError("conflict", "training.mixed_precision = \"fp16\" needs float32 master weights, "
                                      "but a full fine-tune trains model.precision = \"float16\" weights; set "
                                      "model.precision = \"float32\" or training.mixed_precision = \"no\"")
        return self


def installed(package: str) -> bool:
    """Whether an optional package can be imported (without importing it)."""
    return importlib.util.find_spec(package) is not None


def _describe(error: dict) -> str:
    key = ".".join(str(part) for part in error["loc"])
    if not key:  # a conflict between sections: its message names the keys
        return error["msg"]
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key (value {error['input']!r}); remove it or check its spelling"
    if error["type"] == "finite_number":  # inf or nan: training would only produce NaN weights
        return f"{key}: must be a finite number (found {error['input']!r}); the default is {_default(error['loc'])!r}"
    return f"{key}: {error['msg']} (found {error['input']!r})"


def _default(loc: tuple):
    """The default of the setting at `loc` (section, key), for messages."""
    section = Config.model_fields[loc[0]].default_factory()
    return getattr(section, str(loc[1])) if len(loc) > 1 and hasattr(section, str(loc[1])) else None


def parse_config(data: dict, source: str = CONFIG_FILE) -> Config:
    """Validate a settings dict; every problem is listed in one ConfigError."""
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        problems = [_describe(err) for err in e.errors()]
        lines = "\n".join(f"  - {p}" for p in problems)
        raise ConfigError(f"{source} has {len(problems)} problem(s):\n{lines}") from None


def load_config(path: Path) -> Config:
    """Read and validate conveyor.toml."""
    if not path.exists():
        raise ConfigError(f"{path} not found; run `conveyor init` to create a workspace")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid TOML: {e}; fix the line named or re-create it with `conveyor init`") from None
    return parse_config(data, str(path))


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def render_config(config: Config) -> str:
    """The full conveyor.toml text: every setting present with its comment (a description of several lines is
    commented line by line)."""
    out = ["# conveyor workspace settings; every key is checked on load.", ""]
    for section_name, section_field in Config.model_fields.items():
        section = getattr(config, section_name)
        out.append(f"[{section_name}]")
        for name, field in type(section).model_fields.items():
            out += [f"# {line.strip()}" for line in (field.description or "").splitlines()]
            out.append(f"{name} = {_toml_value(getattr(section, name))}")
        out.append("")
    return "\n".join(out)
