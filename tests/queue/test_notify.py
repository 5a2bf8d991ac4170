"""Notifications: notify.webhook gets a JSON POST and notify.command the JSON on its stdin, in order, for job done,
failed, rejected, gate, disk and daemon stopped; a dead or slow endpoint never slows training or fails a job."""

from __future__ import annotations

import json
import os
import shlex
import socket
import sqlite3
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import ledger, run_cli, set_setting, text_file
from service import Service

from conveyor.config import NotifyConfig
from conveyor.queue.notify import Notifier, close_wait, cursor_key
from conveyor.store.database import connect, log_event

SMALL = {"training": {"batch_size": 4, "grad_accum": 2, "save_every": 2}}  # 16 examples: 2 steps, 24: 3


class Endpoint:
    """A webhook receiver on 127.0.0.1: records each POST (arrival time, headers, JSON body); `answers` scripts the
    status of the first requests (then 200), `delay` makes it slow to answer."""

    def __init__(self, answers: list[int] | None = None, delay: float = 0.0):
        self.got: list[dict] = []
        self.answers = list(answers or [])
        self.delay = delay
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                endpoint.got.append({"at": time.time(), "path": self.path, "headers": dict(self.headers),
                                     "event": json.loads(body)})
                time.sleep(endpoint.delay)
                code = endpoint.answers.pop(0) if endpoint.answers else 200
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def events(self) -> list[dict]:
        return [g["event"] for g in self.got]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def endpoint():
    made = []

    def make(**kwargs) -> Endpoint:
        made.append(Endpoint(**kwargs))
        return made[-1]

    yield make
    for e in made:
        e.close()


class Drip:
    """A webhook that answers 200 at once, promising 1000 bytes, then sends one byte every 0.5 s (120 bytes: 60 s):
    `sending` while it drips; `cut_off` once the client hung up on it mid-body."""

    def __init__(self, interval: float = 0.5, size: int = 120):
        self.sending, self.cut_off, self.stop = threading.Event(), threading.Event(), threading.Event()
        self.sent = 0
        drip = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                self.send_response(200)
                self.send_header("Content-Length", "1000")
                self.end_headers()
                drip.sending.set()
                try:
                    while drip.sent < size and not drip.stop.wait(interval):
                        self.wfile.write(b"x")
                        drip.sent += 1
                except OSError:  # the client shut its socket down
                    drip.cut_off.set()
                finally:
                    drip.sending.clear()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def drip():
    d = Drip()
    yield d
    d.close()


def recorder(tmp_path: Path) -> tuple[str, Path]:
    """A notify.command appending each event it gets to a file, and that file."""
    out = tmp_path / "events.jsonl"
    script = tmp_path / "on_event.py"
    script.write_text("import sys\nwith open(sys.argv[1], 'a') as f:\n    f.write(sys.stdin.read().strip() + '\\n')\n")
    return " ".join(shlex.quote(str(a)) for a in (sys.executable, script, out)), out


