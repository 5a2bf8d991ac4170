"""Replay: earlier jobs' trained examples mixed into a job on purpose (`replay.fraction`), recorded as replay.

When a job is first planned, its sources are fixed (the jobs of the run, and of its lineage before a rollback,
that are done) and so is the number of replayed examples, R = round(own × f / (1 − f)), so that about a fraction
f of each step's examples is replayed. Both live in the job's position in every manifest, so a resumed job
replays exactly the same examples whatever the settings or the queue did meanwhile.

The job's positions interleave its own examples (in the order law 2 fixes) with R replayed ones evenly
(plan.is_replayed). The r-th replayed example is draw r of the pool, the sources' trained examples end to end:
a permutation fixed by (seed, job fingerprint, cycle) walked without repetition, a new one each time the pool
is used up. Every lookup is O(1) in the position (one permutation per cycle is kept).

Self-rehearsal (`replay.rehearsal`) adds the probe's prompts answered by the base model to the pool, as the source
PROBE (0, a job id never given): it appears in the sources k times, k fixed at the first plan so that about
rehearsal / (fraction + rehearsal) of the draws are the probe's (the pool walks its parts end to end), and in the
audit as replay of "job 0", line n being the probe's n-th prompt.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from .formats import Tokenized, TokenizedFile
from .plan import JobOrder, Position, is_replayed, replayed_before

PROBE = 0  # the source id of the probe's base answers in a pool (self-rehearsal)


def probe_copies(rehearsal: float, fraction: float, earlier: int, probe: int) -> int:
    """How many times the probe's examples (`probe` of them) join a pool of `earlier` replayable examples so that
    about rehearsal / (fraction + rehearsal) of its draws are the probe's; 0 without rehearsal."""
    if rehearsal <= 0 or probe == 0:
        return 0
    if fraction <= 0 or earlier == 0:
        return 1
    share = rehearsal / (fraction + rehearsal)
    return max(1, round(share * earlier / ((1 - share) * probe)))


def count(fraction: float, own_total: int, pool: int) -> int:
    """Replayed examples of a job with `own_total` own positions: about `fraction` of all its positions."""
    if fraction <= 0 or pool == 0 or own_total == 0:
        return 0
    return round(own_total * fraction / (1 - fraction))


class Pool:
    """Draws from earlier jobs' trained examples: draw r is (source job, example), without repetition until the
    pool is used up."""

    def __init__(self, parts: list[tuple[int, TokenizedFile]], seed: int, fingerprint: str):
        self.parts = parts
        self.starts = np.cumsum([0] + [len(data.examples) for _, data in parts])
        self.size = int(self.starts[-1])
        self.seed, self.fingerprint = seed, fingerprint
        self._cycle, self._order = -1, None

    def __getitem__(self, draw: int) -> tuple[int, Tokenized]:
        cycle, offset = divmod(draw, self.size)
        if cycle != self._cycle:
            key = hashlib.sha256(f"{self.seed}:{self.fingerprint}:replay:{cycle}".encode()).digest()
            rng = np.random.Generator(np.random.PCG64(int.from_bytes(key[:16], "little")))
            self._cycle, self._order = cycle, rng.permutation(self.size)
        i = int(self._order[offset])
        part = int(np.searchsorted(self.starts, i, side="right")) - 1
        job_id, data = self.parts[part]
        return job_id, data.examples[i - int(self.starts[part])]


def pool_of(sources, part, seed: int, fingerprint: str) -> Pool | None:
    """The pool of a job's replay sources in their order (`part(source)` gives a source's examples: an earlier job's
    trained ones, or the probe's); None if it holds nothing."""
    pool = Pool([(source, part(source)) for source in sources], seed, fingerprint)
    return pool if pool.size else None


@dataclass
class Item:
    job_id: int  # the job whose file the example comes from
    example: Tokenized
    replayed: bool


class Layout:
    """What each position of a job trains: its own examples in law 2's order, replayed ones between them."""

    def __init__(self, start: Position, data: TokenizedFile, order: JobOrder, pool: Pool | None):
        self.start, self.data, self.order, self.pool = start, data, order, pool
        self.total, self.replay = start.total, start.replay_count
        if self.replay and pool is None:
            raise ValueError(f"job {start.job_id} replays {self.replay} examples but has no pool to draw them from")

    def __len__(self) -> int:
        return self.total

    def __getitem__(self, position: int) -> Item:
        before = replayed_before(position, self.replay, self.total)
        if self.replay and is_replayed(position, self.replay, self.total):
            job_id, example = self.pool[before]
            return Item(job_id, example, True)
        _, index = self.order[position - before]
        return Item(self.start.job_id, self.data.examples[index], False)
