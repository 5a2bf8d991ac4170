"""Notifications: while the daemon works, `Notifier` tails the events table and hands the events a person waits for
to `notify.webhook` (a JSON POST) and/or `notify.command` (the JSON on its standard input).

Events sent (the events table's `kind`): done, failed, rejected, gate (eval.gate held the queue), disk (paused: not
enough free disk), stopped (the daemon's work loop ended). One event, as JSON (null where it does not apply):

    {"id": 17, "kind": "done", "job": 1, "file": "a.jsonl", "steps": 2, "planned_steps": 2,
     "start_step": 1, "end_step": 2, "losses": {"first": 5.61, "last": 5.48, "mean": 5.55},
     "message": "job 1: steps 1–2", "ts": 1767225600.123, "workspace": "/srv/ws", "eval": {"eval.file": 5.4}}

`id` is the event's row id (increasing: a receiver can drop a repeat), `steps` the steps the job has trained,
`losses` cover its ledger rows not lost to a rewind, `eval` (present only when evaluations exist at `end_step`)
maps each evaluation set to its loss there, `answers` each set's scored answers ({"exact", "f1", "answered"}) and
`preference` each held-out set of pairs' share whose chosen answer the model finds more likely than the rejected
one (each only where there are some). A preference or feedback job's event also has `method` ("dpo", "ipo", "orpo",
"kto"), `reference` (the model its loss measured against: the record its ledger keeps, with `name`: "v2", "base" or
"step 12") and `rewards` ({"margin", "accuracy"} of its last step). Each target gets the events one at a time, in the
order they were logged.

The webhook and the command are independent targets, each with its own thread, so a slow or failing one never
delays the other. Nothing is lost between daemons: the last event a target handled (sent, or failed after its
tries) is kept in the database per target, and the next daemon starts after it, so events logged while none ran
(a file rejected by `conveyor add`) or not yet sent when one stopped go out then, in order (at most the last 200).

Delivery never blocks training: it runs on its own threads with their own database connections (an sqlite
connection cannot cross threads). Each try has one deadline over all of it (for the webhook: connect, send, the
answer's headers and body); a failed try is retried after 1, 2, 4, ... s; an HTTP 4xx other than 408/429 is the
settings' mistake and is not retried. A delivery that fails for good, and whatever is still queued when `close`
runs out of time, is logged as a `notify` warning event, never raised. The webhook URL's query and credentials are
never logged (conveyor.toml refuses credentials in it): only its host and port.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import http.client
import json
import os
import shlex
import signal
import socket
import sqlite3
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from ..config import NotifyConfig
from ..data.formats import PREFERENCE_FORMATS
from ..store.database import connect, log_event
from ..store.versions import answers_at, preference_at, step_name

KINDS = ("done", "failed", "rejected", "gate", "disk", "stopped")
POLL_SECONDS = 0.2  # how often the events table is read for new rows
MAX_CLOSE_SECONDS = 10.0  # the longest a stopping daemon waits for its last events to go out
BACKLOG = 200  # events logged while no daemon ran (or left undelivered) that the next one still sends


class Undeliverable(Exception):
    """A delivery that retrying cannot help (the endpoint refused it: a wrong URL or secret)."""


def close_wait(settings: NotifyConfig) -> float:
    """How long a stopping daemon waits for queued events: one event's every try and wait, at most 10 s."""
    waits = sum(2.0 ** i for i in range(settings.retries))
    return min(settings.timeout_seconds * (settings.retries + 1) + waits, MAX_CLOSE_SECONDS)


class Notifier:
    """Delivers the events logged after it was made: one `Target` thread each for notify.webhook and notify.command."""

    def __init__(self, db_path: Path, settings: NotifyConfig, workspace: str, backoff_seconds: float = 1.0,
                 poll_seconds: float = POLL_SECONDS):
        self.targets = [Target(channel, db_path, settings, workspace, backoff_seconds, poll_seconds)
                        for channel in ("webhook", "command") if getattr(settings, channel)]

    def start(self) -> Notifier:
        for target in self.targets:
            target.start()
        return self

    def close(self, timeout: float) -> None:
        """Deliver what is logged by now within `timeout` seconds, then give up (logging what was not sent)."""
        deadline = time.monotonic() + timeout
        for target in self.targets:  # all at once: each target has the whole wait
            target.stop_by(deadline, timeout)
        for target in self.targets:
            target.join(max(0.0, deadline - time.monotonic()) + 0.5)


