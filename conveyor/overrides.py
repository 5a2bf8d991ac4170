"""Per-job settings: `conveyor add FILE --set training.learning_rate=1e-4` trains that file's job with those values
instead of conveyor.toml's. They are kept with the job (so a resumed job keeps them) and shown in its ledger rows.
A key that is part of the run's identity (model, adapter) is refused: it would need another run (law 5), which is
what changing conveyor.toml does. So is anything that is not about how one job trains."""

from __future__ import annotations

import tomllib

from .config import Config, parse_config
from .errors import ConfigError

# Keys a job may set for itself: how it trains, evaluates and replays. training.seed fixes the run's example order
# and the other sections are the run's or the workspace's.
PER_JOB = ("training.", "eval.holdout", "eval.every_steps", "replay.fraction", "replay.rehearsal")
RUN_WIDE = {"training.seed": "the run's example order is fixed by it (law 2)",
            "training.keep_checkpoints": "retention is the run's", "training.keep_job_ends": "retention is the run's",
            "training.prune_version_weights": "retention is the run's"}
IDENTITY = ("model.", "adapter.")


def parse(items: list[str], config: Config) -> dict:
    """`key=value` items (value as TOML, else a string) checked against the settings; ConfigError lists every
    problem with the key and what to do."""
    found: dict = {}
    problems = []
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or not raw.strip():
            problems.append(f"--set {item!r}: write it as KEY=VALUE, e.g. --set training.learning_rate=1e-4")
            continue
        if key.startswith(IDENTITY):
            problems.append(f"--set {key}: part of the run's identity (law 5); a job cannot change it. Change it in "
                            "conveyor.toml to start a new run")
        elif key in RUN_WIDE:
            problems.append(f"--set {key}: not a per-job setting ({RUN_WIDE[key]}); change it in conveyor.toml")
        elif not key.startswith(PER_JOB):
            problems.append(f"--set {key}: not a per-job setting; a job may set training.*, eval.holdout, "
                            "eval.every_steps, replay.fraction and replay.rehearsal")
        else:
            found[key] = _value(raw.strip())
    if not problems:
        try:
            apply(config, found)
        except ConfigError as e:
            problems.append(str(e))
    if problems:
        raise ConfigError("\n".join(problems))
    return found


def _value(raw: str):
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw  # a bare word, e.g. --set training.schedule=cosine


def apply(config: Config, overrides: dict | None) -> Config:
    """The settings with a job's overrides in force (validated as conveyor.toml is); the same object without any."""
    if not overrides:
        return config
    data = config.model_dump()
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        if section not in data or name not in data[section]:
            raise ConfigError(f"--set {key}: no such setting (see conveyor.toml for every key)")
        data[section][name] = value
    return parse_config(data, "--set")


def for_job(config: Config, overrides: dict | None, preference: bool) -> Config:
    """A job's settings: its overrides in force; a preference or feedback job (`preference`) trains at
    training.preference_learning_rate unless it sets training.learning_rate itself."""
    config = apply(config, overrides)
    if preference and "training.learning_rate" not in (overrides or {}):
        config = config.model_copy(deep=True)
        config.training.learning_rate = config.training.preference_learning_rate
    return config


def describe(overrides: dict | None) -> str:
    return ", ".join(f"{k}={v}" for k, v in (overrides or {}).items())
