"""The dashboard's API and page on a workspace with two trained jobs: exact numbers, bad requests, the token,
nothing of the workspace served as files, the panels' data (replay counts, reasons, samples) and the loss chart's
label layout (in node, when installed); and (slow) the page rendered in a real headless Chromium. On a workspace
with a DPO job: the margin and accuracy series, method and reference, and the held-out pairs preferred."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import ASSETS, make_workspace, run_cli, text_file
from fastapi.testclient import TestClient

from conveyor.errors import ConveyorError
from conveyor.serve.api import EXPIRED, NOT_ACKNOWLEDGED
from conveyor.serve.dashboard import build_server, check_bind, create_app, page_html, serve
from conveyor.store import controls
from conveyor.store import database as store
from conveyor.store.lock import LOCK_FILE

LOCAL = "http://127.0.0.1:8750"
TOKEN = "s3cret-token"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_dir) -> Path:
    """Files of 20 and 12 examples at batch 4 × grad_accum 2: job 1 trains steps 1–3, job 2 steps 4–5; then a
    rejected file. Two evals and two samples (the second one empty) are written as the worker would, and job 2's
    ledger row counts 3 replayed examples, as with replay.fraction."""
    root = tmp_path_factory.mktemp("dashboard")
    ws = make_workspace(root / "ws", tiny_dir, training={"batch_size": 4, "grad_accum": 2, "learning_rate": 1e-3,
                                                         "save_every": 2, "max_length": 64})
    a, b = text_file(root / "a.jsonl", 20, "a"), text_file(root / "b.jsonl", 12, "b")
    r = run_cli(ws, "train", a, b, "-q")
    assert r.code == 0, r.out + r.err
    assert run_cli(ws, "add", ASSETS / "bad_chat.jsonl").code == 1
    con = store.connect(ws / "conveyor.db")
    for step, job, loss in ((3, 1, 5.25), (5, 2, 5.0)):
        con.execute("INSERT INTO evals VALUES ('run-0001', ?, ?, ?, 4, ?)", (step, job, loss, time.time()))
        con.execute("INSERT INTO samples (run_id, step, prompt, output, created_at) VALUES ('run-0001', ?, ?, ?, ?)",
                    (step, "the quick", "" if step == 5 else f"output at {step}", time.time()))
    con.execute("UPDATE ledger SET replayed = 3 WHERE job_id = 2")
    con.commit()
    con.close()
    return ws


@pytest.fixture(scope="module")
def client(trained) -> TestClient:
    return TestClient(create_app(trained, control_timeout=0.2), base_url=LOCAL)


def test_status_and_runs(client):
    s = client.get("/api/status").json()
    assert (s["run"]["id"], s["run"]["global_step"]) == ("run-0001", 5)
    assert (s["daemon"]["pid"], s["daemon"]["running"]) == (None, False)
    assert s["current"] is None and s["queue"] == []
    assert [(f["file"], f["state"]) for f in s["failures"]] == [("bad_chat.jsonl", "rejected")]
    assert s["failures"][0]["error"]
    assert s["last_eval"] == {"step": 5, "eval_loss": 5.0}
    runs = client.get("/api/runs").json()
    assert [(r["id"], r["active"], r["global_step"], r["metric_rows"]) for r in runs] == [("run-0001", True, 5, 5)]


def test_metrics_one_row_per_step(client):
    body = client.get("/api/metrics").json()
    assert body["run"] == "run-0001"
    rows = body["rows"]
    assert [m["step"] for m in rows] == [1, 2, 3, 4, 5]
    assert [m["job_id"] for m in rows] == [1, 1, 1, 2, 2]
    assert [m["examples"] for m in rows] == [8, 8, 4, 8, 4]
    assert all(m["loss"] > 0 and m["learning_rate"] > 0 and m["tokens"] > 0 and m["step_time"] > 0 for m in rows)
    assert [m["step"] for m in client.get("/api/metrics?run=run-0001&since_step=3").json()["rows"]] == [4, 5]
    assert client.get("/api/metrics?since_step=5").json()["rows"] == []


def test_evals_samples_ledger_jobs(client):
    evals = client.get("/api/evals").json()["rows"]
    assert [(e["step"], e["job_id"], e["eval_loss"], e["examples"]) for e in evals] == [(3, 1, 5.25, 4), (5, 2, 5.0, 4)]
    samples = client.get("/api/samples?run=run-0001").json()["rows"]
    assert [(s["step"], s["output"]) for s in samples] == [(5, ""), (3, "output at 3")]  # newest first
    assert len(client.get("/api/samples?limit=1").json()["rows"]) == 1
    ledger = client.get("/api/ledger").json()
    assert [(r["job"], r["file"], r["start_step"], r["end_step"], r["examples"], r["replayed"], r["outcome"])
            for r in ledger["rows"]] == [(2, "b.jsonl", 4, 5, 12, 3, "done"), (1, "a.jsonl", 1, 3, 20, 0, "done")]
    assert ledger["total"] == 2
    assert [r["job"] for r in client.get("/api/ledger?offset=1&limit=5").json()["rows"]] == [1]
    jobs = client.get("/api/jobs").json()
    assert (jobs["queue"], jobs["total"], jobs["queue_total"]) == ([], 3, 0)
    assert [(j["id"], j["file"], j["state"], j["planned_steps"], j["replayed"]) for j in jobs["jobs"]] == [
        (3, "bad_chat.jsonl", "rejected", None, 0), (2, "b.jsonl", "done", 2, 3), (1, "a.jsonl", "done", 3, 0)]
    assert [j["id"] for j in client.get("/api/jobs?offset=1&limit=1").json()["jobs"]] == [2]


def test_events_after_id(client, trained):
    con = store.connect(trained / "conveyor.db")
    ids = [r["id"] for r in con.execute("SELECT id FROM events ORDER BY id")]
    con.close()
    assert len(ids) >= 4  # queued ×2, done ×2, rejected at least
    assert [e["id"] for e in client.get("/api/events").json()] == ids
    assert [e["id"] for e in client.get(f"/api/events?after_id={ids[1]}").json()] == ids[2:]
    assert [e["id"] for e in client.get("/api/events?limit=2").json()] == ids[-2:]
    assert client.get(f"/api/events?after_id={ids[-1]}").json() == []


@pytest.mark.parametrize("path,code", [
    ("/api/metrics?run=run-0042", 404), ("/api/ledger?run=nope", 404), ("/api/evals?run=x", 404),
    ("/api/samples?run=x", 404), ("/api/metrics?since_step=abc", 422), ("/api/metrics?since_step=-1", 422),
    ("/api/events?after_id=abc", 422), ("/api/samples?limit=0", 422), ("/api/metrics?points=0", 422),
    ("/api/metrics?points=5001", 422), ("/api/jobs?limit=1001", 422), ("/api/ledger?offset=-1", 422),
    # numbers past SQLite's 64-bit integers: a 422 naming the bound, not a 500 (OverflowError)
    ("/api/jobs?offset=" + "9" * 400, 422), ("/api/events?after_id=" + "9" * 400, 422),
    ("/api/ledger?offset=" + "9" * 400, 422), ("/api/metrics?start=" + "9" * 400, 422),
])
def test_bad_requests(client, path, code):
    r = client.get(path)
    assert r.status_code == code, r.text
    if code == 404:
        assert "known runs: run-0001" in r.json()["detail"]


@pytest.mark.parametrize("path", ["/conveyor.toml", "/conveyor.db", "/api/../conveyor.db", "/api/%2e%2e/conveyor.db",
                                  "/inbox/", "/runs/run-0001", "/data", "/assets/dashboard.html", "/docs",
                                  "/openapi.json"])
def test_nothing_of_the_workspace_is_served(client, path):
    assert client.get(path).status_code == 404


def test_page_is_self_contained(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in r.headers["content-security-policy"]
    assert "access-control-allow-origin" not in r.headers
    for element in ('id="loss-chart"', 'id="queue"', 'id="ledger"', 'id="runs"', 'id="failures"', 'id="current"',
                    'id="btn-pause"', 'id="btn-resume"', 'id="btn-skip"', 'id="btn-stop"', 'id="control-result"',
                    'id="daemon-state"'):
        assert element in r.text
    assert "src=" not in r.text and "https://" not in r.text and "http://" not in r.text  # nothing from elsewhere


def test_page_panels_show_replay_reasons_once_and_samples_plainly(client):
    """The mended panels, as the page is written: replay counts in the ledger and jobs tables; a rejection's reason
    whole (line breaks kept) only under "Failed and rejected files", its first line elsewhere; every job row on a
    page of its own (no fixed-height box cutting rows off); samples labelled prompt and output, "(empty)" for none."""
    html = client.get("/").text
    table = lambda name: html[html.index(f'<table id="{name}">'):html.index("</table>", html.index(f'id="{name}"'))]
    assert "<th>replayed</th>" in table("ledger") and "<th>replayed</th>" in table("jobs")
    assert '<div class="scroll"><table id="jobs">' not in html and "jobs: 25" in html
    assert "  .wrap { white-space: pre-wrap;" in html  # not only on td: the reason is a span in a td
    assert 'el("span", {class: "wrap"}, j.error || "")' in html  # the failures table: whole
    assert html.count("firstLine(j.error)") == 1 and 'e.kind === "rejected"' in html  # jobs and events: a line
    assert '"→ "' not in html and '"(empty)"' in html and 'el("div", {class: "label"}, "output")' in html
    reason = client.get("/api/status").json()["failures"][0]["error"]
    assert reason.count("\n") >= 3  # several lines: what the page keeps as lines


def _page_script(*names: str) -> str:
    """Top-level consts and functions of the page's script, as written."""
    html = page_html()
    parts = []
    for name in names:
        start = html.index(f"const {name} =" if name.isupper() else f"function {name}(")
        parts.append(html[start:html.index(";\n" if name.isupper() else "\n}\n", start) + 2])
    return "\n".join(parts)


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_job_labels_on_the_loss_chart_never_overlap():
    """The page's label layout, run in node: dense job starts are staggered over two rows and the rest skipped,
    so that no two labels in a row overlap and none runs past the chart; sparse ones all show whole in one row."""
    script = _page_script("LABEL_ROWS", "placeLabels", "fitText") + """
    const measure = (t) => 6 * t.length, right = 800;
    const layout = (pxs) => placeLabels(pxs.map((px, i) => ({px, label: `job ${i + 1}: file-${i + 1}.jsonl`})),
                                        measure, right);
    let seed = 7;
    const random = () => (seed = (seed * 16807) % 2147483647) / 2147483647;
    const dense = Array.from({length: 60}, () => Math.round(64 + random() * 720)).sort((a, b) => a - b);
    console.log(JSON.stringify({dense: layout(dense), sparse: layout([64, 300, 560]), crowded: layout([100, 101,
      102, 103])}));
    """
    out = json.loads(subprocess.run(["node", "-e", script], capture_output=True, text=True, check=True).stdout)
    for labels in out.values():
        for row in (0, 1):
            spans = sorted((x["x"], x["x"] + 6 * len(x["text"])) for x in labels if x["row"] == row)
            assert all(a[1] + 8 <= b[0] for a, b in zip(spans, spans[1:])), spans
            assert all(end <= 800 for _, end in spans)
        assert {x["row"] for x in labels} <= {0, 1}
    assert 2 <= len(out["dense"]) < 60 and {x["row"] for x in out["dense"]} == {0, 1}  # staggered, some skipped
    assert [(x["row"], x["text"]) for x in out["sparse"]] == [
        (0, "job 1: file-1.jsonl"), (0, "job 2: file-2.jsonl"), (0, "job 3: file-3.jsonl")]
    assert [x["row"] for x in out["crowded"]] == [0, 1]  # two of four start at once: the others are left out


