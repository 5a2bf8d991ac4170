"""Jobs on several nodes (launch.py, attempt.py): the agents' command lines per launcher, the hosts check, the
shared-workspace proof, the watchdog; then, through the real CLI on CPU with gloo, two nodes on one machine, a
node lost mid-job, a host that does not see the workspace, and the ssh launcher against a real OpenSSH server."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import adapter_weights, audit, ledger, max_abs_diff, run_cli, status, text_file

from conveyor.config import DistributedConfig
from conveyor.queue import launch
from conveyor.queue.attempt import Attempt, join_attempt, shared_problem
from conveyor.store.lock import Lock, daemon_pid
from conveyor.store.workspace import Workspace


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _d(**kw) -> DistributedConfig:
    return DistributedConfig(**{"rdzv_port": 29411, "timeout_seconds": 40, **kw})


# Command lines ---------------------------------------------------------------------------------------------------
def test_each_agent_is_torchrun_with_a_fixed_node_count_and_its_own_node_rank(tmp_path):
    attempt = Attempt.create(tmp_path, 3, {})
    d = _d(hosts=["head", "n1", "n2"], nproc_per_node=2)
    argv = launch.agent_argv(attempt, 2, "n2", ["head", "n1", "n2"], d, 3, "abc", 2.0)
    agent, torchrun = argv[: argv.index("--")], argv[argv.index("--") + 1:]
    assert agent[1:4] == ["-m", "conveyor.queue.launch", "agent"] and agent[agent.index("--nonce") + 1] == attempt.nonce
    assert torchrun[1:3] == ["-m", "torch.distributed.run"]
    for flag in ("--nnodes=3", "--node-rank=2", "--rdzv-backend=static", "--rdzv-endpoint=head:29411",
                 "--rdzv-conf=timeout=40", "--nproc-per-node=2", "--max-restarts=0"):
        assert flag in torchrun
    assert torchrun[-8:] == ["conveyor", "-w", str(tmp_path), "worker", "--job", "3", "--claim", "abc"]
    # torchrun itself accepts these flags (its parser, not a copy of it)
    from torch.distributed.run import get_args_parser

    parsed = get_args_parser().parse_args(torchrun[3:])
    assert (parsed.nnodes, parsed.node_rank, parsed.rdzv_backend, parsed.max_restarts) == ("3", 2, "static", 0)
    one = launch.agent_argv(attempt, 0, "head", ["head"], d, 3, "abc", 2.0)
    assert "--standalone" in one and not any(a.startswith("--node-rank") for a in one)


def test_ssh_runs_the_agent_in_the_workspace_with_the_forwarded_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(launch.SSH_ENV, "ssh -F /etc/cluster.conf")
    d = _d(hosts=["head", "n1"], launcher="ssh")
    argv = ["/venv/bin/python", "-m", "conveyor.queue.launch", "agent", "--host", "n 1"]
    env = {"CONVEYOR_TEST_STEP_SECONDS": "1", "NCCL_DEBUG": "INFO", "HOME": "/root", "CONVEYOR_PARENT_PID": "9"}
    command = launch.host_command(d, "n1", 1, argv, Path("/shared/my ws"), env)
    assert command[:3] == ["ssh", "-F", "/etc/cluster.conf"] and "BatchMode=yes" in command
    assert "ServerAliveInterval=10" in command and command[-2] == "n1"
    remote = shlex.split(command[-1])
    assert remote[:5] == ["cd", "/shared/my ws", "&&", "exec", "env"]
    assert remote[5:7] == ["CONVEYOR_TEST_STEP_SECONDS=1", "NCCL_DEBUG=INFO"] and remote[7:] == argv
    assert launch.host_command(d, "head", 0, argv, Path("/ws"), env) == argv  # node 0 runs beside the daemon


def test_slurm_runs_each_agent_as_a_one_task_step_on_its_node():
    d = _d(hosts=["node01", "node02"], launcher="slurm")
    argv = ["/venv/bin/python", "-m", "conveyor.queue.launch", "agent"]
    assert launch.host_command(d, "node02", 1, argv, Path("/lustre/ws")) == [
        "srun", "--nodes=1", "--ntasks=1", "-w", "node02", "--chdir=/lustre/ws", "--export=ALL", *argv]
    assert launch.host_command(d, "node01", 0, argv, Path("/lustre/ws")) == argv


def test_the_first_host_must_be_this_machine_and_reachable_by_the_others():
    me = socket.gethostname()
    assert launch.hosts_problem(_d()) is None
    assert launch.hosts_problem(_d(hosts=["localhost", "localhost"])) is None
    assert launch.hosts_problem(_d(hosts=[me, "gpu7.invalid"], launcher="ssh")) is None
    problem = launch.hosts_problem(_d(hosts=["gpu7.invalid", me], launcher="ssh"))
    assert "distributed.hosts" in problem and "'gpu7.invalid'" in problem and me in problem
    problem = launch.hosts_problem(_d(hosts=["localhost", "gpu7.invalid"]))
    assert 'launcher = "local"' in problem and "gpu7.invalid" in problem
    problem = launch.hosts_problem(_d(hosts=["localhost", "gpu7.invalid"], launcher="ssh"))
    assert "'localhost', is a loopback name" in problem and repr(me) in problem
    assert launch.hosts_problem(_d(hosts=["localhost", "127.0.0.1", me], launcher="ssh")) is None
    assert launch.world_size(_d(hosts=["a", "b"], nproc_per_node=3)) == 6 and launch.world_size(_d()) == 1


def test_a_daemon_refuses_a_first_host_that_is_not_this_machine(workspace):
    ws = workspace(distributed={"hosts": ["gpu7.invalid", "localhost"], "launcher": "ssh"})
    r = run_cli(ws, "run", "--drain")
    assert r.code == 1 and "distributed.hosts" in r.out + r.err and "gpu7.invalid" in r.out + r.err


# The shared workspace ---------------------------------------------------------------------------------------------
def test_a_host_that_does_not_see_the_workspace_is_named_with_the_path(tmp_path, monkeypatch):
    attempt = Attempt.create(tmp_path, 1, {"x": 1})
    assert shared_problem(attempt.folder, attempt.nonce, "n1", 1) is None
    assert "another attempt's nonce" in shared_problem(attempt.folder, "0" * 32, "n1", 1, wait=0)
    monkeypatch.setenv("CONVEYOR_TEST_NOT_SHARED", "1")
    problem = shared_problem(attempt.folder, attempt.nonce, "n1", 1, wait=0)
    assert problem.startswith("host n1 (node 1) does not see the workspace") and str(tmp_path) in problem
    assert f"mount it at {tmp_path} on n1" in problem
    assert shared_problem(attempt.folder, attempt.nonce, "head", 0, wait=0) is None
    probe = subprocess.run([sys.executable, "-m", "conveyor.queue.launch", "probe", "--attempt", str(attempt.folder),
                            "--nonce", attempt.nonce, "--host", "n1", "--node", "1"], capture_output=True, text=True)
    assert probe.returncode == launch.NOT_SHARED and "does not see the workspace" in probe.stderr


def test_a_rank_beats_and_ends_itself_once_its_attempt_is_over(tmp_path):
    attempt = Attempt.create(tmp_path, 1, {})
    env = {**os.environ, "CONVEYOR_ATTEMPT": str(attempt.folder), "CONVEYOR_NONCE": attempt.nonce, "RANK": "3",
           "CONVEYOR_BEAT_SECONDS": "0.2"}
    rank = subprocess.Popen([sys.executable, "-c", "import time\nfrom conveyor.queue.attempt import join_attempt\n"
                             "join_attempt()\ntime.sleep(60)"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while 3 not in attempt.beats() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert 3 in attempt.beats()
        attempt.remove()  # the daemon ended the attempt
        assert rank.wait(timeout=10) == 1 and "is over" in rank.stderr.read()
    finally:
        rank.kill()
    join_attempt()  # outside an attempt: nothing


# The watchdog -------------------------------------------------------------------------------------------------
class _Watch:
    """A Launch over stand-in agents (sleeping processes) and beats written by the test."""

    def __init__(self, tmp_path, nodes=2, timeout=1.0):
        self.attempt = Attempt.create(tmp_path, 1, {})
        self.steps, self.paused = 0, False
        agents = [launch.Agent(i, i, f"h{i}", subprocess.Popen(["sleep", "60"], start_new_session=True))
                  for i in range(nodes)]
        self.launch = launch.Launch(self.attempt, agents, 1, timeout, 0.05, lambda: (self.steps, self.paused))

    def beat(self, n):
        for rank in range(len(self.launch.agents)):
            (self.attempt.folder / f"beat-{rank}").write_text(str(n))

    def run(self, seconds, step=False):
        """Poll for `seconds`, beating (and stepping) all along; the returncode if it ended."""
        end = time.monotonic() + seconds
        n = 0
        while time.monotonic() < end:
            n += 1
            self.beat(n)
            self.steps += step
            if self.launch.poll() is not None:
                return self.launch.returncode
            time.sleep(0.05)
        return None


def test_an_agent_that_exits_ends_the_attempt_at_once_and_every_agent_is_killed(tmp_path):
    w = _Watch(tmp_path)
    assert w.run(0.3) is None
    os.kill(w.launch.agents[1].popen.pid, signal.SIGKILL)
    assert w.run(1.0) == 1
    assert w.launch.ended == "the agent on host h1 (node 1) ended (signal SIGKILL)"
    assert w.launch.agents[0].popen.poll() == -signal.SIGKILL and not w.attempt.folder.exists()
    assert w.launch.failed_to_start == set()  # it had started (it beat): it is not left out next time


@pytest.mark.slow  # the default run stays near 5 minutes; CI runs it with -m slow
def test_a_silent_rank_or_a_stalled_step_ends_the_attempt_but_a_pause_does_not(tmp_path):
    w = _Watch(tmp_path / "a")
    assert w.run(0.5) is None
    time.sleep(1.3)  # nobody beats
    assert w.launch.poll() == 1 and "rank 0 on host h0 (node 0) gave no sign of life for 1 s" in w.launch.ended

    w = _Watch(tmp_path / "b")
    assert w.run(0.5, step=True) is None  # training
    w.paused = True
    assert w.run(2.0) is None  # paused: no step, for longer than the timeout
    w.paused = False
    assert w.run(2.0) == 1 and w.launch.ended.startswith("no optimizer step for 1 s")

    w = _Watch(tmp_path / "c")
    assert w.run(2.0) is None  # before its first step an attempt is judged by its beats alone (setup may be long)
    w.launch.kill()


def test_rank_0s_outcome_is_the_attempts_code(tmp_path):
    w = _Watch(tmp_path, nodes=1)
    (w.attempt.folder / "outcome").write_text("5")  # report.Outcome.STOPPED
    os.kill(w.launch.agents[0].popen.pid, signal.SIGKILL)  # torchrun's own code says only "a rank failed"
    assert w.run(1.0) == 5 and w.launch.ended == "exit code 5"


# The lock ---------------------------------------------------------------------------------------------------------
def test_the_daemon_lock_is_its_own_module_read_by_status_and_the_daemon(tmp_path):
    from conveyor.serve import status

    assert status.daemon_pid is daemon_pid
    ws = Workspace(tmp_path)
    assert daemon_pid(ws) is None
    with Lock(ws):
        assert daemon_pid(ws) == os.getpid()
    assert daemon_pid(ws) is None


# Through the CLI: several nodes on one machine (slow) ------------------------------------------------------------
SETTINGS = {"training": {"batch_size": 1, "grad_accum": 1, "save_every": 2, "max_length": 48, "warmup_steps": 2},
            "adapter": {"dropout": 0.0}, "daemon": {"retry_backoff_seconds": 0.2, "min_free_mb": 0}}


def _nodes(hosts, nproc=1, timeout=60.0, launcher="local"):
    return {**SETTINGS, "distributed": {"hosts": hosts, "nproc_per_node": nproc, "rdzv_port": _free_port(),
                                        "timeout_seconds": timeout, "launcher": launcher}}


def _train(ws, files, env=None):
    return run_cli(ws, "train", *files, "-q", subprocess_=True, env=env)


def _every_line_once(ws, sizes: dict[int, int]) -> list[dict]:
    rows = audit(ws)
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))  # contiguous global steps
    for job, n in sizes.items():
        assert Counter(x for r in rows if r["job"] == job for x in r["lines"]) == Counter(range(1, n + 1))
    jobs = sorted(status(ws)["jobs"], key=lambda j: j["id"])
    assert all(j["state"] == "done" for j in jobs), jobs
    return rows


def _final(ws):
    folder = ws / "runs" / "run-0001" / "checkpoints"
    return adapter_weights(max(folder.glob("step-*")))


@pytest.mark.slow
def test_two_nodes_on_one_machine_train_each_line_once_with_a_one_process_runs_weights(workspace, tmp_path):
    """2 nodes × 1 process (4 processes would not fit beside the other work on this 2-core machine) against one
    process with the same examples per step: the same batches, gradients averaged by DDP."""
    files = [text_file(tmp_path / "a.jsonl", 5, "a"), text_file(tmp_path / "b.jsonl", 4, "b"),
             text_file(tmp_path / "c.jsonl", 3, "c")]
    nodes = workspace("nodes", **_nodes(["localhost", "localhost"]))
    r = _train(nodes, files)
    assert r.code == 0, r.out + r.err
    rows = _every_line_once(nodes, {1: 5, 2: 4, 3: 3})
    assert [len(r["lines"]) for r in rows] == [2, 2, 1, 2, 2, 2, 1]  # ceil(5/2), 4/2, ceil(3/2) steps
    assert not (nodes / "runs" / ".attempts").exists() or not any((nodes / "runs" / ".attempts").iterdir())

    single = workspace("single", **{**SETTINGS, "training": {**SETTINGS["training"], "batch_size": 2}})
    r = _train(single, files)
    assert r.code == 0, r.out + r.err
    assert [r["lines"] for r in audit(single)] == [r["lines"] for r in rows]  # the same batches, in the same order
    diff = max_abs_diff(_final(nodes), _final(single))
    print(f"\n2 nodes × 1 process vs 1 process: max abs weight difference {diff:.2e}")
    assert diff <= 1e-6


@pytest.mark.slow
def test_a_node_lost_mid_job_ends_the_attempt_and_the_job_resumes_exactly_once(workspace, tmp_path):
    """Node 1's agent SIGKILLed in job 1 (its exit is seen at once); then a pause longer than the timeout, which
    must not end the attempt; node 1's rank frozen by SIGSTOP in job 2 (alive but silent, as a hung host: the
    watchdog ends the attempt after distributed.timeout_seconds)."""
    import psutil

    files = [text_file(tmp_path / "a.jsonl", 32, "a"), text_file(tmp_path / "b.jsonl", 8, "b")]
    ws = workspace("lost", **_nodes(["localhost", "localhost"], timeout=20))
    env = {**os.environ, "CONVEYOR_TEST_STEP_SECONDS": "1.0", "PYTHONUNBUFFERED": "1"}
    log = open(tmp_path / "train.txt", "w")
    daemon = subprocess.Popen([sys.executable, "-m", "conveyor", "-w", str(ws), "train", *map(str, files), "-q"],
                              stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deaths = lambda: [e for e in _events(ws) if "worker died" in e["message"]]  # noqa: E731
    try:
        first = _wait_for(lambda: _agents(ws, 1) if _steps(ws) >= 3 else None, 300, "step 3 of job 1")
        killed_at = time.time()
        os.kill(first[1]["pid"], signal.SIGKILL)  # node 1's torchrun agent (its rank dies with it)
        _wait_for(lambda: (_agents(ws, 1) or first) != first and _steps(ws) >= 6, 300, "step 6, relaunched")
        r = run_cli(ws, "pause")
        assert r.code == 0 and "paused job 1 at global step" in r.out, r.out + r.err
        paused_at = _steps(ws)
        time.sleep(25)  # longer than distributed.timeout_seconds: a pause holds every rank at a collective
        assert len(deaths()) == 1 and _steps(ws) == paused_at
        assert run_cli(ws, "resume").code == 0
        agents = _wait_for(lambda: _agents(ws, 2) if _steps(ws) >= 18 else None, 300, "step 18, in job 2")
        rank = psutil.Process(agents[1]["pid"]).children()[0]
        frozen_at = time.time()
        rank.suspend()  # SIGSTOP: the process is there, says nothing, and holds every collective
        assert daemon.wait(timeout=600) == 0, (tmp_path / "train.txt").read_text()
    finally:
        if daemon.poll() is None:
            os.killpg(daemon.pid, signal.SIGKILL)
    said = deaths()
    assert len(said) == 2, said
    assert "the agent on host localhost (node 1) ended (signal SIGKILL)" in said[0]["message"]
    assert ("rank 1 on host localhost (node 1) gave no sign of life for 20 s" in said[1]["message"]
            or "no optimizer step for 20 s" in said[1]["message"]), said[1]["message"]
    killed = (said[0]["ts"] - killed_at, _first_step_after(ws, said[0]["ts"]) - killed_at)
    frozen = (said[1]["ts"] - frozen_at, _first_step_after(ws, said[1]["ts"]) - frozen_at)
    print(f"\nagent killed: detected after {killed[0]:.1f} s, first step after the relaunch at {killed[1]:.1f} s"
          f"\nrank frozen: detected after {frozen[0]:.1f} s, first step after the relaunch at {frozen[1]:.1f} s"
          f"\n{said[1]['message']}")
    assert killed[0] < 20 and 15 < frozen[0] < 20 + 5  # within distributed.timeout_seconds (+ a beat and a poll)
    _every_line_once(ws, {1: 32, 2: 8})
    rows = ledger(ws)
    assert [(r["job"], r["start_step"], r["end_step"]) for r in rows if r["outcome"] == "done"] == [(1, 1, 16),
                                                                                                    (2, 17, 20)]
    assert sum(r["end_step"] - r["start_step"] + 1 for r in rows) == 20


@pytest.mark.slow
def test_a_host_that_does_not_see_the_workspace_fails_the_attempt_at_once(workspace, tmp_path):
    files = [text_file(tmp_path / "a.jsonl", 4, "a")]
    ws = workspace("unshared", **_nodes(["localhost", "localhost"], timeout=600))
    started = time.time()
    r = _train(ws, files, {"CONVEYOR_TEST_NOT_SHARED": "1"})
    assert r.code == 0, r.out + r.err
    said = _events(ws)
    death = next(e for e in said if "worker died" in e["message"])
    assert f"host localhost (node 1) does not see the workspace {ws} at the same path" in death["message"]
    assert death["ts"] - started < 60  # at once, not after distributed.timeout_seconds (600 s)
    text = "\n".join(e["message"] for e in said)
    assert "host localhost left out of this attempt: its agent could not start in the previous attempt" in text
    assert "1 of 2 host(s), 1 process(es) instead of 2" in text
    assert "job 1 a.jsonl" in r.out and [len(r["lines"]) for r in _every_line_once(ws, {1: 4})] == [1, 1, 1, 1]


def _wait_for(get, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = get()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _query(ws, sql, args=()):
    con = sqlite3.connect(ws / "conveyor.db", timeout=30)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute(sql, args)]
    except sqlite3.OperationalError:
        return []
    finally:
        con.close()


def _steps(ws) -> int:
    rows = _query(ws, "SELECT COALESCE(MAX(step), 0) AS s FROM audit")
    return rows[0]["s"] if rows else 0


def _agents(ws, job: int):
    for path in (ws / "runs" / ".attempts").glob(f"job-{job}-*/agents.json"):
        return json.loads(path.read_text())
    return None


def _events(ws):
    return _query(ws, "SELECT ts, kind, message FROM events ORDER BY id")


def _first_step_after(ws, ts) -> float:
    rows = _query(ws, "SELECT MIN(created_at) AS t FROM metrics WHERE created_at > ?", (ts,))
    return rows[0]["t"]


# The ssh launcher against a real OpenSSH server (slow) -------------------------------------------------------------
@pytest.fixture
def sshd(tmp_path):
    """sshd on a loopback port with a throwaway host key and user key; yields the ssh command that reaches it."""
    server = shutil.which("sshd") or ("/usr/sbin/sshd" if os.path.exists("/usr/sbin/sshd") else None)
    if server is None or shutil.which("ssh-keygen") is None:
        pytest.skip("no OpenSSH server here (Debian: apt-get install openssh-server; .ci/run installs it)")
    keys = tmp_path / "ssh"
    keys.mkdir(mode=0o700)
    for name in ("host", "user"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / name)], check=True)
    shutil.copy(keys / "user.pub", keys / "authorized_keys")
    port = _free_port()
    config = keys / "sshd_config"
    config.write_text(f"Port {port}\nListenAddress 127.0.0.1\nHostKey {keys / 'host'}\nAuthorizedKeysFile "
                      f"{keys / 'authorized_keys'}\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
                      f"UsePAM no\nStrictModes no\nPermitRootLogin prohibit-password\nPidFile {keys / 'sshd.pid'}\n"
                      "AcceptEnv none\n")
    if os.geteuid() == 0 and not os.path.isdir("/run/sshd"):
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation directory
    proc = subprocess.Popen([server, "-D", "-e", "-f", str(config)], stderr=subprocess.PIPE, text=True)
    client = keys / "ssh_config"
    client.write_text(f"Host *\n  Port {port}\n  IdentityFile {keys / 'user'}\n  IdentitiesOnly yes\n"
                      f"  UserKnownHostsFile {keys / 'known_hosts'}\n  StrictHostKeyChecking no\n  LogLevel ERROR\n")
    command = f"ssh -F {client}"
    try:
        deadline = time.monotonic() + 20
        while True:
            ok = subprocess.run([*shlex.split(command), "-o", "BatchMode=yes", "127.0.0.1", "true"],
                                capture_output=True, text=True, timeout=20)
            if ok.returncode == 0:
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.skip(f"sshd could not start or be reached here: {ok.stderr.strip() or proc.stderr.read()}")
            time.sleep(0.3)
        yield command
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.slow
def test_the_ssh_launcher_starts_node_1_through_a_real_ssh_server(workspace, tmp_path, sshd, monkeypatch):
    files = [text_file(tmp_path / "a.jsonl", 4, "a"), text_file(tmp_path / "b.jsonl", 3, "b")]
    # Every name is this machine: node 0 runs beside the daemon, node 1 goes through ssh to 127.0.0.1; sshd does
    # not listen on 127.0.0.2, whose probe fails, so it sits out every attempt.
    ws = workspace("ssh", **_nodes(["localhost", "127.0.0.1", "127.0.0.2"], launcher="ssh"))
    r = _train(ws, files, {launch.SSH_ENV: sshd})
    assert r.code == 0, r.out + r.err
    assert "on 2 host(s) × 1 process(es): localhost (node 0, here), 127.0.0.1 (node 1, by ssh)" in r.out
    assert "job 1: host 127.0.0.2 left out of this attempt: ssh could not run conveyor there (" in r.err
    assert "runs on 2 of 3 host(s), 2 process(es) instead of 3" in r.err
    _every_line_once(ws, {1: 4, 2: 3})
    assert [len(r["lines"]) for r in audit(ws)] == [2, 2, 2, 1]


@pytest.mark.slow
def test_an_ssh_agent_dies_with_its_ssh_connection(tmp_path, sshd, monkeypatch):
    """What ending an ssh attempt relies on: the remote command is exec'd by the session's shell and guards itself
    (PR_SET_PDEATHSIG), so killing the local ssh client ends it on the remote side too."""
    monkeypatch.setenv(launch.SSH_ENV, sshd)
    pid_file = tmp_path / "remote.pid"
    argv = [sys.executable, "-c", "import os, time\nfrom conveyor.queue.process import die_with_parent\ndie_with_parent()\n"
            f"open({str(pid_file)!r}, 'w').write(str(os.getpid()))\ntime.sleep(120)"]
    command = launch.host_command(_d(hosts=["localhost", "127.0.0.1"], launcher="ssh"), "127.0.0.1", 1, argv,
                                  tmp_path)
    client = subprocess.Popen(command, start_new_session=True)
    remote = int(_wait_for(lambda: pid_file.exists() and pid_file.read_text(), 30, "the remote command"))
    os.killpg(client.pid, signal.SIGKILL)
    client.wait()
    deadline = time.monotonic() + 10
    while _alive(remote) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(remote)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat").read_text().split()[2] if Path(f"/proc/{pid}/stat").exists() else "X"
    return state not in ("Z", "X")
