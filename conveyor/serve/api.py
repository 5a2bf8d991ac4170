"""The dashboard's JSON API: one small function a route, each a thin reader over the modules that own the data
(status, ledger, series, versions, controls), and the two that do more: asking the model (a separate process) and
the stream of updates. dashboard.py serves them with the page, behind its guards."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Optional

import anyio
from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from ..errors import ConveyorError
from ..store import controls, ledger, runs, series, versions
from ..store.workspace import Workspace
from .status import daemon_pid, events_after, jobs_page, last_event_id, lineage_steps, status_data

NOT_ACKNOWLEDGED = "requested, not yet acknowledged (is the daemon running?)"

EXPIRED = "expired: no daemon was running to act on it"

# The status the page polls lists this many of the newest jobs and of the queue; counts cover the rest.
STATUS_JOBS = 100

END = series.END  # a step past any step: the default end of a range

# Asking the model: a separate `conveyor generate` process per question, one at a time, at a lower CPU priority than
# training, killed after ASK_TIMEOUT seconds. The model never loads into the dashboard's (or the daemon's) process.
ASK_TIMEOUT = 120.0

ASK_NICENESS = 10

ASK_BUSY = ("another question is being answered; ask again when its answer is shown (one question at a time, so "
            "that answering never crowds out training)")

class ControlBody(BaseModel):
    reason: Optional[str] = None

class AskBody(BaseModel):
    prompt: str = Field(min_length=1, max_length=8000)  # it travels as one command-line argument
    version: Optional[str] = None  # default: the newest checkpoint
    max_new_tokens: int = Field(64, ge=1, le=512)

@contextmanager
def open_workspace(root: Path) -> Iterator[Workspace]:
    """A Workspace with its own database connection, opened and closed in the calling thread (sqlite3 connections
    refuse to cross threads, and FastAPI runs each request in a pool thread)."""
    ws = Workspace(root)
    try:
        yield ws
    finally:
        ws.db.close()

def resolve_run(con: sqlite3.Connection, run: str | None) -> str | None:
    """The asked-for run id (404 if unknown), or the active run's id (None when there is no run yet)."""
    if run is None:
        active = runs.active(con)
        return active.id if active else None
    known = [r.id for r in runs.all_runs(con)]
    if run not in known:
        raise HTTPException(404, f"no run {run!r}; known runs: {', '.join(known) or 'none yet'}")
    return run

def for_run(root: Path, run: str | None, read: Callable[[sqlite3.Connection, str], dict], empty: dict) -> dict:
    """`read`'s answer for a run (default: the active one) with the run's id and lineage (the steps it inherited
    from the runs it branched from, then its own: status.lineage_steps); `empty` when there is no run yet."""
    with open_workspace(root) as ws:
        run_id = resolve_run(ws.db, run)
        if run_id is None:
            return {"run": None, "lineage": [], **empty}
        return {"run": run_id, "lineage": lineage_steps(ws.db, run_id), **read(ws.db, run_id)}

def snapshot(ws: Workspace) -> dict:
    """What the stream compares every second: small, and different whenever the page has something to refetch."""
    data = status_data(ws, max_jobs=STATUS_JOBS)
    run_id = data["run"]["id"] if data["run"] else None
    stable = {k: v for k, v in data.items() if k not in ("time", "free_disk_bytes")}
    return {
        "run": run_id,
        "global_step": data["run"]["global_step"] if data["run"] else 0,
        "event_id": last_event_id(ws.db),
        **series.latest(ws.db, run_id),  # the last steps of the run's lineage, not counts: index seeks
        "status_hash": hashlib.sha256(json.dumps(stable, sort_keys=True, default=str).encode()).hexdigest()[:16],
    }

def _wait(con, request_id: int, timeout: float) -> tuple[str | None, bool]:
    """The answer within `timeout` seconds (None if none yet) without expiring it: a running daemon keeps it."""
    deadline = time.monotonic() + timeout
    while True:
        result, taken = controls.result_of(con, request_id)
        if result is not None or time.monotonic() >= deadline:
            return result, taken
        time.sleep(0.05)