def test_control_without_daemon_is_not_acknowledged(client, trained):
    r = client.post("/api/control/pause", json={"reason": "lunch"})
    assert r.status_code == 202
    body = r.json()
    assert (body["result"], body["message"], body["expired"]) == (None, NOT_ACKNOWLEDGED, True)
    con = store.connect(trained / "conveyor.db")
    row = con.execute("SELECT * FROM controls WHERE id = ?", (body["request_id"],)).fetchone()
    con.close()
    # expired, so that a daemon started later does not act on it
    assert (row["action"], row["who"], row["reason"], row["result"]) == ("pause", "dashboard", "lunch", EXPIRED)
    assert client.post("/api/control/resume").status_code == 202  # the body is optional


def test_control_kept_for_a_running_daemon(client, trained):
    """A live daemon that has not answered yet keeps the request: it acts on it between steps."""
    from conveyor.store.lock import Lock
    from conveyor.store.workspace import Workspace

    with Lock(Workspace(trained)):  # the daemon's flock, held by a live process
        r = client.post("/api/control/pause")
    assert r.status_code == 202 and r.json()["expired"] is False
    con = store.connect(trained / "conveyor.db")
    assert [q.id for q in controls.pending(con)] == [r.json()["request_id"]]
    controls.answer(con, r.json()["request_id"], "acted on by the test")
    con.close()


