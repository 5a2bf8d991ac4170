"""What conveyor is doing now, as one dict: shared by `conveyor status --json` and the dashboard."""

from __future__ import annotations

import time

from ..data.formats import FEEDBACK
from ..errors import ConveyorError
from ..store import controls, jobs, ledger, runs, series, versions
from ..store.lock import daemon_pid
from ..store.workspace import Workspace


def schedule_text(config) -> str:
    t = config.training
    if t.schedule == "constant":
        return f"warmup {t.warmup_steps} step(s) once at the start of the run, then constant at {t.learning_rate}"
    return f"per job: warmup {t.warmup_steps} step(s), then cosine decay from {t.learning_rate} to 0"


def precision_settings(config) -> dict:
    """The precision and memory settings, as configured (the run identity records those that are identity)."""
    m, t = config.model, config.training
    return {"model.precision": m.precision, "model.quantization": m.quantization,
            "model.attn_implementation": m.attn_implementation, "training.mixed_precision": t.mixed_precision,
            "training.gradient_checkpointing": t.gradient_checkpointing, "training.optimizer": t.optimizer,
            "training.deterministic": t.deterministic, "training.packing": t.packing}


def precision_text(settings: dict) -> str:
    s = settings
    base = f"base {s['model.precision']}" + (f" quantized {s['model.quantization']}"
                                             if s["model.quantization"] != "none" else "")
    autocast = "no autocast" if s["training.mixed_precision"] == "no" else f"{s['training.mixed_precision']} autocast"
    checkpointing = "on" if s["training.gradient_checkpointing"] else "off"
    return (f"{base}, {autocast}, attention {s['model.attn_implementation']}, gradient checkpointing "
            f"{checkpointing}, optimizer {s['training.optimizer']}"
            + (", deterministic kernels" if s.get("training.deterministic") else "")
            + (", padding-free batches (where they save compute)" if s.get("training.packing") else ", padded batches"))


def current_job(ws: Workspace) -> dict | None:
    """The running job with progress and an ETA from the recent step times."""
    job = jobs.running(ws.db)
    if job is None:
        return None
    # From the job's first step on only: unbounded, a job yet to write a step would scan the whole run backwards.
    recent = [] if job.start_step is None else ws.db.execute(
        "SELECT step_time, loss, margin, accuracy FROM metrics WHERE run_id = ? AND job_id = ? AND step >= ?"
        " ORDER BY step DESC LIMIT 20", (job.run_id, job.id, job.start_step)).fetchall()
    times = [r["step_time"] for r in recent if r["step_time"]]
    remaining = (job.planned_steps or 0) - job.steps_done
    eta = remaining * sum(times) / len(times) if times else None
    newest = recent[0] if recent else {"loss": None, "margin": None, "accuracy": None}
    return {**job.to_json(), "progress": job.steps_done / job.planned_steps if job.planned_steps else 0.0,
            "eta_seconds": eta, "loss": newest["loss"], "margin": newest["margin"], "accuracy": newest["accuracy"]}


def preference_job(con, run_id: str, config) -> dict | None:
    """The newest preference or feedback job of a run's lineage (series.preference_job), with its method and its
    reference named as a person calls it (`v2`, `base`, `step 12`)."""
    job = series.preference_job(con, run_id)
    if job is None:
        return None
    ref = job["reference"]
    return {**job, "method": _method(con, job, config),
            "reference": {**ref, "name": versions.step_name(con, job["run_id"], ref["step"])} if ref else None}


def _method(con, job: dict, config) -> str:
    """How the job trains: as its ledger rows say once a segment ended (a job keeps the method it began with), else
    as it would begin now (kto for feedback; its `--set training.preference`, else conveyor.toml's)."""
    row = con.execute("SELECT method FROM ledger WHERE job_id = ? AND method IS NOT NULL ORDER BY id DESC LIMIT 1",
                      (job["id"],)).fetchone()
    if row is not None:
        return row["method"]
    if job["format"] == FEEDBACK:
        return "kto"
    return job["overrides"].get("training.preference") or (config.training.preference if config else "preference")