def recorded(out: Path) -> list[dict]:
    return [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []


def dead_url() -> str:
    """A URL on a free port nobody listens on: every try is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/hook"


def until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (value := predicate()):
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def events(ws: Path, kind: str | None = None) -> list[dict]:
    con = sqlite3.connect(ws / "conveyor.db", timeout=30)
    con.row_factory = sqlite3.Row
    try:
        where, args = (" WHERE kind = ?", (kind,)) if kind else ("", ())
        return [dict(r) for r in con.execute(f"SELECT * FROM events{where} ORDER BY id", args)]
    finally:
        con.close()


# End to end through the real CLI ------------------------------------------------------------------------------
def test_webhook_gets_each_job_done_then_stopped_in_order_with_the_secret_header(workspace, tmp_path, endpoint):
    hook = endpoint()
    eval_file = text_file(tmp_path / "eval.jsonl", 4, "e")
    ws = workspace(**SMALL, eval={"file": str(eval_file)},
                   notify={"webhook": hook.url, "secret_header": "X-Conveyor-Token: s3cret"})
    files = [text_file(tmp_path / "a.jsonl", 16, "a"), text_file(tmp_path / "b.jsonl", 24, "b")]
    assert run_cli(ws, "train", *files, "-q").code == 0
    got = until(lambda: len(hook.got) >= 3 and hook.events(), 10, "three events")  # close() delivered them already
    assert [(e["kind"], e["job"], e["file"], e["start_step"], e["end_step"], e["steps"], e["planned_steps"])
            for e in got] == [("done", 1, "a.jsonl", 1, 2, 2, 2), ("done", 2, "b.jsonl", 3, 5, 3, 3),
                              ("stopped", None, None, None, None, None, None)]
    assert [e["message"] for e in got] == ["job 1: steps 1–2", "job 2: steps 3–5",
                                           "daemon stopped (drained: nothing left to train)"]
    assert all(g["path"] == "/hook" and g["headers"]["X-Conveyor-Token"] == "s3cret"
               and g["headers"]["Content-Type"] == "application/json" for g in hook.got)
    assert got[0]["id"] < got[1]["id"] < got[2]["id"] and got[0]["ts"] <= got[1]["ts"] <= got[2]["ts"]
    assert {e["workspace"] for e in got} == {str(ws.resolve())}
    rows = ledger(ws)
    for e, row in zip(got, rows):
        assert e["losses"] == {"first": row["first_loss"], "last": row["last_loss"], "mean": row["mean_loss"]}
        assert set(e["eval"]) == {"eval.file"} and e["eval"]["eval.file"] > 0
    assert got[2]["losses"] is None and "eval" not in got[2]
    assert not events(ws, "notify")


def test_a_dead_endpoint_neither_slows_training_nor_fails_jobs_and_is_logged(workspace, tmp_path):
    ws = workspace(**SMALL, notify={"webhook": dead_url(), "timeout_seconds": 0.5, "retries": 2})
    files = [text_file(tmp_path / "a.jsonl", 16, "a"), text_file(tmp_path / "b.jsonl", 16, "b")]
    r = run_cli(ws, "train", *files, "-q")
    returned = time.time()
    assert r.code == 0, r.out + r.err
    warnings = [e["message"] for e in events(ws, "notify")]
    first = next(e for e in events(ws, "notify") if "'done' (job 1)" in e["message"])
    assert "cannot reach it" in first["message"] and "(after 3 tries)" in first["message"], warnings
    assert "http" not in first["message"]  # the URL may hold a secret: only host and port are shown
    # Structurally: job 2 started while job 1's event was still being retried (1 s, then 2 s between tries),
    # so training did not wait for the notification.
    con = sqlite3.connect(ws / "conveyor.db")
    started_2 = con.execute("SELECT started_at FROM jobs WHERE id = 2").fetchone()[0]
    states = [s for (s,) in con.execute("SELECT state FROM jobs ORDER BY id")]
    con.close()
    assert states == ["done", "done"]
    assert started_2 < first["ts"]
    # The run waits for its last events at most close_wait (here 0.5 × 3 + 1 + 2 = 4.5 s), then says what it dropped.
    stopped = events(ws, "stopped")[-1]
    assert returned - stopped["ts"] < close_wait(NotifyConfig(timeout_seconds=0.5, retries=2)) + 2.0
    # Every event is accounted for: failed after its tries, or listed as not delivered when the wait ran out.
    for name in ("'done' (job 1)", "'done' (job 2)", "'stopped'"):
        assert any(name in w for w in warnings), (name, warnings)


def test_command_gets_each_event_as_json_on_stdin(workspace, tmp_path):
    command, out = recorder(tmp_path)
    ws = workspace(**SMALL, notify={"command": command})
    assert run_cli(ws, "train", text_file(tmp_path / "a.jsonl", 16, "a"), "-q").code == 0
    got = recorded(out)
    assert [(e["kind"], e["job"], e["file"], e["start_step"], e["end_step"]) for e in got] == [
        ("done", 1, "a.jsonl", 1, 2), ("stopped", None, None, None, None)]


def test_a_preference_jobs_done_event_says_how_it_trained_and_its_held_out_pairs_preferred(workspace, tmp_path):
    """Beside the losses, as answers' F1 is: the method, the reference (by name), the last step's reward margin and
    accuracy, and the share of its held-out pairs preferred; a supervised job's event has none of them."""
    command, out = recorder(tmp_path)
    ws = workspace(**SMALL, eval={"holdout": 0.25}, notify={"command": command})
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"q{i}?", "chosen": f" yes {i}", "rejected": f" no {i}"}) + "\n"
                             for i in range(1, 13)), encoding="utf-8")
    assert run_cli(ws, "train", text_file(tmp_path / "a.jsonl", 16, "a"), pairs, "-q").code == 0
    sft, dpo = [e for e in recorded(out) if e["kind"] == "done"]
    assert not {"method", "reference", "rewards", "preference"} & set(sft), sft
    assert (dpo["job"], dpo["method"], dpo["reference"]["name"], dpo["reference"]["step"], dpo["reference"]["kind"]) \
        == (2, "dpo", "v1", sft["end_step"], "adapter")
    con = sqlite3.connect(ws / "conveyor.db")
    try:
        last = con.execute("SELECT margin, accuracy FROM metrics WHERE step = ?", (dpo["end_step"],)).fetchone()
        held = con.execute("SELECT name, preference FROM set_evals WHERE step = ? AND preference IS NOT NULL",
                           (dpo["end_step"],)).fetchall()
    finally:
        con.close()
    assert dpo["rewards"] == {"margin": last[0], "accuracy": last[1]} and 0.0 <= last[1] <= 1.0
    assert dpo["preference"] == dict(held) and set(dpo["preference"]) == {"job 2"}
    assert set(dpo["eval"]) == {"job 1", "job 2"}  # the losses of both held-out sets, as before