def test_a_dead_daemons_pid_is_not_a_live_daemon(client, trained):
    """The lock file names a live process (this one) but nobody holds the lock: no daemon, the request expires."""
    (trained / LOCK_FILE).write_text(f"{os.getpid()}\n")
    r = client.post("/api/control/pause")
    assert r.status_code == 202 and r.json()["expired"] is True


def test_control_answer_from_the_worker(trained):
    """A stand-in worker acknowledges the request: the answer carries its text."""
    client = TestClient(create_app(trained, control_timeout=10.0), base_url=LOCAL)

    def worker():
        con = store.connect(trained / "conveyor.db")
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                request = controls.take(con, "stand-in worker")
                if request:
                    controls.answer(con, request.id, "skipped job 2 at step 5")
                    return
                time.sleep(0.02)
        finally:
            con.close()

    thread = threading.Thread(target=worker)
    thread.start()
    r = client.post("/api/control/skip", json={})
    thread.join()
    assert r.status_code == 200
    assert r.json()["result"] == "skipped job 2 at step 5"


def test_control_bad_action_and_cross_site(client):
    r = client.post("/api/control/explode")
    assert r.status_code == 404
    assert r.json()["detail"] == "no control 'explode'; valid actions: pause, resume, stop, skip"
    assert client.post("/api/control/stop", headers={"Origin": "https://evil.example"}).status_code == 403
    assert client.post("/api/control/pause", json={"reason": 3}).status_code == 422