def cursor_key(webhook: str, command: str) -> str:
    """A target's row in notify_cursor. One row used to serve both targets (the key of both settings): a target
    without a row of its own starts from that one, so that nothing is lost or repeated across the upgrade."""
    return hashlib.sha256(f"{webhook}\0{command}".encode()).hexdigest()[:16]


class Target:
    """One thread delivering, in order, the events logged after it was made to notify.webhook or notify.command."""

    def __init__(self, channel: str, db_path: Path, settings: NotifyConfig, workspace: str, backoff_seconds: float,
                 poll_seconds: float):
        self.channel = channel  # "webhook" or "command"
        self.db_path = db_path
        self.settings = settings
        self.workspace = workspace
        self.backoff = backoff_seconds  # the first wait between tries; doubles with each further try
        self.poll = poll_seconds
        self._send = _post if channel == "webhook" else _run_command
        self._pending: collections.deque[dict] = collections.deque()
        self._closing = threading.Event()
        self._deadline = float("inf")  # monotonic time by which close gives up; set before _closing
        self._close_wait = 0.0
        self._lock = threading.Lock()  # guards _current, _pending and _given_up between the thread and close()
        self._current: dict | None = None  # the event being delivered
        self._given_up = False
        self._thread = threading.Thread(target=self._run, name=f"notify-{channel}", daemon=True)
        self._key = cursor_key(settings.webhook, "") if channel == "webhook" else cursor_key("", settings.command)
        self._cursor = self._start_cursor(cursor_key(settings.webhook, settings.command))

    def _start_cursor(self, shared_key: str) -> int:
        """Where the last daemon with this target left it (events logged while none ran, or not delivered before one
        stopped, go out now: at most the last BACKLOG); the first time, after what is logged."""
        con = connect(self.db_path)
        try:
            row = None
            for key in (self._key, shared_key):
                if row is None:
                    row = con.execute("SELECT last_id FROM notify_cursor WHERE target = ?", (key,)).fetchone()
            last = row["last_id"] if row else con.execute("SELECT COALESCE(MAX(id), 0) FROM events").fetchone()[0]
            con.execute("INSERT OR IGNORE INTO notify_cursor (target, last_id) VALUES (?, ?)", (self._key, last))
            oldest = con.execute(f"SELECT id FROM events WHERE id > ? AND kind IN ({', '.join('?' * len(KINDS))})"
                                 " ORDER BY id DESC LIMIT 1 OFFSET ?", (last, *KINDS, BACKLOG)).fetchone()
            return oldest["id"] if oldest else last
        finally:
            con.close()

    def start(self) -> None:
        self._thread.start()

    def stop_by(self, deadline: float, timeout: float) -> None:
        """Deliver what is logged by now until the monotonic `deadline` (`timeout` seconds from now), then stop."""
        self._close_wait = timeout
        self._deadline = deadline
        self._closing.set()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
        if self._thread.is_alive():  # a try begun before close() still waits for its answer: leave it
            self._give_up(None)

    def _run(self) -> None:
        con = connect(self.db_path)
        try:
            while True:
                closing = self._closing.is_set()  # read before the tail, so rows logged before close() are seen
                new = self._new_events(con)
                with self._lock:
                    self._pending.extend(new)
                while self._pending and self._time_left() > 0:
                    with self._lock:
                        self._current = self._pending.popleft()
                    self._deliver(con, self._current)
                    # Handled (sent, or failed after its tries): the next daemon starts after it.
                    con.execute("UPDATE notify_cursor SET last_id = ? WHERE target = ?", (self._current["id"],
                                                                                         self._key))
                    self._current = None
                if closing or self._time_left() <= 0:
                    break
                self._closing.wait(self.poll)
            self._give_up(con)
        except Exception as e:  # a notification problem must never surface in training
            _log_quietly(con, f"notify: stopped delivering events to notify.{self.channel} ({type(e).__name__}: "
                              f"{_scrub(str(e), self.settings.webhook)})")
        finally:
            con.close()

    def _give_up(self, con: sqlite3.Connection | None) -> None:
        """Log, once, the events not delivered when close() stopped waiting (from whichever thread gets here first:
        the target's, or close()'s when a try is still in flight, with its own connection)."""
        own = con is None
        con = connect(self.db_path) if own else con
        try:
            with self._lock:
                if self._given_up:
                    return
                self._given_up = True
                self._pending.extend(self._new_events(con))  # logged meanwhile; a busy thread has not read them
                left = ([self._current] if self._current else []) + list(self._pending)
            if left:
                log_event(con, "warning", "notify", f"notify: {len(left)} event(s) not delivered to "
                          f"notify.{self.channel} within the {self._close_wait:.1f} s the daemon waits for them when "
                          "it stops (the next daemon sends them): " + ", ".join(_name(e) for e in left))
        finally:
            if own:
                con.close()

    def _new_events(self, con: sqlite3.Connection) -> list[dict]:
        rows = con.execute(f"SELECT * FROM events WHERE id > ? AND kind IN ({', '.join('?' * len(KINDS))})"
                           " ORDER BY id", (self._cursor, *KINDS)).fetchall()
        if rows:
            self._cursor = rows[-1]["id"]
        return [event(con, r, self.workspace) for r in rows]

    def _deliver(self, con: sqlite3.Connection, ev: dict) -> None:
        problem = self._with_retries(json.dumps(ev).encode())
        if problem and not self._given_up:  # else close() has reported it already
            where = f" ({_where(self.settings.webhook)})" if self.channel == "webhook" else ""
            log_event(con, "warning", "notify", f"notify: the {_name(ev)} event was not delivered to "
                      f"notify.{self.channel}{where}: {_scrub(problem, self.settings.webhook)}", ev["job"])

    def _with_retries(self, body: bytes) -> str | None:
        """None once a try succeeds; else what went wrong on the last try, and how many tries were made."""
        tries = 0
        while True:
            timeout = min(self.settings.timeout_seconds, self._time_left())
            if timeout <= 0:
                return f"the daemon stopped waiting after {tries} tr{'y' if tries == 1 else 'ies'}"
            tries += 1
            try:
                self._send(self.settings, body, timeout)
                return None
            except Undeliverable as e:
                return f"{e} (not retried: fix the setting)"
            except Exception as e:  # the network, the endpoint, the command: all retried, none fatal
                problem = _describe(e, timeout)
            if tries > self.settings.retries or not self._pause(self.backoff * 2 ** (tries - 1)):
                return f"{problem} (after {tries} tr{'y' if tries == 1 else 'ies'})"

    def _pause(self, seconds: float) -> bool:
        """Wait between tries; False if the wait would end past the close deadline."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            if self._closing.is_set():
                if end > self._deadline:
                    return False
                time.sleep(left)
            else:
                self._closing.wait(left)  # wakes at close() to check the deadline
        return True

    def _time_left(self) -> float:
        return self._deadline - time.monotonic()


# The two ways out ------------------------------------------------------------------------------------------------
def _post(settings: NotifyConfig, body: bytes, timeout: float) -> None:
    """POST the event to notify.webhook; the whole request (connect, send, headers and body) within `timeout` s."""
    parts = urllib.parse.urlsplit(settings.webhook)
    # conveyor.toml's validation should have caught these; urllib would also open file:// and ftp:// URLs.
    if parts.scheme not in ("http", "https"):
        raise Undeliverable("notify.webhook is not an http:// or https:// URL")
    if "@" in parts.netloc:
        raise Undeliverable("notify.webhook holds credentials (user:password@); send them with notify.secret_header")
    headers = {"Content-Type": "application/json", "User-Agent": "conveyor"}
    if settings.secret_header:
        name, colon, value = settings.secret_header.partition(":")
        if not colon or not name.strip():
            raise Undeliverable('notify.secret_header is not of the form "Name: value"')
        headers[name.strip()] = value.strip()
    try:
        _Try(urllib.request.Request(settings.webhook, data=body, headers=headers, method="POST"), timeout).run()
    except urllib.error.HTTPError as e:
        e.close()
        if 300 <= e.code < 400:  # _NoRedirects: not followed
            to = _where(e.headers.get("Location") or "") or "an address it did not give"
            raise Undeliverable(f"HTTP {e.code} {e.reason}, a redirect to {to}: conveyor does not follow a webhook's "
                                "redirects (the event and notify.secret_header would go where conveyor.toml does not "
                                "say); set notify.webhook to the address it redirects to") from None
        if 400 <= e.code < 500 and e.code not in (408, 429):
            raise Undeliverable(f"HTTP {e.code} {e.reason}") from None
        raise


class _Try:
    """One POST on a thread of its own, abandoned when its time is up. urllib's timeout bounds each socket read, not
    the request: an endpoint sending a byte a second would hold a try (and every later event) as long as it liked.
    The abandoned thread (a daemon thread: it never holds up exit) is woken by shutting its socket down."""

    def __init__(self, request: urllib.request.Request, timeout: float):
        self.request = request
        self.timeout = timeout
        self._lock = threading.Lock()  # guards _sockets and _abandoned between the two threads
        self._sockets: list[socket.socket] = []
        self._abandoned = False
        self._error: BaseException | None = None

    def run(self) -> None:
        thread = threading.Thread(target=self._request, name="notify-post", daemon=True)
        thread.start()
        thread.join(self.timeout)
        if thread.is_alive():
            with self._lock:
                self._abandoned = True
                for sock in self._sockets:
                    with contextlib.suppress(OSError):  # the plain socket's shutdown: an SSL one's is not thread-safe
                        socket.socket.shutdown(sock, socket.SHUT_RDWR)
            raise TimeoutError("out of time")
        if self._error is not None:
            raise self._error

    def _request(self) -> None:
        try:
            opener = urllib.request.build_opener(_KeepSockets(self._keep), _NoRedirects())
            with opener.open(self.request, timeout=self.timeout) as r:
                r.read(1 << 16)
        except Exception as e:  # handed to run(); nobody reads it once the try was abandoned
            self._error = e

    def _keep(self, sock: socket.socket) -> None:
        with self._lock:
            if self._abandoned:  # connected just after the deadline: do not send
                raise TimeoutError("out of time")
            self._sockets.append(sock)


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is an HTTPError, not a request elsewhere: urllib's handler would send the headers, the secret
    one included, to whatever origin the answer names (as a GET, the event itself dropped)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


class _KeepSockets(urllib.request.HTTPHandler, urllib.request.HTTPSHandler):
    """urllib's own http:// and https:// handling (proxies, TLS), handing each connected socket to `keep`."""

    def __init__(self, keep):
        super().__init__()
        self.keep = keep

    def http_open(self, req):
        return self.do_open(self._connection(http.client.HTTPConnection), req)

    def https_open(self, req):
        return self.do_open(self._connection(http.client.HTTPSConnection), req, context=self._context)

    def _connection(self, cls):
        def make(*args, **kwargs):
            conn = cls(*args, **kwargs)
            connect = conn.connect

            def connect_and_keep():
                connect()
                self.keep(conn.sock)

            conn.connect = connect_and_keep
            return conn

        return make


