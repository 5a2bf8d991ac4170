"""Chaos under the long-running daemon: 22 SIGKILLs at random moments of training, each of either the daemon's
whole session or only the worker process training the current job, the daemon restarted whenever it was killed.
With the default daemon settings (max_attempts 3) nothing fails, and the queue ends exactly like an
uninterrupted `conveyor run --drain`: steps 1..90 once each, every line once, the same weights (law 3)."""

from __future__ import annotations

import os
import random
import re
import signal
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import adapter_weights, audit, ledger, make_workspace, max_abs_diff, run_cli, status, text_file
from service import Service
from service import process_running as _running

pytestmark = pytest.mark.slow
# batch 2 × grad_accum 2: 30 + 20 + 40 = 90 steps, enough that most of the 22 kills land at random moments
# (a kill costs up to one checkpoint interval) and the rest inside checkpoint writes, before the queue ends.
SIZES = {"a.jsonl": 120, "b.jsonl": 80, "c.jsonl": 160}
SPANS = {1: (1, 30), 2: (31, 50), 3: (51, 90)}
TOTAL_STEPS = 90
SETTINGS = {"training": {"batch_size": 2, "grad_accum": 2, "save_every": 4, "warmup_steps": 3, "max_length": 48},
            "adapter": {"dropout": 0.1}}  # dropout > 0: the RNG state must be restored exactly too
DAEMON = {"daemon": {"min_free_mb": 0, "retry_backoff_seconds": 0.2}}  # max_attempts stays at its default, 3
MAX_ATTEMPTS = 3
KILLS = 22
SEED = 20250117
# The tiny model trains a step in ~20 ms and a whole job in well under a second once its worker is up: too fast
# for a kill from outside to land between steps or inside a checkpoint write. Each step is paced to 0.15 s.
PACED = {**os.environ, "CONVEYOR_TEST_STEP_SECONDS": "0.15"}


def _files(folder: Path) -> list[Path]:
    return [text_file(folder / name, n, name[0]) for name, n in SIZES.items()]


def _final_weights(ws: Path) -> dict:
    return adapter_weights(ws / "runs" / status(ws)["run"]["id"] / "checkpoints" / f"step-{TOTAL_STEPS:06d}")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_dir):
    root = tmp_path_factory.mktemp("reference")
    ws = make_workspace(root / "ws", tiny_dir, **SETTINGS)
    assert run_cli(ws, "add", *_files(root / "data")).code == 0
    r = run_cli(ws, "run", "--drain", "-q")
    assert r.code == 0, r.out + r.err
    return _final_weights(ws)


def _children_alive(daemon_pid: int) -> list[int]:
    """Live processes the daemon started (process.py gives each CONVEYOR_PARENT_PID=<daemon pid>)."""
    marker = f"CONVEYOR_PARENT_PID={daemon_pid}".encode()
    alive = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker in (entry / "environ").read_bytes().split(b"\0"):
                alive += [int(entry.name)] if _running(int(entry.name)) else []
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            pass
    return alive


def _newest_checkpoint(ws: Path) -> int:
    folder = ws / "runs" / "run-0001" / "checkpoints"
    if not folder.is_dir():
        return 0
    return max((int(p.name.split("-")[1]) for p in folder.iterdir() if p.name.startswith("step-")), default=0)