def test_without_token_only_loopback_host_names(trained):
    app = create_app(trained)
    assert TestClient(app, base_url="http://localhost:8750").get("/api/runs").status_code == 200
    assert TestClient(app, base_url="http://[::1]:8750").get("/api/runs").status_code == 200
    r = TestClient(app, base_url="http://rebound.example:8750").get("/api/runs")
    assert r.status_code == 403 and "--token" in r.json()["detail"]


def test_token_required_on_every_api_call(trained):
    client = TestClient(create_app(trained, token=TOKEN, control_timeout=0.1), base_url="http://box.lan:8750")
    good, bad = {"Authorization": f"Bearer {TOKEN}"}, {"Authorization": "Bearer guess"}
    for path in ("/api/status", "/api/runs", "/api/jobs", "/api/metrics", "/api/evals", "/api/samples",
                 "/api/ledger", "/api/events", "/api/stream"):
        r = client.get(path)
        assert r.status_code == 401 and "Authorization: Bearer" in r.json()["detail"], path
        assert client.get(path, headers=bad).status_code == 401, path
        assert client.get(path + "?token=guess").status_code == 401, path
    for path in ("/api/status", "/api/metrics", "/api/ledger"):
        assert client.get(path, headers=good).status_code == 200
        assert client.get(f"{path}?token={TOKEN}").status_code == 401  # only the stream takes it in the URL
    assert client.post("/api/control/pause", headers=bad).status_code == 401
    assert client.post("/api/control/pause", headers=good).status_code == 202
    assert client.get("/").status_code == 200  # the page holds no data; it reads ?token= from its own URL
    with client.stream("GET", f"/api/stream?token={TOKEN}") as r:
        assert r.status_code == 200
        assert _next_update(r.iter_lines())["global_step"] == 5


