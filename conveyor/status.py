"""What conveyor is doing now, as one dict: shared by `conveyor status --json` and the dashboard."""

from __future__ import annotations

import os
import time

from . import controls, jobs, runs
from .errors import ConveyorError
from .workspace import Workspace

LOCK_FILE = "daemon.lock"


def daemon_pid(ws: Workspace) -> int | None:
    """PID of the live daemon holding the workspace lock, if any."""
    path = ws.root / LOCK_FILE
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return pid


def schedule_text(config) -> str:
    t = config.training
    if t.schedule == "constant":
        return f"warmup {t.warmup_steps} step(s) once at the start of the run, then constant at {t.learning_rate}"
    return f"per job: warmup {t.warmup_steps} step(s), then cosine decay from {t.learning_rate} to 0"


def current_job(ws: Workspace) -> dict | None:
    """The running job with progress and an ETA from the recent step times."""
    row = ws.db.execute("SELECT * FROM jobs WHERE state = 'running' ORDER BY id LIMIT 1").fetchone()
    if row is None:
        return None
    job = jobs.Job.from_row(row)
    recent = ws.db.execute("SELECT step_time, loss FROM metrics WHERE run_id = ? AND job_id = ? ORDER BY step DESC"
                           " LIMIT 20", (job.run_id, job.id)).fetchall()
    times = [r["step_time"] for r in recent if r["step_time"]]
    remaining = (job.planned_steps or 0) - job.steps_done
    eta = remaining * sum(times) / len(times) if times else None
    return {**job.to_json(), "progress": job.steps_done / job.planned_steps if job.planned_steps else 0.0,
            "eta_seconds": eta, "loss": recent[0]["loss"] if recent else None}


def status_data(ws: Workspace) -> dict:
    try:
        config = ws.config()
        config_error = None
    except ConveyorError as e:
        config, config_error = None, str(e)
    active = runs.active(ws.db)
    all_jobs = jobs.all_jobs(ws.db)
    last_eval = None
    if active:
        row = ws.db.execute("SELECT step, eval_loss FROM evals WHERE run_id = ? ORDER BY step DESC LIMIT 1",
                            (active.id,)).fetchone()
        last_eval = dict(row) if row else None
    pid = daemon_pid(ws)
    return {
        "workspace": str(ws.root),
        "time": time.time(),
        "daemon": {"pid": pid, "running": pid is not None, "paused": controls.paused(ws.db)},
        "run": active.to_json() if active else None,
        "runs": [r.to_json() for r in runs.all_runs(ws.db)],
        "schedule": schedule_text(config) if config else None,
        "config_error": config_error,
        "current": current_job(ws),
        "last_eval": last_eval,
        "queue": [j.to_json() for j in all_jobs if j.state in (jobs.JobState.QUEUED, jobs.JobState.RUNNING)],
        "failures": [j.to_json() for j in all_jobs if j.state in (jobs.JobState.FAILED, jobs.JobState.REJECTED)][-10:],
        "free_disk_bytes": ws.free_bytes(),
        "jobs": [j.to_json() for j in all_jobs],
    }