def status_data(ws: Workspace, max_jobs: int | None = None) -> dict:
    """What conveyor is doing now. `max_jobs` bounds the job lists (the newest jobs, the head of the queue; counts
    cover the rest) for the dashboard, which asks every second; by default, as `conveyor status`, they are whole."""
    try:
        config = ws.config()
        config_error = None
    except ConveyorError as e:
        config, config_error = None, str(e)
    active = runs.active(ws.db)
    pid = daemon_pid(ws)
    queue, queue_total = queue_head(ws.db, max_jobs)
    current = current_job(ws)
    preference = preference_job(ws.db, active.id, config) if active else None
    if current and preference and current["id"] == preference["id"]:
        current.update(method=preference["method"], reference=preference["reference"])
    return {
        "workspace": str(ws.root),
        "time": time.time(),
        "daemon": {"pid": pid, "running": pid is not None, "paused": controls.paused(ws.db),
                   "pause": controls.pause_text(ws.db), "disk": _waiting_for_disk(ws.db) if pid else None},
        "run": {**active.to_json(), "lineage": lineage_steps(ws.db, active.id)} if active else None,
        "runs": [r.to_json() for r in runs.all_runs(ws.db)],
        "schedule": schedule_text(config) if config else None,
        "precision": precision_settings(config) if config else None,
        "config_error": config_error,
        "current": current,
        "last_eval": series.last_eval(ws.db, active.id) if active else None,
        "preference": preference,
        "queue": queue,
        "queue_total": queue_total,
        "failures": _failures(ws.db),
        "free_disk_bytes": ws.free_bytes(),
        "jobs": _newest_jobs(ws.db, max_jobs),
        "job_counts": job_counts(ws.db),
    }


def lineage_steps(con, run_id: str) -> list[dict]:
    """The global steps a run is made of, oldest first: for a rollback's run, those it inherited from the run it
    branched from (up to the version it branched from: "version"), then its own. `steps` may be 0 (then no
    first or last step): a new branch that has trained nothing yet."""
    known = {r.id: r for r in runs.all_runs(con)}
    spans = series.lineage(con, run_id)
    out = []
    for span, child in zip(spans, spans[1:] + [None]):
        first, last = max(span.first, 1), span.last if span.inherited else known[span.run].global_step
        steps = max(0, last - first + 1)
        out.append({"run": span.run, "inherited": span.inherited, "first_step": first if steps else None,
                    "last_step": last if steps else None, "steps": steps,
                    **({"version": f"v{known[child.run].parent_version}"} if child else {})})
    return out


def lineage_text(spans: list[dict]) -> str:
    """`steps 1–2 inherited from run-0001 (up to v1), 3–6 its own`."""
    said = [(f"{s['first_step']}–{s['last_step']} " if s["steps"] else "none ")
            + (f"inherited from {s['run']} (up to {s['version']})" if s["inherited"] else
               "its own" if s["steps"] else "of its own yet") for s in spans]
    return "steps " + ", ".join(said)


def jobs_page(con, offset: int, limit: int) -> dict:
    """A page of the jobs, newest first, each with the replayed examples its steps trained; the head of the queue
    (the running job, then training order) and how many jobs there are."""
    page = [jobs.Job.from_row(r).to_json() for r in con.execute("SELECT * FROM jobs ORDER BY id DESC LIMIT ? OFFSET ?",
                                                                 (limit, offset))]
    replayed = ledger.replayed_by_job(con, [j["id"] for j in page])
    queue, queue_total = queue_head(con, limit)
    return {"queue": queue, "jobs": [{**j, "replayed": replayed.get(j["id"], 0)} for j in page],
            "total": sum(job_counts(con).values()), "queue_total": queue_total}


def last_event_id(con) -> int:
    return con.execute("SELECT COALESCE(MAX(id), 0) FROM events").fetchone()[0]


def events_after(con, after_id: int, limit: int) -> list[dict]:
    """Events with an id above `after_id`: the newest `limit` of them, oldest first."""
    rows = con.execute("SELECT * FROM events WHERE id > ? ORDER BY id DESC LIMIT ?", (after_id, limit))
    return [dict(r) for r in rows][::-1]


def _waiting_for_disk(con) -> str | None:
    """What a running daemon last said about disk space, while it waits for room (None once it went on)."""
    row = con.execute("SELECT level, message FROM events WHERE kind = 'disk' ORDER BY id DESC LIMIT 1").fetchone()
    return row["message"] if row and row["level"] == "error" else None


ACTIVE_STATES = "('running', 'queued', 'interrupted')"


def queue_head(con, limit: int | None = None) -> tuple[list[dict], int]:
    """The running job then the waiting ones in training order (the first `limit` of them), and how many there are."""
    if limit is None:
        queue = [j.to_json() for j in jobs.running_and_waiting(con)]
        return queue, len(queue)
    rows = con.execute(f"SELECT * FROM jobs WHERE state IN {ACTIVE_STATES}"
                       f" ORDER BY state = 'running' DESC, {jobs.QUEUE_ORDER} LIMIT ?", (limit,))
    total = con.execute(f"SELECT COUNT(*) FROM jobs WHERE state IN {ACTIVE_STATES}").fetchone()[0]
    return [jobs.Job.from_row(r).to_json() for r in rows], total