def _next_update(lines) -> dict:
    """The data of the next `update` event on an open event stream."""
    event = None
    for line in lines:
        if line.startswith("event: "):
            event = line[len("event: "):]
        elif line.startswith("data: ") and event == "update":
            return json.loads(line[len("data: "):])
    raise AssertionError("the stream ended without an update")


def test_stream_updates_when_something_changes(trained):
    client = TestClient(create_app(trained, stream_interval=0.05, heartbeat_seconds=0.2), base_url=LOCAL)
    con = store.connect(trained / "conveyor.db")
    with client.stream("GET", "/api/stream") as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = r.iter_lines()
        first = _next_update(lines)
        last_event = con.execute("SELECT MAX(id) FROM events").fetchone()[0]
        assert first == {"run": "run-0001", "global_step": 5, "event_id": last_event, "metric_step": 5,
                         "eval_step": 5, "sample_id": 2, "status_hash": first["status_hash"]}
        assert ": heartbeat" in [next(lines) for _ in range(6)]  # nothing changed: only heartbeats
        store.log_event(con, "info", "test", "something happened")
        second = _next_update(lines)
    con.close()
    assert second["event_id"] == last_event + 1
    assert {k: v for k, v in second.items() if k != "event_id"} == {k: v for k, v in first.items() if k != "event_id"}


def test_serve_refuses_other_hosts_without_token(trained):
    with pytest.raises(ConveyorError, match="--token.*--host 127.0.0.1"):
        serve(trained, host="0.0.0.0", port=_free_port())
    for host in ("127.0.0.1", "::1", "localhost"):
        check_bind(host, None)
    check_bind("0.0.0.0", TOKEN)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(ws: Path, **options):
    """The dashboard served by uvicorn on a free local port, in a thread: yields its base URL; stopped after
    (the test fails if an open event stream kept it running)."""
    port = _free_port()
    server = build_server(ws, port=port, **options)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert not thread.is_alive(), "the server did not stop: an open event stream held it"


CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


