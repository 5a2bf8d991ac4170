"""The dashboard on a run of a million steps and ten thousand jobs: every API answers in under 100 ms with a bounded
number of rows, downsampled series keep the exact loss minima and maxima, and the metric rollups stay exact under
the write path's replaced steps and a rewind (forget_after)."""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from conveyor import ledger, store
from conveyor.config import Config
from conveyor.dashboard import STATUS_JOBS, create_app, snapshot
from conveyor.workspace import Workspace

LOCAL = "http://127.0.0.1:8750"
RUN = "run-0001"
STEPS = 1_000_000
JOBS = 10_000
TRAINED = 8_000  # jobs 1..TRAINED trained STEPS / TRAINED steps each; the last of them is running
PER_JOB = STEPS // TRAINED
QUEUED = 1_900  # then queued jobs; the rest were rejected
BUDGET_MS = 100


def metric(step: int) -> dict:
    """A made-up step: a slowly falling, noisy loss (a spike every 7919 steps), NULL learning rate on some."""
    noise = random.Random(step).random()
    loss = 2 + 3 * math.exp(-step / 200_000) + 0.5 * math.sin(step / 997) + noise + (5 if step % 7919 == 0 else 0)
    return {"step": step, "job_id": (step - 1) // PER_JOB + 1, "loss": loss,
            "learning_rate": None if step % 1000 == 0 else 1e-4 * (1 + noise), "grad_norm": 0.5 + noise,
            "tokens": 400 + step % 97, "examples": 8, "step_time": 0.1 + noise / 10}


def _jobs_rows(now: float) -> list[tuple]:
    rows = []
    for k in range(1, JOBS + 1):
        trained = k <= TRAINED
        state = ("running" if k == TRAINED else "done") if trained else "queued" if k <= TRAINED + QUEUED else \
            "rejected"
        first, last = ((k - 1) * PER_JOB + 1, k * PER_JOB) if trained else (None, None)
        rows.append((RUN if trained else None, f"f{k}.jsonl", f"/in/f{k}.jsonl", f"/data/{k}", f"{k:064x}", "text",
                     1, state, 32, 2 if trained else None, PER_JOB if trained else None, first, last,
                     PER_JOB if trained else 0, "bad line 3" if state == "rejected" else None, now))
    return rows


def _ledger_rows(now: float) -> list[tuple]:
    """Two segments a trained job (stopped once mid-way), so more ledger rows than jobs."""
    rows = []
    for k in range(1, TRAINED):
        first, last = (k - 1) * PER_JOB + 1, k * PER_JOB
        rows.append((RUN, k, first, first + 59, 15, 1, 6000, 3.0, 2.9, 2.95, "interrupted", now))
        rows.append((RUN, k, first + 60, last, 17, 1, 7000, 2.9, 2.8, 2.85, "done", now))
    return rows


