"""A job's attempt on one or several hosts: one torchrun agent per host with a fixed node count and fixed node
ranks, started by a launcher (distributed.launcher: local, ssh, slurm), each first proving that its host sees the
workspace; then watched until it ends. The attempt never restarts itself: when anything goes wrong every agent
is killed and the daemon decides what comes next (back to the newest verified checkpoint, a retry, which hosts).

What a launcher runs on each host (never a person): `python -m conveyor.queue.launch agent ...` (check the attempt's
nonce, then become torchrun) and `python -m conveyor.queue.launch probe ...` (the check alone, before an attempt).

How a lost host is noticed, within distributed.timeout_seconds (the process group's own timeout stays long,
distributed.TIMEOUT, because a pause holds the other ranks at a collective for as long as it lasts):
- an agent that exits (killed, crashed, its ssh connection gone) ends the attempt at the next poll;
- every rank beats (a thread rewrites runs/.attempts/<attempt>/beat-<rank>); a rank silent for the timeout ends it;
- once the attempt has trained a step, no new step for the timeout, while the queue is not paused, ends it (a
  collective that hangs with every process alive: a network between hosts gone, a wedged NCCL).
A rank whose attempt folder is gone (the daemon ended the attempt) exits within a beat: the fence for ranks on
other hosts that the daemon cannot signal.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .attempt import ATTEMPT_ENV, BEAT_ENV, HOST_ENV, NONCE_ENV, NOT_SHARED, Attempt, shared_problem, write
from .process import PARENT_ENV, die_with_parent

SSH_FAILED = 255  # ssh's own failure (unreachable, refused, no key), as opposed to the remote command's
SSH_ENV = "CONVEYOR_SSH_COMMAND"  # the ssh client and options, e.g. "ssh -F ~/.ssh/cluster" (default: ssh)
# What an ssh launcher passes on (local and slurm agents inherit the daemon's whole environment).
FORWARDED = ("CONVEYOR_", "NCCL_", "GLOO_", "TORCH_", "HF_", "TRANSFORMERS_", "OMP_NUM_THREADS", "PYTHONPATH")
STRAGGLERS_SECONDS = 10.0  # after rank 0 has ended: how long the other agents get to exit before they are killed


# Hosts --------------------------------------------------------------------------------------------------------
def _addresses(host: str) -> set[str]:
    try:
        return {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return set()


def is_this_machine(host: str) -> bool:
    """host names this machine: a name of it, or an address it can bind to."""
    if host in ("localhost", socket.gethostname(), socket.getfqdn()):
        return True
    for address in _addresses(host):
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            try:
                s.bind((address, 0))
                return True
            except OSError:
                continue
    return False


def is_loopback(host: str) -> bool:
    """host is a loopback name or address on every machine ("localhost", 127.0.0.1, ::1). A machine's own name may
    resolve to 127.0.1.1 on itself (Debian) and still reach it from elsewhere: that is not this."""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def hosts_problem(d) -> str | None:
    """What is wrong with distributed.hosts for this machine (None if nothing): node rank 0 runs beside the daemon
    (rank 0 alone opens the database with it), so the first host must be this machine, reachable by the others."""
    hosts = d.hosts
    if not hosts:
        return None
    me = socket.gethostname()
    if not is_this_machine(hosts[0]):
        return (f"distributed.hosts: the first host, {hosts[0]!r}, is not this machine ({me}); node rank 0 runs "
                f"beside the daemon, so put this machine first, e.g. hosts = {json.dumps([me, *hosts[1:]])}")
    if d.launcher == "local":
        elsewhere = [h for h in hosts if not is_this_machine(h)]
        if elsewhere:
            return (f"distributed.hosts names {', '.join(elsewhere)}, but distributed.launcher = \"local\" starts "
                    "every agent on this machine; set launcher to \"ssh\" or \"slurm\"")
    elif is_loopback(hosts[0]) and not all(is_loopback(h) or is_this_machine(h) for h in hosts[1:]):
        return (f"distributed.hosts: the first host, {hosts[0]!r}, is a loopback name: the other hosts would look "
                f"for the rendezvous on themselves; name this machine as they reach it, e.g. {me!r}")
    return None


def world_size(d) -> int:
    """The configured world size: every host (or this machine alone) × distributed.nproc_per_node."""
    return max(len(d.hosts), 1) * d.nproc_per_node


def uses_agents(d) -> bool:
    """A job runs through torchrun agents (this module) rather than one warm worker process."""
    return bool(d.hosts) or d.nproc_per_node > 1


# Commands -----------------------------------------------------------------------------------------------------
def agent_argv(attempt: Attempt, node: int, host: str, hosts: list[str], d, job_id: int, claim: str,
               beat: float) -> list[str]:
    """The command one host runs: the nonce check, then torchrun with a fixed node count and this node's rank.

    Static rendezvous, not c10d: c10d ranks nodes in the order they join, and rank 0 must be the daemon's host
    (it alone opens the database). torchrun takes --node-rank only with --rdzv-backend=static, whose store node 0
    serves on rdzv_port; the store's timeout bounds how long the others wait for a host that never joins."""
    py = sys.executable
    if len(hosts) == 1:
        rdzv = ["--standalone"]  # one node: a free port, as before
    else:
        rdzv = [f"--nnodes={len(hosts)}", f"--node-rank={node}", "--rdzv-backend=static",
                f"--rdzv-endpoint={hosts[0]}:{d.rdzv_port}", f"--rdzv-conf=timeout={math.ceil(d.timeout_seconds)}"]
    torchrun = [py, "-m", "torch.distributed.run", *rdzv, f"--nproc-per-node={d.nproc_per_node}", "--max-restarts=0",
                "-m", "conveyor", "-w", str(attempt.workspace), "worker", "--job", str(job_id), "--claim", claim]
    return [py, "-m", "conveyor.queue.launch", "agent", "--attempt", str(attempt.folder), "--nonce", attempt.nonce,
            "--node", str(node), "--host", host, "--beat", f"{beat:g}", "--", *torchrun]


