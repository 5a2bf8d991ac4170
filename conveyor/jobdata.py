"""A job's data: its stored copy parsed and tokenized (cached by content), without its held-out examples, the
replay pool of earlier jobs, and the jobs of a run's lineage. The worker, replay and evaluation read data here."""

from __future__ import annotations

from pathlib import Path

from . import holdout, jobs
from .config import Config
from .formats import TokenizedFile
from .jobs import Job
from .runs import ancestry
from .tokenized import tokenize_cached
from .workspace import Workspace


def held_out_jobs(con, run_id: str) -> list[Job]:
    """Jobs with a held-out set in the order they started (the current one included), up the run's lineage."""
    found = lineage_jobs(con, run_id, "holdout IS NOT NULL AND holdout != '[]' AND state IN ('done', 'interrupted',"
                                      " 'running')")
    seen, out = set(), []
    for job in found:  # a job queued again after a rollback holds out the same examples: one set
        if (job.fingerprint, tuple(job.holdout)) not in seen:
            seen.add((job.fingerprint, tuple(job.holdout)))
            out.append(job)
    return out


def lineage_jobs(con, run_id: str, where: str, ended: bool = False) -> list[Job]:
    """Jobs matching `where` of the run, and for a rollback's run those its parent had begun (ended=True: had
    finished) by the version it branched from (and so on up the lineage), in the order they started."""
    found: list[Job] = []
    column = "end_step" if ended else "start_step"
    for run_id, bound in ancestry(con, run_id):
        rows = con.execute(f"SELECT * FROM jobs WHERE run_id = ? AND {where} AND (? IS NULL OR {column} <= ?)"
                           " ORDER BY start_step, id", (run_id, bound, bound))
        found = [Job.from_row(r) for r in rows] + found
    return found


def replay_pool(ws: Workspace, config: Config, model_path: str, sources, fingerprint: str, tokenizer=None):
    """The trained examples (held-out ones excluded) of the source jobs, as a replay.Pool; None if empty."""
    from .replay import Pool

    tokenizer = tokenizer or _load_tokenizer(ws, config, model_path)
    parts = [(job_id, trained_data(ws, jobs.get(ws.db, job_id), config, model_path, tokenizer)) for job_id in sources]
    pool = Pool(parts, config.training.seed, fingerprint)
    return pool if pool.size else None


def trained_data(ws: Workspace, job: Job, config: Config, model_path: str, tokenizer=None) -> TokenizedFile:
    """The job's examples without its held-out ones: what it trains (and what later jobs may replay)."""
    return holdout.split(job_data(ws, job, config, model_path, tokenizer), job.holdout or []).trained


def job_data(ws: Workspace, job: Job, config: Config, model_path: str, tokenizer=None) -> TokenizedFile:
    """The job's stored file, parsed and tokenized, cached by content, tokenizer, chat template and max_length."""
    tokenizer = tokenizer or _load_tokenizer(ws, config, model_path)
    return tokenize_cached(Path(job.stored), job.file, tokenizer, config.training.max_length,
                           ws.data / "tokenized", data_key(ws, job, config, model_path, tokenizer))


def data_key(ws: Workspace, job: Job, config: Config, model_path: str, tokenizer=None) -> str:
    """What the job's tokenized examples depend on: its content, the tokenizer and chat template, max_length."""
    from .chat import template_id
    from .runs import tokenizer_hash

    tokenizer = tokenizer or _load_tokenizer(ws, config, model_path)
    key = f"{job.fingerprint}:{tokenizer_hash(model_path) or model_path}"  # a hub id stands for its tokenizer
    return f"{key}:{template_id(tokenizer)}"


def _load_tokenizer(ws: Workspace, config: Config, model_path: str):
    from .chat import load_tokenizer

    return load_tokenizer(model_path, config.data.chat_template, ws.root)  # data.chat_template applied