@pytest.mark.slow  # the default run stays near 5 minutes; CI runs it with -m slow
def test_a_running_daemon_notifies_rejections_a_failed_job_a_disk_shortage_then_its_stop(workspace, tmp_path,
                                                                                           endpoint):
    """`conveyor run` (worker processes): each event comes from another place, in the order it happened."""
    hook = endpoint()
    ws = workspace(**SMALL, notify={"webhook": hook.url}, inbox={"settle_seconds": 0.2, "poll_seconds": 0.1},
                   daemon={"max_attempts": 1, "retry_backoff_seconds": 0.0})
    (ws / "inbox" / "broken.jsonl").write_text('{"text": "fine"}\nnot json at all\n')  # claimed once it runs
    svc = Service(ws, env={**os.environ, "CONVEYOR_FAILPOINT": "step:1"})  # every worker dies at its first step
    try:
        until(lambda: hook.events(), 90, "the inbox file's rejection")
        bad = tmp_path / "empty.jsonl"
        bad.write_text('{"nothing": 1}\n')
        assert run_cli(ws, "add", bad).code != 0  # another process: the daemon hears of it through the database
        until(lambda: len(hook.got) >= 2, 30, "the added file's rejection")
        assert run_cli(ws, "add", text_file(tmp_path / "dies.jsonl", 16, "d")).code == 0
        until(lambda: len(hook.got) >= 3, 90, "the job's failure")
        set_setting(ws, "daemon", "min_free_mb", "1000000000")  # read again before the next job
        assert run_cli(ws, "add", text_file(tmp_path / "waits.jsonl", 16, "w")).code == 0
        until(lambda: len(hook.got) >= 4, 30, "the disk shortage")
        assert run_cli(ws, "stop").code == 0
        assert svc.proc.wait(timeout=60) == 0
    finally:
        svc.stop()
    got = hook.events()
    assert [(e["kind"], e["job"], e["file"]) for e in got] == [
        ("rejected", 1, "broken.jsonl"), ("rejected", 2, "empty.jsonl"), ("failed", 3, "dies.jsonl"),
        ("disk", 4, "waits.jsonl"), ("stopped", None, None)]
    assert "line 2" in got[0]["message"] and [e["message"] for e in got[:2]] == [
        e["message"] for e in events(ws, "rejected")]
    assert got[2]["message"].startswith("job 3 failed: its worker died 1 time(s)") and got[2]["steps"] == 0
    assert got[3]["message"].startswith("waiting: ") and "daemon.min_free_mb" in got[3]["message"]
    assert got[4]["message"].startswith("daemon stopped (stop requested by")


# The Notifier alone, with a fake endpoint and small timeouts ----------------------------------------------------
@pytest.fixture
def db(tmp_path):
    path = tmp_path / "conveyor.db"
    con = connect(path)
    yield path, con
    con.close()