def _run_command(settings: NotifyConfig, body: bytes, timeout: float) -> None:
    # Its own session, so that on a timeout the whole group goes (a child holding the pipes would block us).
    try:
        p = subprocess.Popen(shlex.split(settings.command), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, start_new_session=True)
    except (ValueError, OSError) as e:  # unbalanced quotes, no such program, not executable
        raise Undeliverable(f"cannot run it ({e})") from e
    with p:
        try:
            _, err = p.communicate(body, timeout=timeout)  # one deadline for writing, reading and the exit
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
            raise
    if p.returncode != 0:
        tail = err.decode(errors="replace").strip()[-300:]
        raise RuntimeError(f"exit code {p.returncode}" + (f": {tail}" if tail else ""))


# Events ----------------------------------------------------------------------------------------------------------
def event(con: sqlite3.Connection, row: sqlite3.Row, workspace: str) -> dict:
    """The JSON-ready event of one events-table row, with its job's file, steps, losses and evaluations."""
    ev = {"id": row["id"], "kind": row["kind"], "job": row["job_id"], "file": None, "steps": None,
          "planned_steps": None, "start_step": None, "end_step": None, "losses": None, "message": row["message"],
          "ts": row["ts"], "workspace": workspace}
    job = con.execute("SELECT * FROM jobs WHERE id = ?", (row["job_id"],)).fetchone() \
        if row["job_id"] is not None else None
    if job is None:
        return ev
    ev.update(file=job["file"], steps=job["steps_done"], planned_steps=job["planned_steps"],
              start_step=job["start_step"], end_step=job["end_step"], losses=_losses(con, job))
    if job["format"] in PREFERENCE_FORMATS and job["run_id"]:
        ev.update(_preference(con, job))
    evals = _evals(con, job["run_id"], job["end_step"]) if job["run_id"] and job["end_step"] else {}
    if evals:
        ev["eval"] = evals
        answers = answers_at(con, job["run_id"], job["end_step"])
        if answers:
            ev["answers"] = answers
        preferred = preference_at(con, job["run_id"], job["end_step"])
        if preferred:
            ev["preference"] = preferred
    return ev


