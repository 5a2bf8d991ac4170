"""conveyor/queue/process.py: warm worker processes handed a job or an end of input, run_worker's own side, exit
codes (report.EXIT_CODES), and the guard that makes a child die with its parent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ledger, make_workspace, run_cli, text_file

from conveyor.queue import process
from conveyor.store import jobs
from conveyor.store.jobs import JobState
from conveyor.store.reconcile import place
from conveyor.store.workspace import Workspace
from conveyor.train.report import EXIT_CODES, Outcome

GUARDED = "from conveyor.queue.process import die_with_parent; die_with_parent(); print('alive', flush=True)"


def _wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (found := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {timeout} s")
        time.sleep(0.05)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _catches(pid: int, sig: int) -> bool:
    """Whether the process has a handler installed for `sig` (SigCgt in /proc/PID/status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = next(int(line.split()[1], 16) for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(mask >> (sig - 1) & 1)


def _claimed(root: Path, source: Path) -> tuple[Workspace, jobs.Job]:
    """A workspace with a run and job 1 (a.jsonl) claimed by "the-daemon", as the daemon leaves it for a worker."""
    assert run_cli(root, "add", source).code == 0
    ws = Workspace.open(root)
    config = ws.config()
    place(ws, config, ws.model_path(config.model.name), lambda level, text: None)
    job = jobs.claim_next(ws.db, "the-daemon")
    assert (job.id, job.state) == (1, JobState.RUNNING)
    return ws, job


@pytest.fixture
def claimed(workspace, tmp_path) -> tuple[Workspace, jobs.Job]:
    return _claimed(workspace(), text_file(tmp_path / "a.jsonl", 16, "a"))


def _untouched(ws: Workspace) -> None:
    """Job 1 still running under the daemon's claim, not a step trained, no checkpoint written."""
    job = jobs.get(ws.db, 1)
    assert (job.state, job.claim, job.steps_done, job.planned_steps) == (JobState.RUNNING, "the-daemon", 0, None)
    assert ledger(ws.root) == [] and not list(ws.runs.glob("run-*/checkpoints/step-*"))


# ---- warm workers, for real


@pytest.fixture(scope="module")
def warm(tmp_path_factory, tiny_dir):
    """Two workspaces with a claimed job, each with a warm worker spawned for it; both spawned at once, so that
    their slow imports overlap. Whatever is still alive at the end is killed."""
    made = {}
    for name in ("handed", "closed"):
        root = tmp_path_factory.mktemp(name)
        ws = make_workspace(root / "ws", tiny_dir, training={"batch_size": 4, "grad_accum": 2, "save_every": 2,
                                                              "max_length": 64})
        made[name] = _claimed(ws, text_file(root / "a.jsonl", 16, "a"))
    workers = {name: process.spawn_warm(str(ws.root)) for name, (ws, _) in made.items()}
    yield {name: (*made[name], workers[name]) for name in made}
    for worker in workers.values():
        if worker.poll() is None:
            worker.kill()
            worker.popen.wait(timeout=30)


def test_a_warm_worker_trains_the_job_it_is_handed_with_the_handed_settings_and_exits_0(warm):
    """A warm worker trains its handed job with the handed settings to the end and exits 0 (DONE)."""
    ws, job, worker = warm["handed"]
    config = ws.config()
    config.training.batch_size = 8  # 16 examples: one step of 8 × 2 (conveyor.toml's 4 × 2 would plan two)
    assert worker.warm and worker.pid == worker.popen.pid
    worker.hand(job.id, job.claim, config.model_dump())
    assert not worker.warm and worker.popen.stdin.closed
    assert worker.popen.wait(timeout=180) == EXIT_CODES[Outcome.DONE] == 0
    done = jobs.get(ws.db, 1)
    assert (done.state, done.planned_steps, done.start_step, done.end_step, done.steps_done) == (JobState.DONE, 1, 1,
                                                                                              1, 1)
    assert [(x["job"], x["start_step"], x["end_step"], x["outcome"]) for x in ledger(ws.root)] == [(1, 1, 1, "done")]


def test_a_warm_worker_survives_a_warm_stop_and_exits_0_untrained_at_end_of_input(warm):
    """A SIGTERM while it waits is not fatal; end of input then ends it with 0 and nothing trained."""
    ws, _, worker = warm["closed"]
    _wait_for(lambda: _catches(worker.pid, signal.SIGTERM) or worker.poll() is not None, 120,
              "SIGTERM handler in the warm worker")
    worker.warm_stop()
    worker.close(timeout=120)
    assert worker.returncode == 0
    _untouched(ws)


# ---- WorkerProcess with stand-in processes


def _stand_in(code: str) -> process.WorkerProcess:
    popen = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, text=True, start_new_session=True)
    return process.WorkerProcess(popen, warm=True)


def test_close_gives_a_warm_process_end_of_input():
    """A warm worker's close is EOF on its stdin: a process reading to the end exits by itself."""
    worker = _stand_in("import sys; sys.exit(len(sys.stdin.read()))")
    worker.close(timeout=30)
    assert worker.returncode == 0


def test_close_kills_a_handed_worker_still_running_after_the_timeout():
    """A worker that was handed its job gets no EOF; alive after the timeout, its group is SIGKILLed."""
    worker = _stand_in("import signal; signal.pause()")
    worker.hand(1, "c", {})
    worker.close(timeout=0.2)
    assert worker.returncode == -signal.SIGKILL


def test_hand_to_a_worker_that_died_waiting_leaves_its_exit_code_to_say_so():
    """Handing a job to a dead worker does not raise; its exit code is what the daemon reads."""
    worker = _stand_in("import sys; sys.exit(3)")
    worker.popen.wait(timeout=30)
    worker.hand(1, "c", {"x": 1})
    assert not worker.warm and worker.poll() == 3 == EXIT_CODES[Outcome.FAILED]


def test_the_handed_order_is_one_json_line_then_end_of_input(tmp_path):
    """What a warm worker reads: {"job", "claim", "config"} as one JSON line, then end of input."""
    got = tmp_path / "read.txt"
    worker = _stand_in(f"import sys; open({str(got)!r}, 'w').write(sys.stdin.read())")
    worker.hand(4, "abc", {"training": {"batch_size": 2}})
    worker.close(timeout=30)
    assert worker.returncode == 0
    assert got.read_text() == '{"job": 4, "claim": "abc", "config": {"training": {"batch_size": 2}}}\n'


def test_the_exit_codes_are_distinct_and_map_back_to_outcomes():
    """Every outcome has its own code, DONE is 0, and a code maps back to its outcome (a signal to none)."""
    assert EXIT_CODES[Outcome.DONE] == 0 and len(set(EXIT_CODES.values())) == len(EXIT_CODES) == len(Outcome)
    assert all(Outcome.from_code(code) == outcome for outcome, code in EXIT_CODES.items())
    assert Outcome.from_code(-signal.SIGKILL) is None and Outcome.from_code(1) is None


# ---- run_worker in this process


@pytest.fixture
def worker_side(monkeypatch):
    """run_worker in this process: no death signal for the test process, signal handlers recorded, not set."""
    handlers: dict[int, object] = {}
    monkeypatch.setattr(process, "die_with_parent", lambda: None)
    monkeypatch.setattr(signal, "signal", lambda sig, handler: handlers.__setitem__(sig, handler))
    for name in ("CONVEYOR_CONFIG_JSON", "RANK", "WORLD_SIZE", "CONVEYOR_ATTEMPT"):
        monkeypatch.delenv(name, raising=False)
    return handlers


def test_run_worker_without_a_job_recovers_first_and_exits_0_at_end_of_input(workspace, worker_side, monkeypatch):
    """A warm worker finishes or undoes a cut-off command before it waits; no job (the daemon closing): 0."""
    ws = Workspace.open(workspace())
    left = ws.root / "exports" / ".merged.tmp-1"
    left.mkdir(parents=True)
    (ws.root / ".pending").mkdir()
    (ws.root / ".pending" / "export-1-1.json").write_text(json.dumps(
        {"kind": "export", "pid": 1, "at": 0, "tmp": str(left), "out": str(ws.root / "exports" / "merged")}))
    waited = []
    monkeypatch.setattr(process, "wait_for_job", lambda: waited.append(left.exists()) and None)
    assert process.run_worker(ws.root, None, None) == 0
    assert waited == [False] and not list((ws.root / ".pending").iterdir())
    assert signal.SIGTERM in worker_side  # a warm stop is caught from the start


def test_run_worker_with_a_job_not_under_its_claim_trains_nothing_and_exits_not_mine(claimed, worker_side,
                                                                                     monkeypatch):
    """--job under another claim: NOT_MINE's code, nothing trained, the job left to its owner, the reason logged."""
    ws, job = claimed
    monkeypatch.setattr(process, "wait_for_job", lambda: pytest.fail("a worker given its job waited for one"))
    code = process.run_worker(ws.root, job.id, "someone-else")
    assert code == EXIT_CODES[Outcome.NOT_MINE] == 7
    _untouched(ws)
    said = [r["message"] for r in ws.db.execute("SELECT message FROM events WHERE level = 'warning'")]
    assert said == ["worker for job 1: job 1 is running, not running under this worker's claim"]


def test_a_warm_stop_during_start_up_stops_the_handed_job(claimed, worker_side, monkeypatch):
    """A SIGTERM while waiting stops the job handed next before its first step (STOPPED); it stays queued."""
    ws, job = claimed

    def sigterm_then_order():
        worker_side[signal.SIGTERM](signal.SIGTERM, None)
        return {"job": job.id, "claim": job.claim, "config": ws.config().model_dump()}

    monkeypatch.setattr(process, "wait_for_job", sigterm_then_order)
    assert process.run_worker(ws.root, None, None) == EXIT_CODES[Outcome.STOPPED] == 5
    stopped = jobs.get(ws.db, 1)
    assert (stopped.state, stopped.steps_done, stopped.deaths) == (JobState.QUEUED, 0, 0)
    assert ledger(ws.root) == []
    said = [r["message"] for r in ws.db.execute("SELECT message FROM events WHERE kind = 'message'")]
    assert said == ["stopped (SIGTERM) before job 1 trained a step; it stays queued"]


def test_wait_for_job_reads_one_order_or_none(monkeypatch):
    """One JSON line is the order (nothing after it is read); a blank line or end of input is None."""
    import io
    import types

    monkeypatch.setattr("gc.freeze", lambda: None)
    for name in ("peft", "transformers.trainer", "conveyor.train.trainer"):  # the slow imports, if not done yet
        if name not in sys.modules:
            monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    order = {"job": 3, "claim": "abc", "config": {"training": {"batch_size": 2}}}
    stdin = io.StringIO(json.dumps(order) + "\nnot read\n")
    monkeypatch.setattr("sys.stdin", stdin)
    assert process.wait_for_job() == order and stdin.read() == "not read\n"
    for text in ("", "\n", "   \n"):
        monkeypatch.setattr("sys.stdin", io.StringIO(text))
        assert process.wait_for_job() is None


# ---- die_with_parent and the guard


def _python(code: str, env: dict | None = None, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60,
                          env={**{k: v for k, v in os.environ.items() if k != process.PARENT_ENV}, **(env or {})})


def test_die_with_parent_exits_at_once_when_its_parent_is_already_gone():
    """The parent named in CONVEYOR_PARENT_PID is not this process's parent (it died before prctl): exit 1."""
    assert _python(GUARDED, {process.PARENT_ENV: str(os.getpid())}).stdout == "alive\n"
    assert _python(GUARDED).stdout == "alive\n"  # no parent named: the death signal alone
    gone = _python(GUARDED, {process.PARENT_ENV: "1"})
    assert (gone.returncode, gone.stdout) == (1, "")


def test_a_guarded_child_dies_with_its_parent(tmp_path):
    """PR_SET_PDEATHSIG: SIGKILL the parent and its guarded child goes too."""
    pid_file = tmp_path / "child.pid"
    child = (f"{GUARDED}\nimport os, signal\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\nsignal.pause()")
    parent = subprocess.Popen([sys.executable, "-c", "import os, signal, subprocess, sys\n"
                               f"subprocess.Popen([sys.executable, '-c', {child!r}], stdout=subprocess.DEVNULL,\n"
                               f"                 env={{**os.environ, {process.PARENT_ENV!r}: str(os.getpid())}})\n"
                               "signal.pause()"], start_new_session=True)
    pid = None
    try:
        pid = int(_wait_for(lambda: pid_file.exists() and pid_file.read_text(), 60, "guarded child"))
        assert _alive(pid)
        parent.kill()
        parent.wait(timeout=30)
        _wait_for(lambda: not _alive(pid), 30, "death of the guarded child")
    finally:
        parent.kill()
        parent.wait(timeout=30)
        if pid and _alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_the_guard_sets_the_parent_then_becomes_the_command():
    """The guard execs the command in its own process and names itself the parent of what the command starts."""
    shown = "import os; print(os.environ['CONVEYOR_PARENT_PID'] == str(os.getpid()))"
    p = _python("import os, subprocess, sys\n"
                "p = subprocess.run([sys.executable, '-m', 'conveyor.queue.process', str(os.getpid()), '--',\n"
                "                    sys.executable, '-c', sys.argv[1]], capture_output=True, text=True)\n"
                "print(p.returncode, p.stdout.strip())", None, shown)
    assert p.stdout == "0 True\n", p.stderr


def test_the_guard_refuses_a_command_line_without_the_separator_or_the_command():
    """Usage errors: the usage line, exit 1; a parent that is not the guard's: exit 1 before running anything."""
    usage = "usage: python -m conveyor.queue.process PARENT_PID -- COMMAND...\n"
    for args in (["12", "--"], ["12", "x", "/bin/echo", "hi"]):
        p = subprocess.run([sys.executable, "-m", "conveyor.queue.process", *args], capture_output=True, text=True,
                           timeout=60)
        assert (p.returncode, p.stdout, p.stderr) == (1, "", usage), args
    p = subprocess.run([sys.executable, "-m", "conveyor.queue.process", "1", "--", "/bin/echo", "hi"],
                       capture_output=True, text=True, timeout=60)
    assert (p.returncode, p.stdout) == (1, "")


def test_the_guard_gives_the_usage_line_for_a_bare_call():
    """`python -m conveyor.queue.process` alone: the usage line, not a traceback."""
    p = subprocess.run([sys.executable, "-m", "conveyor.queue.process"], capture_output=True, text=True, timeout=60)
    assert (p.returncode, p.stderr) == (1, "usage: python -m conveyor.queue.process PARENT_PID -- COMMAND...\n")