def _notifier(db_path: Path, **settings) -> Notifier:
    return Notifier(db_path, NotifyConfig(**settings), "/ws", backoff_seconds=0.1, poll_seconds=0.02).start()


def test_retries_with_doubling_waits_until_the_endpoint_answers(db, endpoint):
    path, con = db
    log_event(con, "info", "done", "before the notifier: never sent", 1)
    hook = endpoint(answers=[503, 500])
    n = _notifier(path, webhook=hook.url, retries=3, timeout_seconds=1.0)
    log_event(con, "info", "message", "not a notified kind")
    log_event(con, "info", "done", "job 7: steps 1–2", 7)
    log_event(con, "info", "stopped", "daemon stopped (drained: nothing left to train)")
    n.close(5.0)
    assert [(e["kind"], e["message"]) for e in hook.events()] == [
        ("done", "job 7: steps 1–2")] * 3 + [("stopped", "daemon stopped (drained: nothing left to train)")]
    at = [g["at"] for g in hook.got]
    assert at[1] - at[0] >= 0.1 and at[2] - at[1] >= 0.2  # backoff 0.1 s, doubled
    assert hook.events()[0]["job"] == 7 and hook.events()[0]["file"] is None  # no such job row: bare event
    assert not [e for e in con.execute("SELECT * FROM events WHERE kind = 'notify'")]


def test_a_slow_endpoint_times_out_each_try_and_the_failure_is_logged_not_raised(db, endpoint):
    path, con = db
    hook = endpoint(delay=3.0)
    n = _notifier(path, webhook=hook.url, retries=1, timeout_seconds=0.2)
    log_event(con, "error", "failed", "job 3 failed: out of luck", 3)
    start = time.monotonic()
    warning = until(lambda: con.execute("SELECT * FROM events WHERE kind = 'notify'").fetchone(), 5, "the warning")
    assert time.monotonic() - start < 2.5  # 2 tries of 0.2 s and a 0.1 s wait, not the endpoint's 3 s each
    assert "'failed' (job 3)" in warning["message"] and "no complete answer within 0.2 s" in warning["message"] \
        and "(after 2 tries)" in warning["message"], warning["message"]
    until(lambda: len(hook.got) >= 2, 5, "both tries to arrive")
    assert len(hook.got) == 2
    n.close(0.1)


def test_a_refusal_is_not_retried_and_a_command_failure_is_logged(db, endpoint, tmp_path):
    path, con = db
    hook = endpoint(answers=[401])
    n = _notifier(path, webhook=hook.url, command=f"{shlex.quote(sys.executable)} -c 'import sys; sys.exit(3)'",
                  retries=2, timeout_seconds=2.0)
    log_event(con, "error", "gate", "the gate held the queue", 2)
    n.close(5.0)
    warnings = [r["message"] for r in con.execute("SELECT message FROM events WHERE kind = 'notify' ORDER BY id")]
    hook_warning, command_warning = sorted(warnings, key=lambda w: "notify.command" in w)  # independent targets
    assert len(hook.got) == 1 and "HTTP 401" in hook_warning and "not retried" in hook_warning, warnings
    assert "notify.command" in command_warning and "exit code 3" in command_warning \
        and "(after 3 tries)" in command_warning


def test_close_gives_up_within_its_bound_and_says_what_was_not_delivered(db, endpoint):
    path, con = db
    hook = endpoint(delay=5.0)
    n = _notifier(path, webhook=hook.url, retries=3, timeout_seconds=4.0)
    log_event(con, "info", "done", "job 1: steps 1–2", 1)
    until(lambda: hook.got, 5, "the first try")
    log_event(con, "info", "stopped", "daemon stopped (SIGTERM)")
    start = time.monotonic()
    n.close(0.5)
    assert time.monotonic() - start < 3.0  # the bound and its 0.5 s slack, not the 4 s try in flight
    warning = con.execute("SELECT message FROM events WHERE kind = 'notify'").fetchone()["message"]
    assert "2 event(s) not delivered to notify.webhook within the 0.5 s" in warning \
        and "'done' (job 1), 'stopped'" in warning