async def ask_in_process(root: Path, body: AskBody, timeout: float) -> JSONResponse:
    """`conveyor generate --json` in a child process (guarded to die with this one): its answer and pid, 409 with
    its message when it cannot answer, 504 when it takes longer than `timeout` seconds (it is killed)."""
    argv = [sys.executable, "-m", "conveyor.queue.process", str(os.getpid()), "--",
            sys.executable, "-m", "conveyor", "-w", str(root), "generate", "--json",
            "--max-new-tokens", str(body.max_new_tokens), *(["--version", body.version] if body.version else []),
            "--", body.prompt]
    out, err = bytearray(), bytearray()

    async def drain(stream, into: bytearray) -> None:
        async for chunk in stream:
            into += chunk

    async with await anyio.open_process(argv, stdin=subprocess.DEVNULL, start_new_session=True) as child:
        with contextlib.suppress(AttributeError, OSError):  # not POSIX, or not allowed: the same priority
            os.setpriority(os.PRIO_PROCESS, child.pid, ASK_NICENESS)
        with anyio.move_on_after(timeout) as waited:
            async with anyio.create_task_group() as group:
                group.start_soon(drain, child.stdout, out)
                group.start_soon(drain, child.stderr, err)
            await child.wait()
        if waited.cancelled_caught:
            child.kill()
            return JSONResponse({"detail": f"no answer within {timeout:g} s, so it was stopped: on this machine the "
                                           "model answers too slowly; ask for fewer new tokens"}, 504)
    if child.returncode == 0:
        with contextlib.suppress(ValueError):
            return JSONResponse({**json.loads(out), "pid": child.pid})
    text = err.decode(errors="replace")
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("error: ")), None)
    if child.returncode == 1 and start is not None:  # a ConveyorError: it says what is wrong and what to do
        return JSONResponse({"detail": "\n".join(lines[start:])[len("error: "):]}, 409)
    return JSONResponse({"detail": f"the answering process gave no answer (exit code {child.returncode}): "
                                   + "\n".join(lines[-5:])}, 500)

def control_request(root: Path, action: str, reason: str | None, timeout: float) -> JSONResponse:
    """Ask the worker to pause, resume, stop or skip; answer with what it did (202 if it did not answer)."""
    valid = [a.value for a in controls.Action]
    if action not in valid:
        raise HTTPException(404, f"no control {action!r}; valid actions: {', '.join(valid)}")
    with open_workspace(root) as ws:
        request_id = controls.ask(ws.db, controls.Action(action), who="dashboard", reason=reason)
        result, _ = _wait(ws.db, request_id, timeout)
        # With no daemon to act on it, the request expires (as the CLI's do): a daemon started later must not
        # act on a click nobody waits for. A running daemon keeps it and acts between steps.
        expired = result is None and daemon_pid(ws) is None and controls.expire(ws.db, request_id, EXPIRED)
        if result is None and not expired:
            result, _ = controls.result_of(ws.db, request_id)  # answered at the last moment
    if result is None:
        return JSONResponse({"request_id": request_id, "result": None, "message": NOT_ACKNOWLEDGED,
                             "expired": expired}, 202)
    return JSONResponse({"request_id": request_id, "result": result, "message": result, "expired": False})

async def stream_updates(root: Path, request: Request, interval: float, heartbeat: float) -> AsyncIterator[str]:
    """Server-sent events: `update` with a snapshot whenever it changes, a comment heartbeat otherwise."""
    def take() -> dict:
        with open_workspace(root) as ws:
            return snapshot(ws)

    yield "retry: 2000\n\n"
    last, quiet = None, 0.0
    while not (request.app.state.closing() or await request.is_disconnected()):
        current = await run_in_threadpool(take)
        if current != last:
            yield f"event: update\ndata: {json.dumps(current)}\n\n"
            last, quiet = current, 0.0
        elif quiet >= heartbeat:
            yield ": heartbeat\n\n"
            quiet = 0.0
        await anyio.sleep(interval)
        quiet += interval

NO_SERIES = {"rows": [], "downsampled": False}

def check_version(root: Path, version: str) -> None:
    """404 naming the versions there are, before a process is started for a version that does not exist."""
    with open_workspace(root) as ws:
        try:
            versions.find(ws.db, version)
        except ConveyorError as e:
            raise HTTPException(404, str(e)) from None


@dataclass
class Settings:
    """What the routes need of the app that serves them (create_app keeps it as app.state.settings)."""
    root: Path
    control_timeout: float = 10.0
    stream_interval: float = 1.0
    heartbeat_seconds: float = 15.0
    ask_timeout: float = ASK_TIMEOUT
    # One question at a time. Not an asyncio lock: the test client runs each request on its own event loop.
    asking: threading.Lock = field(default_factory=threading.Lock)


def settings(request: Request) -> Settings:
    return request.app.state.settings


App = Annotated[Settings, Depends(settings)]
router = APIRouter()  # create_app adds the token check (authorizer) to every route


@router.get("/api/status")
def status(app: App) -> dict:
    with open_workspace(app.root) as ws:
        return status_data(ws, max_jobs=STATUS_JOBS)


@router.get("/api/runs")
def runs_(app: App) -> list[dict]:
    """Every run, with how many metric rows it has of its own."""
    with open_workspace(app.root) as ws:
        return [{**r.to_json(), "metric_rows": series.metric_count(ws.db, r.id)} for r in runs.all_runs(ws.db)]