def build(con, now: float) -> None:
    """Runs, jobs, ledger, evals, samples and events with executemany in one transaction; the metrics through the
    real write path (which keeps the rollups) in chunks of 100k steps."""
    with store.transaction(con):
        con.execute("INSERT INTO runs (id, created_at, identity, global_step, active) VALUES (?, ?, '{}', ?, 1)",
                    (RUN, now, STEPS))
        con.executemany("INSERT INTO jobs (run_id, file, source, stored, fingerprint, format, priority, state,"
                        " examples, epochs, planned_steps, start_step, end_step, steps_done, error, created_at)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", _jobs_rows(now))
        con.executemany("INSERT INTO ledger (run_id, job_id, start_step, end_step, examples, epochs, tokens,"
                        " first_loss, last_loss, mean_loss, outcome, created_at)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", _ledger_rows(now))
        con.executemany("INSERT INTO evals VALUES (?, ?, ?, ?, 64, ?)",
                        [(RUN, s, (s - 1) // PER_JOB + 1, 3 + math.sin(s / 5000), now)
                         for s in range(100, STEPS + 1, 100)])
        con.executemany("INSERT INTO samples (run_id, step, prompt, output, created_at) VALUES (?, ?, 'p', 'o', ?)",
                        [(RUN, s, now) for s in range(10_000, STEPS + 1, 10_000)])
        con.executemany("INSERT INTO events (ts, level, kind, job_id, message) VALUES (?, 'info', 'done', ?, ?)",
                        [(now, k, f"job {k} done") for k in range(1, 2 * JOBS)])
        for start in range(1, STEPS + 1, 100_000):
            ledger.write_steps(con, RUN, [], [metric(s) for s in range(start, start + 100_000)])


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scale") / "ws"
    ws = Workspace.create(root, Config())
    began = time.perf_counter()
    build(ws.db, time.time())
    ws.db.close()
    print(f"\nbuilt {STEPS} steps, {JOBS} jobs in {time.perf_counter() - began:.1f} s")
    return root


@pytest.fixture(scope="module")
def client(big) -> TestClient:
    return TestClient(create_app(big), base_url=LOCAL)


def best_ms(call, tries: int = 5) -> float:
    """The fastest of `tries` calls after a warm-up one, in ms: a busy machine slows some calls, not all."""
    call()
    times = []
    for _ in range(tries):
        began = time.perf_counter()
        call()
        times.append((time.perf_counter() - began) * 1000)
    return min(times)


# (path, the most rows it may return, where they are in the body)
APIS = [
    ("/api/status", STATUS_JOBS, "jobs"), ("/api/runs", 1, None), ("/api/jobs", 200, "jobs"),
    ("/api/jobs?offset=5000&limit=1000", 1000, "jobs"), ("/api/ledger", 200, "rows"),
    ("/api/ledger?offset=15000&limit=1000", 1000, "rows"), ("/api/metrics", 2000, "rows"),
    ("/api/metrics?points=5000", 5000, "rows"), ("/api/metrics?points=4000&start=123457&end=876543", 4000, "rows"),
    ("/api/metrics?start=990001&points=4000", 4000, "rows"), ("/api/metrics?start=999001", 2000, "rows"),
    ("/api/metrics?since_step=999990", 10, "rows"), ("/api/evals", 2000, "rows"),
    ("/api/evals?points=5000&start=1000", 5000, "rows"), ("/api/events", 200, None),
    ("/api/samples", 20, "rows"),
]


@pytest.mark.parametrize("path,most,key", APIS)
def test_every_api_is_fast_and_bounded(client, path, most, key):
    body = client.get(path).json()
    rows = body if key is None else body[key]
    assert 0 < len(rows) <= most, path
    ms = best_ms(lambda: client.get(path).raise_for_status())
    print(f"{path}: {ms:.1f} ms, {len(rows)} rows")
    assert ms < BUDGET_MS, f"{path} took {ms:.0f} ms"


def test_status_is_bounded_with_counts(client):
    s = client.get("/api/status").json()
    assert [j["id"] for j in s["jobs"]] == list(range(JOBS - STATUS_JOBS + 1, JOBS + 1))  # the newest, oldest first
    assert s["job_counts"] == {"done": TRAINED - 1, "running": 1, "queued": QUEUED,
                               "rejected": JOBS - TRAINED - QUEUED}
    assert (len(s["queue"]), s["queue_total"], s["queue"][0]["id"]) == (STATUS_JOBS, QUEUED + 1, TRAINED)
    assert [f["id"] for f in s["failures"]] == list(range(JOBS - 9, JOBS + 1))
    assert s["current"]["id"] == TRAINED and s["current"]["loss"] == pytest.approx(metric(STEPS)["loss"])
    jobs = client.get("/api/jobs?offset=10&limit=5").json()
    assert ([j["id"] for j in jobs["jobs"]], jobs["total"], jobs["queue_total"]) == (
        list(range(JOBS - 10, JOBS - 15, -1)), JOBS, QUEUED + 1)
    ledger_page = client.get("/api/ledger?limit=3").json()
    assert (ledger_page["total"], [r["outcome"] for r in ledger_page["rows"]]) == (
        2 * (TRAINED - 1), ["done", "interrupted", "done"])
    assert client.get("/api/runs").json()[0]["metric_rows"] == STEPS


def test_snapshot_is_fast(big):
    ws = Workspace(big)
    try:
        ms = best_ms(lambda: snapshot(ws))
        assert snapshot(ws)["metric_step"] == STEPS and snapshot(ws)["eval_step"] == STEPS
    finally:
        ws.db.close()
    print(f"snapshot: {ms:.1f} ms")
    assert ms < BUDGET_MS


@pytest.mark.parametrize("query", ["points=2000", "points=3000&start=123457&end=876543", "points=500&start=999001",
                                   "points=5000&start=3&end=70001"])
def test_downsampled_rows_keep_exact_extremes(client, big, query):
    body = client.get(f"/api/metrics?{query}").json()
    rows = body["rows"]
    assert body["downsampled"] and rows and body["bucket_steps"] >= 1
    params = dict(p.split("=") for p in query.split("&"))
    first, last = int(params.get("start", 1)), int(params.get("end", STEPS))
    assert (rows[0]["step_min"], rows[-1]["step"]) == (first, last)  # exactly the range, none of its neighbours
    assert all(b["step_min"] == a["step"] + 1 for a, b in zip(rows, rows[1:]))  # the rows cut it into pieces
    con = store.connect(big / "conveyor.db")
    try:
        for row in [rows[0], rows[-1], rows[len(rows) // 2]] + random.Random(query).sample(rows, 5):
            raw = con.execute("SELECT MIN(loss), MAX(loss), AVG(loss), COUNT(*), SUM(tokens), SUM(step_time),"
                              " AVG(learning_rate) FROM metrics WHERE run_id = ? AND step BETWEEN ? AND ?",
                              (RUN, row["step_min"], row["step"])).fetchone()
            assert (row["loss_min"], row["loss_max"], row["n"], row["tokens"]) == (raw[0], raw[1], raw[3], raw[4])
            assert row["loss"] == pytest.approx(raw[2], rel=1e-9) and row["step_time"] == pytest.approx(raw[5])
            assert row["learning_rate"] == pytest.approx(raw[6], rel=1e-9)
            assert row["job_id"] == metric(row["step"])["job_id"]
        lo, hi = con.execute("SELECT MIN(loss), MAX(loss) FROM metrics WHERE run_id = ? AND step BETWEEN ? AND ?",
                             (RUN, first, last)).fetchone()
    finally:
        con.close()
    assert (min(r["loss_min"] for r in rows), max(r["loss_max"] for r in rows)) == (lo, hi)


def test_downsampled_evals(client):
    body = client.get("/api/evals?points=300").json()
    rows = body["rows"]
    assert body["downsampled"] and len(rows) <= 300 and sum(r["n"] for r in rows) == STEPS // 100
    expected = [3 + math.sin(s / 5000) for s in range(100, STEPS + 1, 100)]
    assert min(r["eval_loss_min"] for r in rows) == min(expected)
    assert max(r["eval_loss_max"] for r in rows) == max(expected)


# ---- the rollups under the write path, on a small run


def _rollup(con) -> list[tuple]:
    return [tuple(r) for r in con.execute("SELECT * FROM metrics_rollup ORDER BY run_id, level, bucket")]


def _from_scratch(con) -> list[tuple]:
    """The rollups rebuilt from the metric rows alone, the table left as it was."""
    kept = _rollup(con)
    ledger.rebuild_rollups(con)
    rebuilt = _rollup(con)
    with store.transaction(con):
        con.execute("DELETE FROM metrics_rollup")
        columns = len(con.execute("SELECT * FROM metrics_rollup LIMIT 0").description)
        con.executemany(f"INSERT INTO metrics_rollup VALUES ({', '.join('?' * columns)})", kept)
    return rebuilt


@pytest.fixture
def small(tmp_path):
    con = store.connect(tmp_path / "small.db")
    yield con
    con.close()


def _write(con, steps, shift: float = 0.0) -> None:
    rows = [{**metric(s), "loss": metric(s)["loss"] + shift} for s in steps]
    for i in range(0, len(rows), 37):  # flushes of uneven size, as a worker writes them
        ledger.write_steps(con, RUN, [], rows[i:i + 37])


def test_replaced_step_is_not_counted_twice(small):
    _write(small, range(1, 301))
    ledger.write_steps(small, RUN, [], [{**metric(150), "loss": 99.0}, {**metric(17), "loss": -1.0}])
    top = small.execute("SELECT n, loss_min, loss_max, loss_sum FROM metrics_rollup WHERE level = 65536").fetchone()
    raw = small.execute("SELECT COUNT(*), MIN(loss), MAX(loss) FROM metrics").fetchone()
    assert (top["n"], top["loss_min"], top["loss_max"]) == (300, -1.0, 99.0) == tuple(raw)
    assert _rollup(small) == _from_scratch(small)


@pytest.mark.parametrize("back_to", [0, 1, 15, 16, 255, 256, 4095, 4096, 4097, 5000, 6000])
def test_rewind_and_retrain_matches_a_rollup_from_scratch(small, back_to):
    _write(small, range(1, 6001))
    _write(small, range(1, 3), shift=0.5)  # a few replaced steps as well
    ledger.forget_after(small, RUN, back_to)
    assert small.execute("SELECT COALESCE(MAX(step_max), 0) FROM metrics_rollup").fetchone()[0] == back_to
    assert _rollup(small) == _from_scratch(small)
    _write(small, range(back_to + 1, 6001), shift=0.25)  # trained again: other losses
    assert _rollup(small) == _from_scratch(small)
    assert small.execute("SELECT SUM(n) FROM metrics_rollup WHERE level = 16").fetchone()[0] == 6000


def test_old_database_gets_its_rollups_at_connect(tmp_path):
    path = tmp_path / "old.db"
    con = store.connect(path)
    _write(con, range(1, 1001))
    expected = _rollup(con)
    con.execute("DELETE FROM metrics_rollup")
    con.execute("PRAGMA user_version = 0")  # as a database from before the rollups
    con.close()
    con = store.connect(path)
    try:
        assert _rollup(con) == expected
        assert con.execute("PRAGMA user_version").fetchone()[0] == store.VERSIONS_VERSION
    finally:
        con.close()


def test_two_runs_do_not_mix(small):
    _write(small, range(1, 100))
    ledger.write_steps(small, "run-0002", [], [metric(s) for s in range(1, 40)])
    ledger.forget_after(small, "run-0002", 10)
    counts = dict(small.execute("SELECT run_id, SUM(n) FROM metrics_rollup WHERE level = 16 GROUP BY run_id")
                  .fetchall())
    assert counts == {RUN: 99, "run-0002": 10}
    assert _rollup(small) == _from_scratch(small)