def _preference(con: sqlite3.Connection, job: sqlite3.Row) -> dict:
    """A preference or feedback job's method and reference, as its newest ledger row keeps them, and the margin and
    accuracy of its newest step (each left out when there is none yet)."""
    out = {}
    row = con.execute("SELECT method, reference FROM ledger WHERE run_id = ? AND job_id = ? AND outcome != 'lost'"
                      " AND method IS NOT NULL ORDER BY id DESC LIMIT 1", (job["run_id"], job["id"])).fetchone()
    if row is not None:
        out["method"] = row["method"]
        if row["reference"]:
            reference = json.loads(row["reference"])
            out["reference"] = {**reference, "name": step_name(con, job["run_id"], reference["step"])}
    if job["start_step"] is not None:
        step = con.execute("SELECT margin, accuracy FROM metrics WHERE run_id = ? AND step BETWEEN ? AND ?"
                           " AND job_id = ? AND margin IS NOT NULL ORDER BY step DESC LIMIT 1",
                           (job["run_id"], job["start_step"], job["end_step"] or job["start_step"],
                            job["id"])).fetchone()
        if step is not None:
            out["rewards"] = dict(step)
    return out


def _losses(con: sqlite3.Connection, job: sqlite3.Row) -> dict | None:
    """First, last and mean (weighted by steps) loss over the job's segments not lost to a rewind."""
    rows = con.execute("SELECT * FROM ledger WHERE run_id = ? AND job_id = ? AND outcome != 'lost' ORDER BY id",
                       (job["run_id"], job["id"])).fetchall()
    firsts = [r["first_loss"] for r in rows if r["first_loss"] is not None]
    lasts = [r["last_loss"] for r in rows if r["last_loss"] is not None]
    means = [(r["mean_loss"], r["end_step"] - r["start_step"] + 1) for r in rows if r["mean_loss"] is not None]
    if not means:
        return None
    return {"first": firsts[0], "last": lasts[-1], "mean": sum(m * n for m, n in means) / sum(n for _, n in means)}