@router.get("/api/jobs")
def jobs_(app: App, offset: int = Query(0, ge=0, le=END), limit: int = Query(200, ge=1, le=1000)) -> dict:
    """A page of the jobs, newest first, and the head of the queue (the running job, then training order)."""
    with open_workspace(app.root) as ws:
        return jobs_page(ws.db, offset, limit)


@router.get("/api/metrics")
def metrics(app: App, run: Optional[str] = None, since_step: int = Query(0, ge=0, le=END),
            start: int = Query(0, ge=0, le=END), end: int = Query(END, ge=0, le=END),
            points: int = Query(2000, ge=1, le=5000)) -> JSONResponse:
    """The run's metric rows after `since_step` and in steps start..end: one a step when there are at most
    `points`, else at most `points` rows each merging a range of steps."""
    first = max(since_step + 1, start)
    # thousands of rows: skip FastAPI's per-value encoder
    return JSONResponse(for_run(app.root, run, lambda con, run_id: series.metric_series(con, run_id, first, end,
                                                                                        points), NO_SERIES))


@router.get("/api/evals")
def evals(app: App, run: Optional[str] = None, start: int = Query(0, ge=0, le=END),
          end: int = Query(END, ge=0, le=END), points: int = Query(2000, ge=1, le=5000)) -> JSONResponse:
    """The run's evaluations in steps start..end: at most `points` rows, merged by step ranges beyond that."""
    return JSONResponse(for_run(app.root, run, lambda con, run_id: series.eval_series(con, run_id, start, end,
                                                                                      points), NO_SERIES))


@router.get("/api/samples")
def samples(app: App, run: Optional[str] = None, limit: int = Query(20, ge=1, le=500)) -> dict:
    """The latest sample generations, newest first."""
    return for_run(app.root, run, lambda con, run_id: {"rows": series.samples(con, run_id, limit)}, {"rows": []})


@router.get("/api/ledger")
def ledger_(app: App, run: Optional[str] = None, offset: int = Query(0, ge=0, le=END),
            limit: int = Query(200, ge=1, le=1000)) -> dict:
    """A page of the run's ledger rows, newest first, with how many there are."""
    def read(con: sqlite3.Connection, run_id: str) -> dict:
        rows, total = ledger.page(con, run_id, offset, limit)
        return {"rows": rows, "total": total}

    return {**for_run(app.root, run, read, {"rows": [], "total": 0}), "offset": offset}


@router.get("/api/set_evals")
def set_evals(app: App, run: Optional[str] = None) -> dict:
    """The run's held-out sets' losses at every evaluation, by step (a few sets a step, evaluations are sparse)."""
    return for_run(app.root, run, lambda con, run_id: {"rows": series.set_eval_rows(con, run_id)}, {"rows": []})


@router.get("/api/events")
def events(app: App, after_id: int = Query(0, ge=0, le=END), limit: int = Query(200, ge=1, le=1000)) -> list[dict]:
    """Events with an id above `after_id`: the newest `limit` of them, oldest first."""
    with open_workspace(app.root) as ws:
        return events_after(ws.db, after_id, limit)


@router.get("/api/versions")
def versions_(app: App) -> list[dict]:
    """Every version (v1, v2, ...), oldest first, as `conveyor versions --json` lists them."""
    with open_workspace(app.root) as ws:
        return versions.all_versions(ws.db, ws.runs)


@router.get("/api/matrix")
def matrix(app: App, run: Optional[str] = None) -> dict:
    """Versions × evaluation sets, as `conveyor eval --matrix --json` shows them (without `run`: the active
    run's lineage)."""
    with open_workspace(app.root) as ws:
        return versions.matrix(ws.db, resolve_run(ws.db, run) if run else None)


@router.post("/api/control/{action}")
def control(app: App, action: str, body: Optional[ControlBody] = None) -> JSONResponse:
    """Ask the worker to pause, resume, stop or skip; answer with what it did (202 if it did not answer)."""
    return control_request(app.root, action, body.reason if body else None, app.control_timeout)


@router.post("/api/ask")
async def ask(app: App, body: AskBody) -> JSONResponse:
    """Answer a prompt with the newest checkpoint or a version, as `conveyor generate --json` does, in a separate
    process: a running job only shares the CPU. One question at a time (429 while one is being answered)."""
    if body.version is not None:
        await run_in_threadpool(check_version, app.root, body.version)
    if not app.asking.acquire(blocking=False):
        raise HTTPException(429, ASK_BUSY)
    try:
        return await ask_in_process(app.root, body, app.ask_timeout)
    finally:
        app.asking.release()


@router.get("/api/stream")
async def stream(app: App, request: Request) -> StreamingResponse:
    """Server-sent events: `update` with a snapshot whenever it changes, a comment heartbeat otherwise."""
    return StreamingResponse(stream_updates(app.root, request, app.stream_interval, app.heartbeat_seconds),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
