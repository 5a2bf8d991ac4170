"""The ranks other than 0 of a job under torchrun: rank 0 (a Worker) sends its order, the same segment and the
database rows they need; each other rank sets that segment up from the workspace's files, which may be on another
host, and trains in step. They never open conveyor.db."""

from __future__ import annotations

from pathlib import Path

from .. import overrides
from ..config import Config
from ..data.chat import load_tokenizer
from ..data.formats import PREFERENCE_FORMATS
from ..data.plan import Position
from ..data.replay import PROBE, pool_of
from ..store import checkpoints as ck
from ..store import manifest as mf
from ..store.workspace import Workspace
from . import distributed
from .jobdata import data_key, trained_data
from .trainer import JobSpec, train_segment


class FilesOnly(Workspace):
    """The workspace as ranks other than 0 see it, perhaps on another host: its files only. The database is the
    daemon's and rank 0's (one writer, and no SQLite locking over a network file system)."""

    @property
    def db(self):
        raise RuntimeError("a rank other than 0 opened conveyor.db; it must read the workspace's files only (a bug)")


def follow(root: Path, config: Config, world_size: int) -> None:
    """A rank other than 0: wait for rank 0's order, set up the same segment from the workspace's files, train in
    step."""
    order = distributed.broadcast(None)
    if order is None:
        return
    ws = FilesOnly(Path(root))
    job, run_id = order["job"], order["run"]
    config = overrides.for_job(config, job.overrides, job.format in PREFERENCE_FORMATS)  # as rank 0 trains it
    resume = None
    if order["resume"]:
        path = Path(order["resume"])
        resume = ck.Checkpoint(path, ck.step_of(path), mf.read(path))
    model_path = ws.model_path(config.model.name)
    tokenizer = load_tokenizer(model_path, config.data.chat_template, ws.root)
    start = Position.from_json(order["start"])
    pool = None
    if start.replay_count:  # as jobdata.replay_pool builds it, from the rows (and the probe) rank 0 sent
        parts = {j.id: trained_data(ws, j, config, model_path, tokenizer) for j in order["replayed"]}
        parts[PROBE] = order.get("probe")
        pool = pool_of(start.replay_sources, parts.__getitem__, config.training.seed, start.fingerprint)
    spec = JobSpec(run_id=run_id, run_dir=ws.run_dir(run_id),
                   data=trained_data(ws, job, config, model_path, tokenizer),
                   start=start, identity=order["identity"], resume=resume,
                   open_jobs=[Position.from_json(p) for p in order["open"]], pool=pool, format=job.format,
                   data_key=data_key(ws, job, config, model_path, tokenizer), reference=order.get("reference"),
                   method=order.get("method"))
    train_segment(config, model_path, spec, None, world_size)