def _evals(con: sqlite3.Connection, run_id: str, step: int) -> dict[str, float]:
    out = {"eval.file": r["eval_loss"] for r in con.execute(
        "SELECT eval_loss FROM evals WHERE run_id = ? AND step = ?", (run_id, step))}
    out.update({r["name"]: r["loss"] for r in con.execute(
        "SELECT name, loss FROM set_evals WHERE run_id = ? AND step = ? ORDER BY name", (run_id, step))})
    return out


def _name(ev: dict) -> str:
    return f"'{ev['kind']}'" + (f" (job {ev['job']})" if ev["job"] is not None else "")


def _describe(e: Exception, timeout: float) -> str:
    if isinstance(e, subprocess.TimeoutExpired):
        return f"did not finish within {timeout:.1f} s (notify.timeout_seconds)"
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    reason = getattr(e, "reason", None)  # a URLError's
    if isinstance(e, TimeoutError) or isinstance(reason, TimeoutError) or "timed out" in str(reason or ""):
        return f"no complete answer within {timeout:.1f} s (notify.timeout_seconds)"
    if isinstance(e, urllib.error.URLError):
        return f"cannot reach it ({reason})"
    return f"{type(e).__name__}: {e}" if not isinstance(e, RuntimeError) else str(e)


def _where(url: str) -> str:
    """The webhook's host and port: its path and query may carry a token (Slack's and Discord's paths do)."""
    return urllib.parse.urlsplit(url).netloc.rpartition("@")[2]


def _scrub(text: str, url: str) -> str:
    """`text` without the webhook URL's secrets: the URL itself becomes its host and port; its path, query, fragment
    and credentials (which conveyor.toml refuses) become '…' wherever an error message quotes them."""
    if not url:
        return text
    parts = urllib.parse.urlsplit(url)
    text = text.replace(url, _where(url))
    for secret in (parts.netloc.rpartition("@")[0], parts.password, parts.query, parts.fragment, parts.path):
        if secret and len(secret) > 1:
            text = text.replace(secret, "…")
    return text


def _log_quietly(con: sqlite3.Connection, text: str) -> None:
    try:
        log_event(con, "warning", "notify", text)
    except sqlite3.Error:
        pass