@pytest.mark.slow
def test_page_renders_in_chromium(trained):
    """The real page in headless Chromium, served by uvicorn with a token: charts drawn from the API, tables
    filled, a control answered, and nothing fetched from anywhere but the dashboard."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install -y chromium)")
    expect = sync_api.expect
    problems, foreign = [], []
    with serving(trained, token=TOKEN, control_timeout=0.5) as base, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.on("request", lambda r: foreign.append(r.url) if not r.url.startswith(base) else None)
        page.goto(f"{base}/?token={TOKEN}")
        # locator assertions, not wait_for_function: that evaluates strings, which the page's CSP forbids
        expect(page.locator("#loss-chart")).to_have_attribute("data-points", "5", timeout=20_000)
        assert page.locator("#ledger tbody tr.ledger-row").count() == 2
        assert page.locator("#queue tr.job-row").count() == 0
        assert page.locator("#failures tbody tr.failure-row").count() == 1
        assert page.locator("#runs tbody tr.run-row").count() == 1
        assert page.locator("#daemon-state").inner_text() == "not running"
        assert page.locator("#lr-chart").get_attribute("data-points") == "5"
        assert page.locator("#margin-card").is_hidden()  # no preference steps: no margin and accuracy charts
        page.click("#btn-pause")
        expect(page.locator("#control-result")).to_contain_text("not yet acknowledged", timeout=10_000)
        artifacts = REPO / "test-artifacts"
        artifacts.mkdir(exist_ok=True)
        page.screenshot(path=str(artifacts / "dashboard.png"), full_page=True)
        browser.close()
    png = (REPO / "test-artifacts" / "dashboard.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    assert problems == [] and foreign == []


@pytest.mark.slow
def test_pause_and_resume_a_real_worker_from_the_page(tmp_path, tiny_dir):
    """`conveyor run --dashboard` with two trained jobs, one training and one queued: the page lists the queue,
    Pause holds the worker (no step advances), Resume lets it go on."""
    from conftest import make_workspace, run_cli, text_file
    from service import Service, write_jsonl

    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install -y chromium)")
    expect = sync_api.expect
    ws = make_workspace(tmp_path / "ws", tiny_dir, training={"batch_size": 1, "grad_accum": 1, "save_every": 50,
                                                             "max_length": 48},
                        inbox={"settle_seconds": 0.3}, daemon={"min_free_mb": 0})
    assert run_cli(ws, "train", text_file(tmp_path / "a.jsonl", 3, "a"), text_file(tmp_path / "b.jsonl", 2, "b"),
                   "-q").code == 0
    port = _free_port()
    svc = Service(ws, "--dashboard", "--port", str(port)).ready()
    try:
        write_jsonl(ws / "inbox" / "long.jsonl", [f"long {i}" for i in range(5000)])
        svc.wait(lambda: svc.steps() >= 10, 120, "the long job to train")
        write_jsonl(ws / "inbox" / "later.jsonl", ["later 1", "later 2"])
        svc.wait(lambda: "later.jsonl" in svc.jobs(), 30, "the second file to queue")
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(f"http://127.0.0.1:{port}/")
            expect(page.locator("#queue tr.job-row")).to_have_count(2, timeout=20_000)
            assert page.locator("#ledger tbody tr.ledger-row").count() == 2
            # the two trained jobs and the running one's first 10 steps: the audit row of a step is written when
            # its batch is drawn, its loss when the step is logged, and the chart redraws on the page's next poll
            page.wait_for_function("Number(document.querySelector('#loss-chart').dataset.points) >= 5 + 10",
                                   timeout=30_000)
            page.click("#btn-pause")
            expect(page.locator("#control-result")).to_contain_text("paused job 3 at global step", timeout=30_000)
            expect(page.locator("#daemon-state")).to_have_text("paused", timeout=10_000)
            held = svc.steps()
            for _ in range(3):  # each answer comes from the worker's hold loop: it holds, no step advances
                r = run_cli(svc.ws, "pause")
                assert r.out.strip() == "already paused" and svc.steps() == held, r.out + r.err
            page.click("#btn-resume")
            expect(page.locator("#control-result")).to_contain_text("resumed job 3", timeout=30_000)
            svc.wait(lambda: svc.steps() > held + 5, 60, "training to go on after Resume")
            artifacts = REPO / "test-artifacts"
            artifacts.mkdir(exist_ok=True)
            page.screenshot(path=str(artifacts / "dashboard-live.png"), full_page=True)
            browser.close()
    finally:
        svc.stop()


def test_a_taken_port_is_one_line_and_exit_1(workspace):
    """Another program holds the port: the command says so and which option to change (not uvicorn's Errno)."""
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        r = run_cli(workspace(), "dashboard", "--port", str(port), subprocess_=True)
    assert r.code == 1, r.out + r.err
    assert f"cannot serve the dashboard on 127.0.0.1:{port}" in r.err and "pick another with --port" in r.err
    assert "Traceback" not in r.err


# Preference jobs: margin and accuracy series, the method and reference, the held-out pairs preferred ----------
@pytest.fixture(scope="module")
def preferred(tmp_path_factory, tiny_dir) -> Path:
    """A supervised job of 8 examples (v1, steps 1–2), then a DPO job of 12 pairs against v1 (v2, steps 3–5); a
    quarter of each file held out."""
    root = tmp_path_factory.mktemp("preferred")
    ws = make_workspace(root / "ws", tiny_dir, training={"batch_size": 4, "grad_accum": 1, "learning_rate": 1e-3,
                                                         "save_every": 2, "max_length": 64}, eval={"holdout": 0.25})
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"q{i}?", "chosen": f" yes {i}", "rejected": f" no {i}"}) + "\n"
                             for i in range(1, 13)), encoding="utf-8")
    r = run_cli(ws, "train", text_file(root / "a.jsonl", 8, "a"), pairs, "-q")
    assert r.code == 0, r.out + r.err
    return ws