def test_events_logged_while_no_daemon_ran_go_out_with_the_next_one_in_order(workspace, tmp_path, endpoint):
    hook = endpoint()
    ws = workspace(**SMALL, notify={"webhook": hook.url})
    assert run_cli(ws, "train", text_file(tmp_path / "a.jsonl", 16, "a"), "-q").code == 0  # the first daemon
    until(lambda: len(hook.got) >= 2, 10, "the first daemon's events")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{not json\n')
    assert run_cli(ws, "add", bad).code != 0  # rejected with no daemon running: nobody sends it now
    assert [e["kind"] for e in hook.events()] == ["done", "stopped"]
    assert run_cli(ws, "train", text_file(tmp_path / "b.jsonl", 16, "b"), "-q").code == 0
    got = until(lambda: len(hook.got) >= 5 and hook.events(), 10, "the second daemon's events")
    assert [(e["kind"], e["file"]) for e in got] == [("done", "a.jsonl"), ("stopped", None), ("rejected", "bad.jsonl"),
                                                     ("done", "b.jsonl"), ("stopped", None)]
    assert "line 2" in got[2]["message"]
    assert len({e["id"] for e in got}) == 5  # each event once


# One deadline per try; independent targets; no secrets ---------------------------------------------------------
def test_a_body_sent_a_byte_a_second_is_given_up_at_the_try_deadline(db, drip, tmp_path):
    """urllib's timeout bounds each socket read: a byte every 0.5 s (each read well within 1 s) used to hold the try
    for the whole 60 s the body takes."""
    path, con = db
    n = _notifier(path, webhook=drip.url, timeout_seconds=1.0, retries=0)
    log_event(con, "info", "done", "job 1: steps 1–2", 1)
    until(drip.sending.is_set, 10, "the answer's headers")
    warning = until(lambda: con.execute("SELECT * FROM events WHERE kind = 'notify'").fetchone(), 20,
                    "the try to be given up (the body would take 60 s)")
    assert "'done' (job 1)" in warning["message"] and "no complete answer within 1.0 s (notify.timeout_seconds)" \
        in warning["message"] and "(after 1 try)" in warning["message"], warning["message"]
    until(drip.cut_off.is_set, 20, "the abandoned try to hang up (its thread does not linger)")
    assert drip.sent < 120
    n.close(1.0)


def test_a_stuck_webhook_never_delays_the_command(db, drip, tmp_path):
    path, con = db
    command, out = recorder(tmp_path)
    n = _notifier(path, webhook=drip.url, command=command, timeout_seconds=30.0, retries=0)
    log_event(con, "info", "done", "job 1: steps 1–2", 1)
    log_event(con, "info", "stopped", "daemon stopped (drained: nothing left to train)")
    until(lambda: len(recorded(out)) >= 2, 20, "the command to get both events")
    assert drip.sending.is_set() and drip.sent < 120  # the webhook's first try is still reading its answer
    assert [e["kind"] for e in recorded(out)] == ["done", "stopped"]
    n.close(0.2)
    warnings = [r["message"] for r in con.execute("SELECT message FROM events WHERE kind = 'notify'")]
    assert len(warnings) == 1 and "2 event(s) not delivered to notify.webhook" in warnings[0], warnings


def test_each_target_starts_after_the_last_event_it_handled(db, endpoint, tmp_path):
    """The command got both events; the webhook was still on the first when the daemon stopped: the next daemon
    sends the webhook both, the command neither."""
    path, con = db
    hook = endpoint(delay=3.0)
    command, out = recorder(tmp_path)
    settings = {"webhook": hook.url, "command": command, "timeout_seconds": 2.0, "retries": 0}
    first = _notifier(path, **settings)
    log_event(con, "info", "done", "job 1: steps 1–2", 1)
    log_event(con, "info", "stopped", "daemon stopped (SIGTERM)")
    until(lambda: len(recorded(out)) >= 2 and hook.got, 20, "the command's two events and the webhook's first try")
    first.close(0.2)
    hook.delay = 0.0
    _notifier(path, **settings).close(5.0)
    assert [e["kind"] for e in hook.events()] == ["done", "done", "stopped"]  # the first try, then both again
    assert [e["kind"] for e in recorded(out)] == ["done", "stopped"]  # each once


def test_a_cursor_shared_by_both_targets_is_where_each_starts(db, endpoint, tmp_path):
    """Before each target had its own, one cursor row (keyed by both settings) served both."""
    path, con = db
    hook = endpoint()
    command, out = recorder(tmp_path)
    log_event(con, "info", "done", "job 1: sent by the last daemon", 1)
    con.execute("INSERT INTO notify_cursor (target, last_id) VALUES (?, (SELECT MAX(id) FROM events))",
                (cursor_key(hook.url, command),))
    log_event(con, "info", "rejected", "logged while no daemon ran", 2)
    _notifier(path, webhook=hook.url, command=command).close(5.0)
    assert [e["message"] for e in hook.events()] == ["logged while no daemon ran"]
    assert [e["message"] for e in recorded(out)] == ["logged while no daemon ran"]


@pytest.mark.parametrize("userinfo", ["bob:hunter2@", "bob@", ":hunter2@"])
def test_credentials_in_the_webhook_url_are_refused_at_load_and_never_shown(workspace, userinfo):
    ws = workspace()
    set_setting(ws, "notify", "webhook", f'"https://{userinfo}hooks.example.com/conveyor"')
    r = run_cli(ws, "run", "--drain")
    message = r.out + r.err
    assert r.code == 1 and "notify.webhook: credentials in the URL (user:password@) are refused" in message
    assert "not shown or stored" in message and "notify.secret_header" in message
    assert "hunter2" not in message and "bob" not in message
    assert "'https://…@hooks.example.com/conveyor'" in message
    assert not (ws / "conveyor.db").exists() or not [e for e in events(ws) if "hunter2" in e["message"]]


def test_a_failing_webhook_logs_neither_its_query_nor_its_path(db):
    """The query (and for Slack or Discord, the path) of a webhook URL is its secret: only host and port show."""
    path, con = db
    url = dead_url().replace("/hook", "/services/T0/B0/pathsecret?token=abc")
    n = _notifier(path, webhook=url, timeout_seconds=1.0, retries=0)
    log_event(con, "info", "done", "job 1: steps 1–2", 1)
    n.close(5.0)
    (warning,) = [r["message"] for r in con.execute("SELECT message FROM events WHERE kind = 'notify'")]
    assert "cannot reach it" in warning and url.split("/")[2] in warning, warning
    assert "abc" not in warning and "token" not in warning and "pathsecret" not in warning


class Served:
    """A handler class served on 127.0.0.1 from a thread of its own; `url` names `host` and ends with `path`."""

    def __init__(self, handler, host: str = "127.0.0.1", path: str = "/hook"):
        handler.log_message = lambda *args: None
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.url = f"http://{host}:{self.server.server_address[1]}{path}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def redirector(code: int, to: str, got: list) -> Served:
    """A webhook that answers every POST with `code` and `Location: <to>`, keeping each request's headers."""
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            got.append(dict(self.headers))
            self.send_response(code)
            self.send_header("Location", to)
            self.send_header("Content-Length", "0")
            self.end_headers()

    return Served(Handler)


def listener(got: list) -> Served:
    """Another origin (localhost, not 127.0.0.1): records every request of any method, with its headers."""
    class Handler(BaseHTTPRequestHandler):
        def _any(self):
            got.append((self.command, dict(self.headers)))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_POST = do_PUT = _any

    return Served(Handler, host="localhost", path="/elsewhere?token=t0p")


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_a_redirect_is_not_followed_and_the_secret_never_reaches_another_origin(db, code):
    """The webhook answers 30x with Location on another origin: nothing reaches that origin (no GET, no secret),
    the try is not repeated, and the log names the redirect's host only and what to do."""
    path, con = db
    reached, asked = [], []
    other = listener(reached)
    hook = redirector(code, other.url, asked)
    try:
        n = _notifier(path, webhook=hook.url, secret_header="Authorization: Bearer s3cret", retries=3,
                      timeout_seconds=2.0)
        log_event(con, "info", "done", "job 1: steps 1–2", 1)
        n.close(5.0)
        warning = con.execute("SELECT message FROM events WHERE kind = 'notify'").fetchone()["message"]
        assert reached == []
        assert len(asked) == 1 and asked[0]["Authorization"] == "Bearer s3cret"  # sent where it was told
        host = other.url.split("/")[2]
        assert f"a redirect to {host}: conveyor does not follow a webhook's redirects" in warning, warning
        assert "not retried" in warning and "t0p" not in warning and "elsewhere" not in warning
    finally:
        hook.close()
        other.close()
