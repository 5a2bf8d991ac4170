"""A model-based test of the queue: random sequences of what people and machines do to conveyor (add files of
any size, format (preference pairs, trained with DPO against their reference, among them), priority and epochs; stop, skip, pause/resume at a step; remove a waiting job; SIGKILL at a
failpoint; restart; change settings between jobs; hold examples out and replay earlier jobs; roll back to a
version, with or without --requeue; change the LoRA rank, which starts a new run), with the laws checked after
every step against a plain model of the queue. A rollback's run is checked along its lineage: the parent's
steps up to the version, then its own.

Each `run --drain` is a real `conveyor` process forked from a forkserver that has the training stack imported
(so a restart costs a fork, not 6 s of imports) and that never ran torch itself (forking after torch's thread
pools start can deadlock). A failing sequence is printed by hypothesis as a program that replays it.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import sqlite3
import sys
import tempfile
from collections import Counter
from pathlib import Path

from conftest import make_workspace, run_cli
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from conveyor.config import load_config, render_config
from conveyor.data.plan import JobOrder

PRELOAD = ["conveyor.cli", "conveyor.queue.daemon", "conveyor.train.worker", "conveyor.train.trainer", "transformers.trainer", "peft"]
_context = None


def _forkserver():
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _drain_child(ws: str, env: dict) -> None:
    os.environ.update(env)
    from conveyor import cli

    sys.argv = ["conveyor", "-w", ws, "run", "--drain", "-q"]
    cli.main()


def _cli_child(ws: str, args: list, env: dict) -> None:
    os.environ.update(env)
    from conveyor import cli

    sys.argv = ["conveyor", "-w", ws, *args]
    cli.main()


def killed(ws: Path, failpoint: str, *args: str, timeout: float = 300) -> int:
    """A `conveyor` command in a fresh process, SIGKILLed at a failpoint; its exit code (-9 when it fired)."""
    p = _forkserver().Process(target=_cli_child, args=(str(ws), list(args), {"CONVEYOR_FAILPOINT": failpoint}))
    p.start()
    p.join(timeout)
    if p.exitcode is None:
        p.kill()
        p.join()
    return p.exitcode


def drain(ws: Path, env: dict | None = None, timeout: float = 300) -> int:
    """`conveyor run --drain` in a fresh process; its exit code (-9 when a failpoint killed it)."""
    p = _forkserver().Process(target=_drain_child, args=(str(ws), env or {}))
    p.start()
    p.join(timeout)
    if p.exitcode is None:
        p.kill()
        p.join()
        raise AssertionError(f"`run --drain` did not end within {timeout} s")
    return p.exitcode


def _write(path: Path, n: int, fmt: str, tag: str) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for i in range(1, n + 1):
            record = {"text": f"{tag} {i} fox {i * 7 % 13}"} if fmt == "text" else \
                {"prompt": f"{tag} q{i}", "chosen": f" a{i * 3 % 11}", "rejected": f" b{i * 5 % 7} no"} \
                if fmt == "pairs" else {"prompt": f"{tag} q{i}", "completion": f"a{i * 3 % 11}"}
            f.write(json.dumps(record) + "\n")
    return path


def _tree_hashes(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


STATS: Counter = Counter()  # what the sequences did, for the closing note and to see the test is not idle


class QueueMachine(RuleBasedStateMachine):
    """The plain model: which files were added (bytes, lines, epochs), which jobs a person removed or skipped,
    and the files of runs that a new identity left behind."""

    tiny_dir: Path = None  # set by the test

    def __init__(self):
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="queue-model-"))
        self.ws = make_workspace(self.tmp / "ws", self.tiny_dir, training={
            "batch_size": 2, "grad_accum": 1, "save_every": 3, "max_length": 48, "learning_rate": 1e-3})
        self.files: dict[int, dict] = {}  # job id → {"path", "bytes", "lines", "epochs"}
        self.closed_runs: dict[str, dict] = {}  # run id → file hashes when a new identity left it
        self.step_seen = 0
        self.n_added = 0
        self.log: list[str] = []

    def teardown(self):
        """Every sequence ends with a clean start: whatever is left trains to its end, exactly."""
        if self.files:
            self.run_drain(None, None)
            self.laws_hold()
            self._ledger_covers_every_trained_step()
        STATS["sequences"] += 1
        STATS["steps trained"] += self._global_step()
        STATS["jobs"] += len(self.files)
        STATS["done"] += sum(j["state"] == "done" for j in self._jobs())
        STATS["interrupted"] += sum(j["state"] == "interrupted" for j in self._jobs())
        STATS["skipped"] += sum(j["state"] == "skipped" for j in self._jobs())
        shutil.rmtree(self.tmp, ignore_errors=True)

    # rules -----------------------------------------------------------------------------------------
    @initialize(n=st.integers(1, 14), fmt=st.sampled_from(["text", "prompt", "pairs"]))
    def first_file(self, n, fmt):
        self.add(n, fmt, "normal", 1)

    @rule(n=st.integers(1, 14), fmt=st.sampled_from(["text", "prompt", "pairs"]),
          priority=st.sampled_from(["high", "normal", "low"]), epochs=st.sampled_from([1, 1, 2]))
    def add(self, n, fmt, priority, epochs):
        self.n_added += 1
        path = _write(self.tmp / f"f{self.n_added}.jsonl", n, fmt, f"f{self.n_added}")
        r = run_cli(self.ws, "add", path, "--priority", priority, "--epochs", str(epochs))
        assert r.code == 0, r.out + r.err
        job_id = max(j["id"] for j in self._jobs())
        self.files[job_id] = {"path": path, "bytes": path.read_bytes(), "lines": n, "epochs": epochs}

    KILLS = st.tuples(st.sampled_from(["step", "checkpoint-write", "checkpoint-renamed"]), st.integers(1, 4))
    REQUESTS = st.tuples(st.sampled_from(["stop", "skip", "pause,resume"]), st.integers(1, 4))

    @rule()
    def restart(self):
        self.run_drain(None, None)

    def _waiting(self) -> bool:
        return any(j["state"] in ("queued", "interrupted") for j in self._jobs())

    @precondition(lambda self: self._waiting())
    @rule(kill=KILLS)
    def restart_killed(self, kill):
        self.run_drain(kill, None)

    @rule(request=REQUESTS)
    def restart_with_request(self, request):
        self.run_drain(None, request)

    @precondition(lambda self: self._waiting())
    @rule(kill=KILLS, request=REQUESTS)
    def restart_with_request_then_killed(self, kill, request):
        self.run_drain(kill, request)

    def run_drain(self, kill, request):
        """A (re)start: `run --drain`, perhaps SIGKILLed at a failpoint or asked to stop/skip/pause at a step
        a few steps ahead of where the run stands."""
        env = {}
        at = self._global_step()
        if kill:
            env["CONVEYOR_FAILPOINT"] = f"{kill[0]}:{at + self._kill_offset(*kill)}"
        if request:
            env["CONVEYOR_TEST_REQUESTS"] = ",".join(f"{a}@{at + request[1]}" for a in request[0].split(","))
        before = self._active_run()
        snapshot = _tree_hashes(self.ws / "runs" / before) if before else None
        code = drain(self.ws, env)
        self.log.append(f"drain {env} → {code}")
        if before and self._active_run() != before:  # this start left the old run: it must never change again
            self.closed_runs[before] = snapshot
        STATS.update({"drains": 1, "killed": code == -9, "requests": bool(request)})
        # 75: a stop ended the drain with jobs waiting (it says so; `train && export` must not go on)
        stopped = code == 75 and request is not None and request[0] == "stop" and self._waiting()
        assert code in (0, -9) or stopped, f"run --drain exited {code}"
        if code == 0 and not request:
            assert not [j for j in self._jobs() if j["state"] in ("queued", "interrupted", "running")], self._jobs()

    @precondition(lambda self: any(j["state"] in ("queued", "interrupted") for j in self._jobs()))
    @rule(data=st.data(), cut=st.sampled_from([None, None, "remove-copied", "remove-committed"]))
    def remove(self, data, cut):
        """Remove a waiting job, perhaps SIGKILLed mid-way first (then the next command finishes or undoes it)."""
        waiting = [j for j in self._jobs() if j["state"] in ("queued", "interrupted")]
        job = data.draw(st.sampled_from(waiting))
        if cut:
            assert killed(self.ws, f"{cut}:{job['id']}", "queue", "remove", str(job["id"])) == -9
            STATS.update({"cut commands": 1})
            if cut == "remove-committed":  # it went through: the next command only puts its kept copy in place
                assert run_cli(self.ws, "status", "--json").code == 0
                assert not list((self.ws / "removed").glob(".tmp-*"))
                return
        r = run_cli(self.ws, "queue", "remove", str(job["id"]), "--reason", "model test")
        assert r.code == 0, r.out + r.err

    @rule(lr=st.sampled_from([1e-3, 5e-4]), save_every=st.integers(1, 5), epochs=st.integers(1, 2),
          batch=st.sampled_from([1, 2, 3]))
    def change_settings(self, lr, save_every, epochs, batch):
        self._edit(lambda c: (setattr(c.training, "learning_rate", lr), setattr(c.training, "save_every", save_every),
                              setattr(c.training, "epochs", epochs), setattr(c.training, "batch_size", batch)))

    @rule(holdout=st.sampled_from([0, 1, 2]), replay=st.sampled_from([0.0, 0.25, 0.5]))
    def change_forgetting(self, holdout, replay):
        """Held-out examples and replay for the jobs planned from now on (a job under way keeps its own)."""
        self._edit(lambda c: (setattr(c.eval, "holdout", holdout), setattr(c.replay, "fraction", replay)))

    CUTS = st.sampled_from([None, None, "rollback-begun", "rollback-copied", "rollback-sealed",
                            "rollback-committed", "rollback-renamed"])

    @precondition(lambda self: self._versions_kept())
    @rule(data=st.data(), requeue=st.booleans(), cut=CUTS)
    def rollback(self, data, requeue, cut):
        """A new run from a kept version; every run's folder stays as it was (the one left, and the others)."""
        self._rollback(data.draw(st.sampled_from(self._versions_kept())), requeue, cut)

    @precondition(lambda self: self._versions_kept(later_jobs=True))
    @rule(data=st.data(), cut=CUTS)
    def rollback_requeue(self, data, cut):
        """Back to a version that later jobs followed, queueing them again."""
        self._rollback(data.draw(st.sampled_from(self._versions_kept(later_jobs=True))), True, cut)

    def _rollback(self, version: str, requeue: bool, cut: str | None = None) -> None:
        """A rollback, perhaps SIGKILLed at one of its steps first and then retried (law 2: a retry after a cut
        never queues a file twice)."""
        before = {p.name: _tree_hashes(p) for p in (self.ws / "runs").iterdir() if p.is_dir()}
        if cut:
            step = next(v["step"] for v in json.loads(run_cli(self.ws, "versions", "--json").out)
                        if v["version"] == version)
            # 0: the rollback had nothing to do (the active run already branches there) and never reached the cut
            assert killed(self.ws, f"{cut}:{step}", "rollback", version, *(["--requeue"] if requeue else [])) in (0, -9)
            STATS.update({"cut commands": 1})
        r = run_cli(self.ws, "rollback", version, *(["--requeue"] if requeue else []), "--json")
        assert r.code == 0, r.out + r.err
        got = json.loads(r.out)
        for x in got["requeued"]:
            self.files[x["job"]] = self.files[x["from"]]
        for run_id, hashes in before.items():  # every run but the one training goes on in (a retried rollback
            if run_id != got["run"]:            # that had gone through keeps the run it made)
                self.closed_runs.setdefault(run_id, hashes)
        STATS.update({"rollbacks": 1, "requeued": len(got["requeued"])})

    @rule()
    def change_lora_rank(self):
        """A new identity: the next start that trains makes a new run (see run_drain)."""
        self._edit(lambda c: setattr(c.adapter, "r", 4 if c.adapter.r == 8 else 8))

    # the laws, after every rule --------------------------------------------------------------------
    @invariant()
    def laws_hold(self):
        STATS["operations"] += 1
        con = sqlite3.connect(self.ws / "conveyor.db")
        con.row_factory = sqlite3.Row
        try:
            self._check(con)
        finally:
            con.close()

    def _check(self, con):
        jobs = {r["id"]: dict(r) for r in con.execute("SELECT * FROM jobs")}
        runs = {r["id"]: dict(r) for r in con.execute("SELECT * FROM runs")}
        seed = load_config(self.ws / "conveyor.toml").training.seed
        for run_id in runs:
            audit = self._lineage_audit(con, run_id, runs)
            # Law 1: global steps are contiguous and increasing from 1 (along a rollback's lineage).
            assert [s for s, _, _, _ in audit] == list(range(1, len(audit) + 1)), (run_id, [a[0] for a in audit])
            origin = lambda j: origin(jobs[j]["requeued_from"]) if jobs[j]["requeued_from"] else j  # noqa: E731
            for first in {origin(j) for _, j, _, _ in audit}:
                mine = [a for a in audit if origin(a[1]) == first]
                here = [j for j in jobs.values() if origin(j["id"]) == first and j["run_id"] == run_id]
                self._check_job(here[-1] if here else jobs[mine[-1][1]], [x for a in mine for x in a[2]], seed,
                                run_id, [a[0] for a in mine])
                self._check_replay(jobs, [x for a in mine for x in a[3]], first)
            own = [(s, j, lines) for s, j, lines, _ in audit if s > self._branch_step(con, runs[run_id])]
            self._check_ledger(con, run_id, own, jobs)
        for run_id, hashes in self.closed_runs.items():
            assert _tree_hashes(self.ws / "runs" / run_id) == hashes, f"{run_id} changed after a new run began"
        for job_id, f in self.files.items():  # law 6: the person's file is untouched and a verified copy is kept
            assert f["path"].read_bytes() == f["bytes"]
            assert Path(jobs[job_id]["stored"]).read_bytes() == f["bytes"]
        assert not [j for j in jobs.values() if j["state"] == "failed"], "a job failed"

    def _check_job(self, job, lines, seed, run_id, steps):
        """Law 2: a job's own lines, in the order trained, are exactly the start of its planned order over its
        trained (not held-out) examples: no line skipped, repeated or reordered, whatever stopped it; all of
        them once it is done. Held-out lines are never trained."""
        f = self.files[job["id"]]
        held = set(json.loads(job["holdout"] or "[]"))
        trained = [line for line in range(1, f["lines"] + 1) if line not in held]
        order = JobOrder(seed, job["fingerprint"], len(trained), f["epochs"])
        planned = [trained[order[p][1]] for p in range(len(order))]
        assert lines == planned[:len(lines)], (job["id"], run_id, lines, planned)
        if job["state"] == "done" and job["run_id"] == run_id:
            assert Counter(lines) == Counter({line: f["epochs"] for line in trained})
            assert len(steps) == job["planned_steps"], (job["id"], len(steps), job["planned_steps"])

    def _check_replay(self, jobs, replayed, job_id):
        """Replayed examples come from other jobs' trained examples, never held-out ones, and none repeats
        while the pool (at least the examples of the jobs seen drawn from) is not used up."""
        pool = 0
        for src in {s for s, _ in replayed}:
            assert src != job_id, (job_id, replayed)
            held = set(json.loads(jobs[src]["holdout"] or "[]"))
            assert not [line for s, line in replayed if s == src and (line in held or
                                                                     line > self.files[src]["lines"])]
            pool += self.files[src]["lines"] - len(held)
        if len(replayed) <= pool:
            assert len({tuple(x) for x in replayed}) == len(replayed), (job_id, replayed)
        STATS["replayed"] += len(replayed)

    def _lineage_audit(self, con, run_id: str, runs: dict) -> list[tuple]:
        """(step, job, own lines, replayed [job, line]s) of the run, after its parent's up to the version it
        branched from (a rollback's run), and so on up."""
        rows = [(r["step"], r["job_id"], json.loads(r["lines"]), json.loads(r["replay"] or "[]"))
                for r in con.execute("SELECT * FROM audit WHERE run_id = ? ORDER BY step", (run_id,))]
        run = runs[run_id]
        if not run["parent_run"]:
            return rows
        bound = self._branch_step(con, run)
        return [a for a in self._lineage_audit(con, run["parent_run"], runs) if a[0] <= bound] + rows

    @staticmethod
    def _branch_step(con, run: dict) -> int:
        if not run["parent_version"]:
            return 0
        return con.execute("SELECT step FROM versions WHERE id = ?", (run["parent_version"],)).fetchone()[0]

    def _check_ledger(self, con, run_id, audit, jobs):
        """Ledger rows (not lost) cover trained steps without overlap, each within one job's steps; every step
        of a finished or stopped segment is covered."""
        rows = con.execute("SELECT * FROM ledger WHERE run_id = ? AND outcome != 'lost' ORDER BY start_step",
                           (run_id,)).fetchall()
        owner = {s: j for s, j, _ in audit}
        covered = []
        for r in rows:
            steps = list(range(r["start_step"], r["end_step"] + 1))
            assert all(owner.get(s) == r["job_id"] for s in steps), (run_id, dict(r))
            covered += steps
        assert covered == sorted(set(covered)), f"ledger rows overlap in {run_id}"
        open_steps = {s for s, j, _ in audit if jobs[j]["state"] == "running"}
        segment_steps = {s for s, j, _ in audit if jobs[j]["state"] == "interrupted"
                         and s >= (jobs[j]["segment_start"] or 0) and jobs[j]["run_id"] == run_id}
        for s, j, _ in audit:
            if s not in covered and s not in open_steps:
                # Steps after the newest checkpoint may be in the audit until the next start rewinds them.
                assert s > self._newest_checkpoint(run_id) or s in segment_steps, (run_id, s, j, jobs[j]["state"])

    def _ledger_covers_every_trained_step(self):
        """After a clean end: in every run, the ledger rows (not lost) cover exactly the audited steps."""
        con = sqlite3.connect(self.ws / "conveyor.db")
        try:
            for (run_id,) in con.execute("SELECT id FROM runs").fetchall():
                audited = [r[0] for r in con.execute("SELECT step FROM audit WHERE run_id = ? ORDER BY step",
                                                     (run_id,))]
                covered = sorted(s for a, b in con.execute(
                    "SELECT start_step, end_step FROM ledger WHERE run_id = ? AND outcome != 'lost'", (run_id,))
                    for s in range(a, b + 1))
                assert covered == audited, (run_id, covered, audited)
        finally:
            con.close()

    # helpers ---------------------------------------------------------------------------------------
    def _jobs(self) -> list[dict]:
        con = sqlite3.connect(self.ws / "conveyor.db")
        con.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in con.execute("SELECT * FROM jobs ORDER BY id")]
        finally:
            con.close()

    def _kill_offset(self, where: str, k: int) -> int:
        """Steps ahead of the newest checkpoint where the kill lands inside the work left: anywhere for a
        step kill; at the end of the next job (always a checkpoint) for a kill while writing a checkpoint."""
        config = load_config(self.ws / "conveyor.toml").training
        per_step = config.batch_size * config.grad_accum
        left = [(j["planned_steps"] - j["steps_done"]) if j["planned_steps"] else
                -(-self.files[j["id"]]["lines"] * self.files[j["id"]]["epochs"] // per_step)
                for j in sorted((j for j in self._jobs() if j["state"] in ("queued", "interrupted")),
                                key=lambda j: (j["priority"], j["state"] != "interrupted", j["id"]))]
        if where == "step":
            return 1 + (k - 1) % max(sum(left), 1)
        return max(left[0], 1) if left else k

    def _versions_kept(self, later_jobs: bool = False) -> list[str]:
        """Versions whose checkpoint still exists (retention keeps the newest job ends); with later_jobs, only
        those after which their run finished another job."""
        con = sqlite3.connect(self.ws / "conveyor.db")
        try:
            rows = con.execute("SELECT id, run_id, step, (SELECT COUNT(*) FROM jobs j WHERE j.run_id = v.run_id"
                               " AND j.state = 'done' AND j.end_step > v.step) FROM versions v WHERE lost = 0"
                               " ORDER BY id").fetchall()
        finally:
            con.close()
        return [f"v{i}" for i, run_id, step, later in rows if (not later_jobs or later)
                and (self.ws / "runs" / run_id / "checkpoints" / f"step-{step:06d}").is_dir()]

    def _active_run(self) -> str | None:
        con = sqlite3.connect(self.ws / "conveyor.db")
        try:
            row = con.execute("SELECT id FROM runs WHERE active = 1").fetchone()
            return row[0] if row else None
        finally:
            con.close()

    def _global_step(self) -> int:
        run = self._active_run()
        return self._newest_checkpoint(run) if run else 0

    def _newest_checkpoint(self, run_id: str) -> int:
        folder = self.ws / "runs" / run_id / "checkpoints"
        steps = [int(p.name.split("-")[1]) for p in folder.glob("step-*")] if folder.exists() else []
        return max(steps, default=0)

    def _edit(self, change) -> None:
        path = self.ws / "conveyor.toml"
        config = load_config(path)
        change(config)
        path.write_text(render_config(config), encoding="utf-8")