def test_the_api_gives_margin_accuracy_method_reference_and_pairs_preferred(preferred):
    client = TestClient(create_app(preferred), base_url=LOCAL)
    rows = client.get("/api/metrics").json()["rows"]
    assert [(m["step"], m["job_id"], m["margin"] is None, m["accuracy"] is None) for m in rows] == [
        (1, 1, True, True), (2, 1, True, True), (3, 2, False, False), (4, 2, False, False), (5, 2, False, False)]
    assert all(0.0 <= m["accuracy"] <= 1.0 for m in rows[2:])
    merged = client.get("/api/metrics?points=2").json()  # downsampled: a bucket's mean over its preference steps
    assert merged["downsampled"]
    for row in merged["rows"]:
        within = [m for m in rows if row["step_min"] <= m["step"] <= row["step"] and m["margin"] is not None]
        if within:
            assert row["margin"] == pytest.approx(sum(m["margin"] for m in within) / len(within))
            assert row["accuracy"] == pytest.approx(sum(m["accuracy"] for m in within) / len(within))
        else:
            assert row["margin"] is None and row["accuracy"] is None
    pref = client.get("/api/status").json()["preference"]
    assert (pref["id"], pref["method"], pref["reference"]["name"], pref["step"], pref["margin"]) == (
        2, "dpo", "v1", 5, rows[-1]["margin"])
    ledger = client.get("/api/ledger").json()["rows"]
    assert [(r["job"], r["method"], (r.get("reference") or {}).get("name")) for r in ledger] == [
        (2, "dpo", "v1"), (1, "sft", None)]
    matrix = client.get("/api/matrix").json()
    assert [(r["version"], set(r["preference"])) for r in matrix["rows"]] == [("v1", set()), ("v2", {"job 2"})]
    sets = client.get("/api/set_evals").json()["rows"]
    assert [(s["step"], s["name"], s["preference"] is None) for s in sets] == [
        (2, "job 1", True), (5, "job 1", True), (5, "job 2", False)]
    assert sets[-1]["preference"] == matrix["rows"][-1]["preference"]["job 2"] == pref["held_out"]["preference"]


@pytest.mark.slow
def test_the_page_shows_preference_steps_the_method_and_pairs_preferred_in_chromium(preferred):
    """The page on the workspace with a DPO job: its margin and accuracy charts appear with its three steps, the
    ledger says dpo against v1, the matrix says how many held-out pairs v2 prefers, and the current-job box the
    last preference job's numbers."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install -y chromium)")
    expect = sync_api.expect
    problems = []
    with serving(preferred) as base, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.goto(base)
        expect(page.locator("#loss-chart")).to_have_attribute("data-points", "5", timeout=20_000)
        assert page.locator("#margin-card").is_visible() and page.locator("#accuracy-card").is_visible()
        assert page.locator("#margin-chart").get_attribute("data-points") == "3"
        assert page.locator("#accuracy-chart").get_attribute("data-points") == "3"
        rows = page.locator("#ledger tbody tr.ledger-row")
        assert [rows.nth(i).locator("td").nth(9).inner_text() for i in range(2)] == ["dpo ref v1", "sft"]
        expect(page.locator("#matrix tbody tr.matrix-row").nth(1)).to_contain_text("pref ", timeout=10_000)
        expect(page.locator("#last-preference")).to_contain_text("last preference job 2 pairs.jsonl (dpo against "
                                                                 "v1), done: at step 5 loss ")
        artifacts = REPO / "test-artifacts"
        artifacts.mkdir(exist_ok=True)
        page.screenshot(path=str(artifacts / "dashboard-preference.png"), full_page=True)
        browser.close()
    assert problems == []