def job_counts(con) -> dict[str, int]:
    """How many jobs are in each state (states with none left out)."""
    return {r[0]: r[1] for r in con.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state")}


def _newest_jobs(con, limit: int | None) -> list[dict]:
    """The newest `limit` jobs (all by default), oldest first as `conveyor status` lists them."""
    rows = con.execute("SELECT * FROM (SELECT * FROM jobs ORDER BY id DESC LIMIT ?) ORDER BY id",
                       (-1 if limit is None else limit,))  # LIMIT -1: no limit
    return [jobs.Job.from_row(r).to_json() for r in rows]


def _failures(con) -> list[dict]:
    """The last 10 failed or rejected jobs, oldest first."""
    rows = con.execute("SELECT * FROM jobs WHERE state IN ('failed', 'rejected') ORDER BY id DESC LIMIT 10")
    return [jobs.Job.from_row(r).to_json() for r in rows][::-1]


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def render(data: dict):
    """The status as rich renderables (one screen)."""
    from rich.console import Group
    from rich.table import Column, Table
    from rich.text import Text

    parts = []
    daemon = data["daemon"]
    state = "paused" if daemon["paused"] else "training" if data["current"] else "idle"
    parts.append(Text(f"daemon: pid {daemon['pid']}, {state}" if daemon["running"] else "daemon: not running"))
    if daemon.get("pause"):
        parts.append(Text(f"  {daemon['pause']}", "yellow"))
    if daemon.get("disk"):
        parts.append(Text(f"  waiting for disk space: {daemon['disk']}", "red"))
    run = data["run"]
    if run:
        ident = run["identity"]
        adapter = f"lora r={ident.get('adapter.r')} alpha={ident.get('adapter.alpha')} on " \
            f"{','.join(ident.get('adapter.target_modules') or [])}" if ident["adapter.method"] == "lora" else "full"
        quantized = f", {ident['model.quantization']}" if ident.get("model.quantization") else ""
        parts.append(Text(f"run {run['id']} at global step {run['global_step']}: {ident['model.name']} "
                          f"({ident['model.precision']}{quantized}), {adapter}"))
        if run.get("parent_run"):
            parts.append(Text(f"  branched from {run['parent_version']} of {run['parent_run']} by a rollback "
                              f"({run['note']})"))
            parts.append(Text(f"  {lineage_text(run['lineage'])}"))
    else:
        parts.append(Text("run: none yet"))
    for other in data["runs"]:
        if not other["active"]:
            parts.append(Text(f"  kept: {other['id']} (step {other['global_step']}) {other['note'] or ''}", "dim"))
    if data["config_error"]:
        parts.append(Text(f"settings problem: {data['config_error']}", "red"))
    else:
        parts.append(Text(f"schedule: {data['schedule']}"))
        parts.append(Text(f"precision and memory: {precision_text(data['precision'])}"))
    if data["last_eval"]:
        parts.append(Text(f"eval loss {data['last_eval']['eval_loss']:.4f} at step {data['last_eval']['step']}"))
    cur = data["current"]
    if cur:
        loss = f"{cur['loss']:.4f}" if cur["loss"] is not None else "-"
        if not data["daemon"]["running"]:  # `running` with no process to train it: a crash's (or SIGKILL's) leftover
            parts.append(Text(f"job {cur['id']} {cur['file']}: its training process ended without a word (a crash "
                              f"or SIGKILL) after step {cur['steps_done']} of {cur['planned_steps'] or '?'}; it "
                              "resumes from its newest checkpoint when training starts (`conveyor run` or `train`)"))
        elif cur["planned_steps"] is None:  # claimed, not planned yet: validating, tokenizing or loading the model
            parts.append(Text(f"job {cur['id']} {cur['file']}: starting (tokenizing its data and loading the model)"))
        else:
            parts.append(Text(f"job {cur['id']} {cur['file']}{trained_as(cur)}: step {cur['steps_done']}/"
                              f"{cur['planned_steps']} (global {cur['start_step']}–{cur['end_step']}), loss {loss}"
                              f"{rewards_text(cur)}, ETA {_duration(cur['eta_seconds'])}"))
            parts.append(Text(bar(cur["steps_done"], cur["planned_steps"])))  # text: a pipe keeps it, and its line
    parts += [Text(line) for line in preference_lines(data.get("preference"), cur)]
    queue = Table("job", "file", "priority", "state", "examples", "steps", title="queue", title_justify="left")
    for j in data["queue"]:
        queue.add_row(str(j["id"]), j["file"], j["priority"], j["state"], str(j["examples"]),
                      f"{j['steps_done']}/{j['planned_steps']}" if j["planned_steps"] else "-")
    parts.append(queue if data["queue"] else Text("queue: empty"))
    done = Table(Column("job", no_wrap=True), Column("file", overflow="fold"), Column("state", no_wrap=True),
                 Column("global\nsteps", no_wrap=True), Column("notes", overflow="fold"), title="jobs",
                 title_justify="left")  # only a name, or a word longer than the notes' width, is folded
    ended = [j for j in data["jobs"] if j["state"] not in ("queued", "running", "interrupted")]
    for j in ended:
        span = f"{j['start_step']}–{j['end_step']}" if j["start_step"] else "-"
        done.add_row(str(j["id"]), Text(j["file"]), j["state"], span, Text(note(j)))  # Text: no markup in a name
    if any(note(j).endswith(MORE) for j in ended):
        done.caption = (f"{MORE.strip()} the reason goes on: `conveyor status --json` shows it whole (and rejected/ "
                        "keeps a rejected file's beside it)")
    if done.row_count:
        parts.append(done)
    parts.append(Text(f"free disk: {data['free_disk_bytes'] / 1e9:.1f} GB"))
    return Group(*parts)


def preference_lines(pref: dict | None, cur: dict | None) -> list[str]:
    """The newest preference job's lines: under the running job (which shows its margin and accuracy) the share of
    its held-out pairs preferred; once it no longer runs, a line of its own with its last step's numbers."""
    if pref is None:
        return []
    held = pref["held_out"]
    if cur and cur["id"] == pref["id"]:
        return [f"  {held_out_text(held)}"] if held else []
    if pref["step"] is None:  # it never trained a step
        return []
    loss = f" loss {pref['loss']:.4f}" if pref["loss"] is not None else ""
    return [f"last preference job {pref['id']} {pref['file']}{trained_as(pref)}, {pref['state']}: at step "
            f"{pref['step']}{loss}{rewards_text(pref)}" + (f"; {held_out_text(held)}" if held else "")]


def trained_as(job: dict) -> str:
    """` (dpo against v1)` for a preference or feedback job (ORPO has no reference); nothing for another."""
    if not job.get("method"):
        return ""
    ref = job.get("reference")
    return f" ({job['method']}" + (f" against {ref['name']}" if ref and ref.get("name") else "") + ")"


def rewards_text(row: dict) -> str:
    """`, margin +0.0099, accuracy 100%`: a preference step's mean reward margin (chosen minus rejected; feedback:
    good answers minus bad) and the share of pairs it ranks right; nothing for a supervised step."""
    return ((f", margin {row['margin']:+.4f}" if row.get("margin") is not None else "")
            + (f", accuracy {row['accuracy']:.0%}" if row.get("accuracy") is not None else ""))


def held_out_text(held: dict) -> str:
    return (f"held-out pairs: the chosen answer more likely in {held['preference']:.0%} of {held['examples']} "
            f"(step {held['step']})")


MORE = " …"  # after the first line of a reason that goes on


def note(job: dict) -> str:
    """A job's notes in the jobs table: its warnings, or the first line of its error (without the file name the
    table shows beside it), whole: a table cuts no word of it, and MORE marks a reason that goes on."""
    if not job["error"]:
        return "; ".join(([f"{len(job['held_out'])} held out"] if job.get("held_out") else []) + job["warnings"])
    first, _, rest = job["error"].strip().partition("\n")
    return first.removeprefix(f"{job['file']}: ") + (MORE if rest.strip() else "")


def bar(done: int, total: int, width: int = 40) -> str:
    """A progress bar as plain text (`[██████░░░░]  12/40  30%`), the same on a terminal and in a pipe."""
    filled = round(width * min(done / total, 1.0)) if total else 0
    return f"[{'█' * filled}{'░' * (width - filled)}] {done}/{total} {done / total:.0%}" if total else ""


def one_line(data: dict) -> str:
    """The status in one line (what `status --watch` prints a frame at a time when not on a terminal)."""
    d, run, cur = data["daemon"], data["run"], data["current"]
    parts = [time.strftime("%H:%M:%S", time.localtime(data["time"])),
             (f"daemon {d['pid']}" + (" paused" if d["paused"] else "")) if d["running"] else "no daemon"]
    if run:
        parts.append(f"{run['id']} step {run['global_step']}")
    if cur:
        loss = f" loss {cur['loss']:.4f}" if cur["loss"] is not None else ""
        if cur.get("margin") is not None:
            loss += f" margin {cur['margin']:+.4f}"
        if cur.get("accuracy") is not None:
            loss += f" accuracy {cur['accuracy']:.0%}"
        eta = f" ETA {_duration(cur['eta_seconds'])}" if cur["eta_seconds"] is not None else ""
        steps = f"{cur['steps_done']}/{cur['planned_steps']}" if cur["planned_steps"] is not None else "starting"
        parts.append(f"job {cur['id']} {cur['file']} {steps}{loss}{eta}")
    parts.append(f"waiting {data['queue_total'] - (1 if cur else 0)}")
    if d.get("disk"):
        parts.append("waiting for disk space")
    return " | ".join(parts)
