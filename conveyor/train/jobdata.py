"""A job's data: its stored copy parsed and tokenized (cached by content), without its held-out examples, the
replay pool of earlier jobs, and the jobs of a run's lineage. The worker, replay and evaluation read data here.

What trains is verified to be the bytes the job was added with (law 4): the stored copy against the job's
fingerprint, the tokenized arrays against the hashes written with them, each a stat when unchanged since it was
last hashed (data/.hashes.json). Arrays that fail are rebuilt from the verified copy (they are derived); a copy
that fails stops every job that needs it (StoredDataError) until the original is added again (inbox.enqueue).
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Callable

from ..config import Config
from ..data import holdout, replay
from ..data.chat import load_tokenizer, template_id
from ..data.formats import PREFERENCE_FORMATS, TokenizedFile
from ..data.tokenized import tokenize_cached
from ..errors import PlanError, StoredDataError
from ..fingerprint import FileHashes, short
from ..store import jobs
from ..store.database import log_event
from ..store.jobs import Job
from ..store.runs import ancestry, tokenizer_hash
from ..store.workspace import Workspace


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


def replay_sources(con, run_id: str, job_id: int) -> list[int]:
    """The jobs a new job may replay: those done in its run, and in the run's lineage before it branched."""
    return [j.id for j in lineage_jobs(con, run_id, "state = 'done'", ended=True)
            if j.id != job_id and j.format not in PREFERENCE_FORMATS]  # pairs and feedback are no demonstrations


def replay_pool(ws: Workspace, config: Config, model_path: str, sources, fingerprint: str, tokenizer=None,
                probe: TokenizedFile | None = None):
    """The trained examples (held-out ones excluded) of the source jobs, and the probe's base answers where the
    sources name it (replay.PROBE), as a replay.Pool; None if empty."""
    tokenizer = tokenizer or _load_tokenizer(ws, config, model_path)
    if replay.PROBE in sources and probe is None:
        raise PlanError("the job rehearses the probe's base answers (replay.rehearsal), which are not at hand: "
                        "they are recorded from the base model, in data/probe/; see the job's warnings")
    parts = {}

    def part(source: int) -> TokenizedFile:
        if source == replay.PROBE:
            return probe
        if source not in parts:
            parts[source] = trained_data(ws, jobs.get(ws.db, source), config, model_path, tokenizer)
        return parts[source]

    return replay.pool_of(sources, part, config.training.seed, fingerprint)


def trained_data(ws: Workspace, job: Job, config: Config, model_path: str, tokenizer=None) -> TokenizedFile:
    """The job's examples without its held-out ones: what it trains (and what later jobs may replay)."""
    return holdout.split(job_data(ws, job, config, model_path, tokenizer), job.holdout or []).trained


def job_data(ws: Workspace, job: Job, config: Config, model_path: str, tokenizer=None) -> TokenizedFile:
    """The job's stored file, verified, parsed and tokenized, cached by content, tokenizer, chat template and
    max_length. Raises StoredDataError if the stored copy is missing or holds other bytes."""
    tokenizer = tokenizer or _load_tokenizer(ws, config, model_path)
    hashes = FileHashes(ws.data)
    try:
        path = verified_copy(job, hashes)
        return tokenize_cached(path, job.file, tokenizer, config.training.max_length, ws.data / "tokenized",
                               data_key(ws, job, config, model_path, tokenizer), hashes,
                               warn=lambda text: _warn(ws, job, text))
    finally:
        hashes.save()


def verified_copy(job: Job, hashes: FileHashes) -> Path:
    """The job's stored copy if it holds the bytes the job was added with; else StoredDataError naming the file,
    what it holds and what to do."""
    path = Path(job.stored)
    found = copy_problem(path, job.fingerprint, hashes.sha256)
    if found is None:
        return path
    raise StoredDataError(
        f"{StoredDataError.names(job.fingerprint)} of job {job.id} ({job.file}) {found}; nothing is trained from it. Add the original "
        f"file again with `conveyor add {shlex.quote(job.source)}`: the copy is restored and every job that stopped "
        "for it goes back in the queue (one stopped mid-way resumes from its own position). Or leave it: a job "
        "that stopped for it stays failed, out of the queue, and the others go on")


def copy_problem(path: Path, fingerprint: str, sha256: Callable[[Path], str]) -> str | None:
    """What is wrong with a stored copy ("is missing", "now holds N bytes with sha256 …"), or None if `sha256` (a
    FileHashes' or a full hash) says it holds the bytes `fingerprint` names."""
    try:
        digest = sha256(path)
        if digest == fingerprint:
            return None
        return f"now holds {path.stat().st_size} bytes with sha256 {short(digest)}… instead of {short(fingerprint)}…"
    except FileNotFoundError:
        return "is missing"
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"


def _warn(ws: Workspace, job: Job, text: str) -> None:
    jobs.add_warning(ws.db, job, text)
    log_event(ws.db, "warning", "message", f"job {job.id} ({job.file}): {text}", job.id)


def data_key(ws: Workspace, job: Job, config: Config, model_path: str, tokenizer=None) -> str:
    """What the job's tokenized examples depend on: its content, the tokenizer and chat template, max_length."""
    tokenizer = tokenizer or _load_tokenizer(ws, config, model_path)
    key = f"{job.fingerprint}:{tokenizer_hash(model_path) or model_path}"  # a hub id stands for its tokenizer
    return f"{key}:{template_id(tokenizer)}:{config.training.max_length}"  # kept held-out sets are truncated too


def _load_tokenizer(ws: Workspace, config: Config, model_path: str):
    return load_tokenizer(model_path, config.data.chat_template, ws.root)  # data.chat_template applied