class Chaos:
    """The daemon under test, restarted after each kill of it; the kills counted by kind."""

    def __init__(self, ws: Path):
        self.ws = ws
        self.kills: Counter = Counter()
        self.landed: list[str] = []  # where each kill landed, for the printed summary
        self.last_kill = time.time()
        self.svc = Service(ws, env=PACED)

    def wait(self, predicate, timeout: float, what: str) -> None:
        """Service.wait, polled more often."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.svc.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"waiting for {what}: the daemon exited ({self.svc.proc.returncode}) or "
                                     f"{timeout} s passed; kills so far {dict(self.kills)}\n{self.svc.output()}")
            time.sleep(0.02)

    def training(self) -> tuple[int, int, int] | None:
        """(pid, job, claim step) of the worker training a job now, once it has trained (and flushed) a step
        since it started and since the last kill; else None. The claim step is the global step its job resumed
        after: its death counts against max_attempts unless a checkpoint came after that step."""
        rows = self.svc.query("SELECT id, ts, job_id, message FROM events WHERE kind = 'worker' ORDER BY id DESC"
                              " LIMIT 1")
        if not rows:
            return None
        event, pid, job = rows[0]["id"], int(rows[0]["message"].split()[2]), rows[0]["job_id"]
        state = self.svc.query("SELECT state FROM jobs WHERE id = ?", (job,))
        if not state or state[0]["state"] != "running" or not _running(pid):
            return None
        if not self.svc.query("SELECT 1 FROM metrics WHERE job_id = ? AND created_at > ? LIMIT 1",
                              (job, max(rows[0]["ts"], self.last_kill))):
            return None
        planned = self.svc.query("SELECT message FROM events WHERE kind = 'planned' AND job_id = ? AND id > ?"
                                 " ORDER BY id DESC LIMIT 1", (job, event))
        return pid, job, int(re.search(r"at global steps (\d+)–", planned[0]["message"]).group(1)) - 1

    def may_kill_worker(self, job: int, claimed_at: int) -> bool:
        """Whether killing the job's worker now cannot fail the job: a third death in a row without a new
        checkpoint would (that is tested elsewhere; here every job must survive every kill)."""
        attempts = self.svc.query("SELECT attempts FROM jobs WHERE id = ?", (job,))[0]["attempts"]
        return attempts < MAX_ATTEMPTS - 1 or _newest_checkpoint(self.ws) > claimed_at

    def finished(self) -> bool:
        return [j["state"] for j in self.svc.jobs().values()] == ["done"] * len(SIZES)

    def room(self) -> bool:
        """Whether the steps left leave room for the kills left (a kill at a random moment costs the queue about
        one checkpoint interval, a kill inside a checkpoint write none, or one interval in three for a worker's
        third death in a row, which must come after a new checkpoint)."""
        return TOTAL_STEPS - _newest_checkpoint(self.ws) > 2 * self.left() + 6

    def left(self) -> int:
        return KILLS - sum(self.kills.values())

    def writing(self, pid: int) -> bool:
        """Whether the worker is writing a checkpoint (checkpoints.py writes into .tmp-step-N-<pid> first)."""
        folder = self.ws / "runs" / "run-0001" / "checkpoints"
        return folder.is_dir() and any(p.name.endswith(f"-{pid}") for p in folder.glob(".tmp-step-*"))

    def moment(self, kind: str, delay: float) -> int | None:
        """Wait for the moment of the next kill; the training worker's pid then, or None if the queue finished.

        First a worker started since the last kill must have trained a step, so the kill lands during training.
        Then, while the steps left leave room for the kills left, `delay` more seconds (between steps or in a
        checkpoint write, by chance); otherwise until the worker starts a checkpoint write, which the kill then
        cuts off: the queue loses no step by it (the kills all fit before the queue ends)."""
        while True:
            current = None

            def training() -> bool:
                nonlocal current
                current = self.training()
                if current is not None and kind == "worker" and not self.may_kill_worker(*current[1:]):
                    current = None
                return current is not None or self.finished()

            self.wait(training, 180, f"a worker training (to kill the {kind})")
            if current is None:
                return None
            pid = current[0]
            step = _newest_checkpoint(self.ws)
            if self.room():
                time.sleep(delay)
                where = f"{kind} after step-{step} + {delay:.2f} s"
            else:
                deadline = time.monotonic() + 60
                while not self.writing(pid) and _running(pid) and time.monotonic() < deadline:
                    time.sleep(0.002)
                where = f"{kind} in a write after step-{step}"
            if _running(pid):
                self.landed.append(where)
                return pid

    def kill_worker(self, pid: int) -> None:
        os.kill(pid, signal.SIGKILL)
        self.kills["worker"] += 1
        self.wait(lambda: not _running(pid), 15, f"worker {pid} to die")
        self.last_kill = time.time()

    def kill_daemon(self) -> None:
        os.killpg(self.svc.proc.pid, signal.SIGKILL)  # its session: the daemon (its workers have their own)
        self.svc.proc.wait(timeout=30)
        self.kills["daemon"] += 1
        deadline = time.monotonic() + 15
        while _children_alive(self.svc.proc.pid):  # a worker never outlives its daemon (PR_SET_PDEATHSIG)
            assert time.monotonic() < deadline, f"processes of the killed daemon still alive: {self.svc.output()}"
            time.sleep(0.05)
        self.last_kill = time.time()
        self.svc.log.close()
        (self.ws / "daemon-test-output.txt").rename(self.ws / f"daemon-output-{self.kills['daemon']}.txt")
        self.svc = Service(self.ws, env=PACED)


def test_sigkill_daemon_or_worker_at_random_moments_ends_exactly_like_an_uninterrupted_run(
        tmp_path, tiny_dir, uninterrupted):
    ws = make_workspace(tmp_path / "ws", tiny_dir, **SETTINGS, **DAEMON)
    assert run_cli(ws, "add", *_files(tmp_path / "data")).code == 0
    rng = random.Random(SEED)
    chaos = Chaos(ws)
    try:
        while chaos.left():
            kind = "daemon" if rng.random() < 0.45 else "worker"
            pid = chaos.moment(kind, delay=rng.uniform(0.0, 0.6))
            if pid is None:
                break
            if kind == "daemon":
                chaos.kill_daemon()
            else:
                chaos.kill_worker(pid)
        print(f"chaos kills: {dict(chaos.kills)}:\n  " + "\n  ".join(chaos.landed))
        chaos.wait(chaos.finished, 300, "every job")
        deaths = chaos.svc.query("SELECT job_id FROM events WHERE kind = 'death'")
    finally:
        chaos.svc.stop()
    assert sum(chaos.kills.values()) >= 20 and chaos.kills["daemon"] >= 5 and chaos.kills["worker"] >= 5
    assert len(deaths) == chaos.kills["worker"]  # every worker kill was seen as a death, nothing else was

    s = status(ws)
    assert s["run"]["global_step"] == TOTAL_STEPS and [r["id"] for r in s["runs"]] == ["run-0001"]
    assert [(j["state"], j["start_step"], j["end_step"]) for j in s["jobs"]] == [
        ("done", *SPANS[1]), ("done", *SPANS[2]), ("done", *SPANS[3])]
    assert s["failures"] == []
    rows = audit(ws)
    assert [r["step"] for r in rows] == list(range(1, TOTAL_STEPS + 1))
    for job in s["jobs"]:
        first, last = SPANS[job["id"]]
        assert [r["step"] for r in rows if r["job"] == job["id"]] == list(range(first, last + 1))
        seen = Counter(line for r in rows if r["job"] == job["id"] for line in r["lines"])
        assert seen == Counter(range(1, SIZES[job["file"]] + 1)), job["file"]
    # A death closes no segment: one ledger row per job, as if nothing had happened.
    assert [(r["job"], r["start_step"], r["end_step"], r["outcome"]) for r in ledger(ws)] == [
        (job, *span, "done") for job, span in SPANS.items()]
    assert not list((ws / "runs").rglob(".tmp-*"))
    assert max_abs_diff(_final_weights(ws), uninterrupted) <= 1e-6