def ssh_base(timeout: float) -> list[str]:
    """The ssh client with options (CONVEYOR_SSH_COMMAND's first: ssh keeps the first value of an option)."""
    alive = max(1, int(timeout // 4))  # ssh itself ends within about 3/4 of the timeout when a host goes silent
    return [*shlex.split(os.environ.get(SSH_ENV, "ssh")), "-o", "BatchMode=yes",
            "-o", f"ConnectTimeout={max(5, min(30, int(timeout)))}",
            "-o", f"ServerAliveInterval={alive}", "-o", "ServerAliveCountMax=3"]


def host_command(d, host: str, node: int, argv: list[str], workspace: Path, env: dict | None = None) -> list[str]:
    """How the launcher runs argv on host: node 0 and the local launcher here; ssh through `ssh HOST 'cd WS && exec
    env ... argv'` (exec: the agent is the ssh session's child, and dies with it); slurm through a one-task srun
    step on that node of the daemon's allocation."""
    if node == 0 or d.launcher == "local":
        return argv
    if d.launcher == "ssh":
        env = os.environ if env is None else env
        passed = [f"{k}={v}" for k, v in sorted(env.items()) if k.startswith(FORWARDED) and k != PARENT_ENV]
        remote = f"cd {shlex.quote(str(workspace))} && exec " + shlex.join(["env", *passed, *argv])
        return [*ssh_base(d.timeout_seconds), host, remote]
    return ["srun", "--nodes=1", "--ntasks=1", "-w", host, f"--chdir={workspace}", "--export=ALL", *argv]


def _popen(command: list[str], local: bool, **kw) -> subprocess.Popen:
    env = {**os.environ, PARENT_ENV: str(os.getpid())} if local else \
        {k: v for k, v in os.environ.items() if k != PARENT_ENV}
    return subprocess.Popen(command, env=env, start_new_session=True, stdin=subprocess.DEVNULL, **kw)


def probe(d, attempt: Attempt, hosts: list[tuple[int, str]]) -> dict[int, str]:
    """Ask each host (slot, name) at once whether it answers and sees the workspace: {slot: why} for those that
    do not. The local launcher's hosts are this machine: nothing to ask."""
    if d.launcher == "local" or not hosts:
        return {}
    py = sys.executable
    running = {}
    for slot, host in hosts:
        argv = [py, "-m", "conveyor.queue.launch", "probe", "--attempt", str(attempt.folder), "--nonce", attempt.nonce,
                "--host", host]
        try:
            running[slot] = (host, _popen(host_command(d, host, slot, argv, attempt.workspace), False,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        except OSError as e:  # no ssh or srun here
            for _, started in running.values():
                _kill_group(started)
            return {slot: f"{d.launcher} cannot be run here ({e.strerror or e})" for slot, _ in hosts}
    deadline = time.monotonic() + min(d.timeout_seconds, 60)
    failed = {}
    for slot, (host, p) in running.items():
        try:
            _, err = p.communicate(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            _kill_group(p)
            p.wait()
            failed[slot] = f"no answer within {min(d.timeout_seconds, 60):.0f} s"
            continue
        said = ((err or "").strip().splitlines() or [f"exit code {p.returncode}"])[-1].removeprefix("conveyor: ")
        if p.returncode == NOT_SHARED:
            failed[slot] = said
        elif p.returncode:
            failed[slot] = f"{d.launcher} could not run conveyor there ({said})"
    return failed


def _kill_group(p: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(p.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# The attempt, watched from the daemon --------------------------------------------------------------------------
@dataclass
class Agent:
    node: int
    slot: int  # the host's place in distributed.hosts
    host: str
    popen: subprocess.Popen


@dataclass
class Launch:
    """One attempt of one job: its agents, watched by poll() until the attempt ends. Quacks like a
    process.WorkerProcess for the daemon (pid, poll, returncode, warm_stop, kill, close)."""

    attempt: Attempt
    agents: list[Agent]
    nproc: int
    timeout: float
    beat: float
    progress: object  # () -> (steps_done, paused)
    port: int = 0  # distributed.rdzv_port, for messages
    started: float = field(default_factory=time.monotonic)
    returncode: int | None = None
    ended: str = ""  # why, in words, once it has ended
    failed_to_start: set[int] = field(default_factory=set)  # slots whose agent never got going
    _seen: dict = field(default_factory=dict)  # rank -> (beat text, when it changed)
    _steps: tuple | None = None  # (steps_done, when it changed, whether it changed since the launch)
    _checked: float = 0.0
    _done_at: float | None = None  # when rank 0's end was first seen

    @property
    def pid(self) -> int:
        return self.agents[0].popen.pid

    @property
    def world(self) -> int:
        return len(self.agents) * self.nproc

    def poll(self) -> int | None:
        """None while the attempt runs; else rank 0's exit code (report.EXIT_CODES), or 1 if it was lost."""
        if self.returncode is None:
            lost = self._check(time.monotonic())
            if lost is not None:
                self._end(*lost)
        return self.returncode

    def _check(self, now: float) -> tuple[int, str] | None:
        """(code, why) once the attempt is over, else None."""
        outcome = self.attempt.outcome()
        head = self.agents[0].popen.poll()
        if outcome is None and head not in (None, 0):
            return 1, self._agent_ended(self.agents[0], head)
        if outcome is not None or head is not None:  # rank 0 has ended (its exit code, or every rank exited 0)
            self._done_at = self._done_at or now
            if any(a.popen.poll() is None for a in self.agents) and now - self._done_at < STRAGGLERS_SECONDS:
                return None  # the agents are exiting
            return (outcome if outcome is not None else 0), ""
        for agent in self.agents[1:]:
            code = agent.popen.poll()
            if code not in (None, 0):
                return 1, self._agent_ended(agent, code)
        if now - self._checked >= self.beat:
            self._checked = now
            return self._silent(now) or self._stalled(now)
        return None

    def _agent_ended(self, agent: Agent, code: int) -> str:
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        beats = self.attempt.beats()
        started = any(r in beats for r in range(agent.node * self.nproc, (agent.node + 1) * self.nproc))
        if code == NOT_SHARED:
            self.failed_to_start.add(agent.slot)
            return (f"host {agent.host} (node {agent.node}) does not see the workspace {self.attempt.workspace} at the "
                    "same path; mount it there on that host (its agent said so: see the log)")
        if not started and agent.node:
            self.failed_to_start.add(agent.slot)
            if code == SSH_FAILED and "ssh" in Path(str(agent.popen.args[0])).name:
                how = "ssh exit code 255: unreachable, refused, or no key for BatchMode"
            return f"the agent on host {agent.host} (node {agent.node}) could not start ({how})"
        if not started and len(self.agents) > 1:  # node 0 serves the rendezvous: its port may be taken
            return (f"the agent on this machine (node 0) could not start ({how}); is distributed.rdzv_port "
                    f"{self.port} in use by another program? (torchrun's message is in the daemon's output)")
        return f"the agent on host {agent.host} (node {agent.node}) ended ({how})"

    def _silent(self, now: float) -> tuple[int, str] | None:
        beats = self.attempt.beats()
        for rank in range(self.world):
            text = beats.get(rank)
            before = self._seen.get(rank)
            if text is not None and (before is None or before[0] != text):
                self._seen[rank] = (text, now)
            elif now - (before[1] if before else self.started) > self.timeout:
                agent = self.agents[rank // self.nproc]
                if before is None:
                    return 1, (f"rank {rank} on host {agent.host} (node {agent.node}) did not start within "
                               f"{self.timeout:g} s (distributed.timeout_seconds)")
                return 1, (f"rank {rank} on host {agent.host} (node {agent.node}) gave no sign of life for "
                           f"{self.timeout:g} s (distributed.timeout_seconds): the host is down or cut off")
        return None

    def _stalled(self, now: float) -> tuple[int, str] | None:
        steps, paused = self.progress()
        if self._steps is None or self._steps[0] != steps:
            self._steps = (steps, now, self._steps is not None)
        elif paused:  # a pause holds every rank at a collective for as long as it lasts
            self._steps = (steps, now, self._steps[2])
        elif self._steps[2] and now - self._steps[1] > self.timeout:
            return 1, (f"no optimizer step for {self.timeout:g} s (distributed.timeout_seconds) after step "
                       f"{steps} of the job: a collective hangs (a host cut off from the others?)")
        return None

    def _end(self, code: int, why: str) -> None:
        """Every agent's process group is killed (an ssh or srun agent: the client; its remote side dies with the
        session, or fences itself off once the attempt folder is gone), then the folder goes."""
        for agent in self.agents:
            if agent.popen.poll() is None:
                _kill_group(agent.popen)
        for agent in self.agents:
            try:
                agent.popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        self.attempt.remove()
        self.returncode, self.ended = code, why or f"exit code {code}"

    def warm_stop(self) -> None:
        """SIGTERM to node 0's agent (torchrun passes it to its ranks): rank 0 checkpoints after its step and tells
        the other ranks to stop there too."""
        _kill_group(self.agents[0].popen, signal.SIGTERM)

    def kill(self) -> None:
        if self.returncode is None:
            self._end(1, "killed")

    def close(self, timeout: float = 30) -> None:
        self.kill()


def start(root: Path, job_id: int, claim: str, config: dict, d, failed: set[int], progress, say) -> Launch:
    """Start the job's attempt: every host of distributed.hosts that answers (the first always; those whose agent
    could not start in the previous attempt are left out of this one), one agent each."""
    attempt = Attempt.create(root, job_id, config)
    slots = list(enumerate(d.hosts or [socket.gethostname()]))
    left = {slot: "its agent could not start in the previous attempt" for slot, _ in slots[1:] if slot in failed}
    left.update(probe(d, attempt, [(s, h) for s, h in slots[1:] if s not in left]))
    for slot, why in sorted(left.items()):
        say("warning", f"job {job_id}: host {slots[slot][1]} left out of this attempt: {why}")
    used = [(s, h) for s, h in slots if s not in left]
    if len(used) < len(slots):
        say("warning", f"job {job_id}: this attempt runs on {len(used)} of {len(slots)} host(s), "
            f"{len(used) * d.nproc_per_node} process(es) instead of {world_size(d)}: the job is re-planned from its "
            "newest checkpoint for the new world size (every example still once; the weights within float "
            "tolerance of an unchanged world size)")
    beat = max(0.5, min(5.0, d.timeout_seconds / 6))
    hosts = [h for _, h in used]
    agents = []
    for node, (slot, host) in enumerate(used):
        local = node == 0 or d.launcher == "local"
        argv = agent_argv(attempt, node, host, hosts, d, job_id, claim, beat)
        agents.append(Agent(node, slot, host, _popen(host_command(d, host, node, argv, attempt.workspace), local)))
    write(attempt.folder / "agents.json", json.dumps(
        [{"node": a.node, "host": a.host, "pid": a.popen.pid, "command": a.popen.args[0]} for a in agents]))
    if len(slots) > 1:
        how = {"local": "here", "ssh": "by ssh", "slurm": "by srun"}[d.launcher]
        say("info", f"job {job_id}: attempt {attempt.folder.name} on {len(used)} host(s) × {d.nproc_per_node} "
            "process(es): " + ", ".join(f"{a.host} (node {a.node}, {'here' if a.node == 0 else how})" for a in agents))
    return Launch(attempt, agents, d.nproc_per_node, d.timeout_seconds, beat, progress, d.rdzv_port)


def _agent(args, command: list[str]) -> None:
    die_with_parent()  # started here: with the daemon (CONVEYOR_PARENT_PID); over ssh or srun: with the session
    problem = shared_problem(Path(args.attempt), args.nonce, args.host, args.node)
    if problem:
        print(f"conveyor: {problem}", file=sys.stderr, flush=True)
        sys.exit(NOT_SHARED)
    if args.probe:
        return
    folder = Path(args.attempt)
    os.environ.update({ATTEMPT_ENV: str(folder), NONCE_ENV: args.nonce, BEAT_ENV: args.beat, HOST_ENV: args.host,
                       "CONVEYOR_CONFIG_JSON": (folder / "config.json").read_text(encoding="utf-8"),
                       PARENT_ENV: str(os.getpid())})  # torchrun's ranks guard themselves against it
    os.execv(command[0], command)


def main(argv: list[str]) -> None:
    cut = argv.index("--") if "--" in argv else len(argv)
    head, command = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(prog="python -m conveyor.queue.launch", description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["agent", "probe"])
    for name in ("--attempt", "--nonce", "--host"):
        parser.add_argument(name, required=True)
    parser.add_argument("--node", type=int)
    parser.add_argument("--beat", default="5")
    args = parser.parse_args(head)
    args.probe = args.what == "probe"
    if not args.probe and not command:
        parser.error("agent needs `-- COMMAND...` (torchrun)")
    _agent(args, command)


if __name__ == "__main__":
    main(sys.argv[1:])
