"""The dashboard on a run of a million steps and ten thousand jobs, and a rollback's run branched from its middle,
on what does not depend on the machine: every API answers with a bounded number of rows in a bounded response,
does a small fraction of the work of one pass over the metric rows (SQLite VM instructions, counted), never scans
the big tables and reads long step ranges from the rollups (EXPLAIN QUERY PLAN); downsampled series keep the exact
loss minima and maxima; a branch's series follow its lineage; the metric rollups stay exact under the write path's
replaced steps and a rewind (forget_after). What each API costs in milliseconds is benchmarks/dashboard_scale.py's
to say (a wall-clock budget fails on a busy machine)."""

from __future__ import annotations

import random
import re
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from conveyor.serve import api
from conveyor.serve.api import STATUS_JOBS, snapshot
from conveyor.serve.dashboard import create_app
from conveyor.store import database as store
from conveyor.store import ledger, series
from conveyor.store.upgrade import upgrade
from conveyor.store.workspace import Workspace

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import dashboard_scale as scale  # noqa: E402  (the workspace it measures is the one tested here)
from dashboard_scale import (  # noqa: E402
    BRANCH,
    BRANCH_AT,
    BRANCH_STEPS,
    ENDPOINTS,
    JOBS,
    QUEUED,
    RUN,
    STEPS,
    TRAINED,
    metric,
)

LOCAL = "http://127.0.0.1:8750"
ROW_BYTES = 1000  # a response holds at most this much a row it may return, plus SMALL
SMALL = 32_000
WORK_SHARE = 20  # a request does less than 1/WORK_SHARE of the work of one pass over the run's metric rows
# Tables that grow with the steps: never scanned (m and e are the series' aliases of metrics and evals).
BIG = re.compile(r"^SCAN (metrics|metrics_rollup|evals|set_evals|audit|samples|ledger|m|e)\b")


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    return scale.make(tmp_path_factory.mktemp("scale") / "ws")


class Meter:
    """What SQL a connection runs: each statement (parameters inlined) and the SQLite VM instructions, counted in
    ticks of TICK (the progress handler): a measure of rows read that does not depend on the machine."""
    TICK = 100

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.statements, self.work = [], 0

    def attach(self, con) -> None:
        con.set_trace_callback(self.statements.append)
        con.set_progress_handler(self._tick, self.TICK)

    def _tick(self) -> int:
        self.work += self.TICK
        return 0  # go on


@pytest.fixture(scope="module")
def metered(big):
    """A client whose every request's connection is metered, and the meter."""
    meter = Meter()

    @contextmanager
    def opened(root: Path):
        ws = Workspace(root)
        meter.attach(ws.db)
        try:
            yield ws
        finally:
            ws.db.close()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(api, "open_workspace", opened)
        yield TestClient(create_app(big), base_url=LOCAL), meter


@pytest.fixture(scope="module")
def client(big) -> TestClient:
    return TestClient(create_app(big), base_url=LOCAL)


@pytest.fixture(scope="module")
def one_pass(big) -> int:
    """The work of one pass over the run's metric rows, aggregated as a series row is (what the metrics API would
    do without the rollups): what a request must stay far below."""
    con, meter = store.connect(big / "conveyor.db"), Meter()
    meter.attach(con)
    try:
        con.execute(f"SELECT {series.MERGED} FROM (SELECT {series.RAW_AS_ROLLUP} FROM metrics WHERE run_id = ?)",
                    (RUN,)).fetchone()
    finally:
        con.close()
    return meter.work


def plans(db: Path, statements: list[str]) -> list[str]:
    """Every line of the query plans of the SELECT statements."""
    con = store.connect(db)
    try:
        return [row["detail"] for sql in statements if sql.lstrip().upper().startswith(("SELECT", "WITH"))
                for row in con.execute("EXPLAIN QUERY PLAN " + sql)]
    finally:
        con.close()


@pytest.mark.slow  # a million steps built once: the slow run's (CI runs both)
@pytest.mark.parametrize("path,most,key", ENDPOINTS)
def test_every_api_is_bounded_and_reads_little(metered, one_pass, big, path, most, key):
    client, meter = metered
    meter.reset()
    response = client.get(path)
    body = response.json()
    rows = body if key is None else body[key]
    assert 0 < len(rows) <= most, path
    assert len(response.content) <= ROW_BYTES * most + SMALL, f"{path}: {len(response.content)} bytes"
    assert meter.work < one_pass / WORK_SHARE, f"{path}: {meter.work / one_pass:.1%} of a pass over the metrics"
    detail = plans(big / "conveyor.db", meter.statements)
    assert [d for d in detail if BIG.match(d)] == [], path
    if path.startswith("/api/metrics") and body.get("level", 1) > 1:  # ranges long for the points: rollups
        assert any(d.startswith("SEARCH metrics_rollup USING PRIMARY KEY") for d in detail), path


@pytest.mark.slow  # a million steps built once: the slow run's (CI runs both)
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
    assert [r["metric_rows"] for r in client.get("/api/runs").json()] == [STEPS, BRANCH_STEPS]


@pytest.mark.slow  # a million steps built once: the slow run's (CI runs both)
def test_snapshot_reads_little(big, one_pass):
    ws, meter = Workspace(big), Meter()
    meter.attach(ws.db)
    try:
        got = snapshot(ws)
    finally:
        ws.db.close()
    assert (got["run"], got["metric_step"], got["eval_step"], got["sample_id"]) == (RUN, STEPS, STEPS, 100)
    assert meter.work < one_pass / WORK_SHARE


@pytest.mark.slow  # a million steps built once: the slow run's (CI runs both)
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
            assert (row["run"], row["inherited"]) == (RUN, False)
        lo, hi = con.execute("SELECT MIN(loss), MAX(loss) FROM metrics WHERE run_id = ? AND step BETWEEN ? AND ?",
                             (RUN, first, last)).fetchone()
    finally:
        con.close()
    assert (min(r["loss_min"] for r in rows), max(r["loss_max"] for r in rows)) == (lo, hi)


@pytest.mark.slow  # a million steps built once: the slow run's (CI runs both)
def test_downsampled_evals(client):
    body = client.get("/api/evals?points=300").json()
    rows = body["rows"]
    assert body["downsampled"] and len(rows) <= 300 and sum(r["n"] for r in rows) == STEPS // 100
    expected = [3 + scale.math.sin(s / 5000) for s in range(100, STEPS + 1, 100)]
    assert min(r["eval_loss_min"] for r in rows) == min(expected)
    assert max(r["eval_loss_max"] for r in rows) == max(expected)


@pytest.mark.slow  # a million steps built once: the slow run's (CI runs both)
def test_a_branch_reads_its_lineage_from_the_rollups(metered, big):
    """The branch's series: the parent's steps up to BRANCH_AT (inherited), then its own, never the parent's later
    steps; downsampled from both runs' rollups, with exact extremes."""
    client, meter = metered
    meter.reset()
    body = client.get(f"/api/metrics?run={BRANCH}&points=2000").json()
    rows, last = body["rows"], BRANCH_AT + BRANCH_STEPS
    assert body["downsampled"] and [(s["run"], s["first_step"], s["last_step"]) for s in body["lineage"]] == [
        (RUN, 1, BRANCH_AT), (BRANCH, BRANCH_AT + 1, last)]
    assert (rows[0]["step_min"], rows[-1]["step"], sum(r["n"] for r in rows)) == (1, last, last)
    assert {(r["run"], r["inherited"]) for r in rows if r["step"] <= BRANCH_AT} == {(RUN, True)}
    assert {(r["run"], r["inherited"]) for r in rows if r["step"] > BRANCH_AT} == {(BRANCH, False)}
    rollup_reads = [sql for sql in meter.statements if "FROM metrics_rollup" in sql]
    assert all(f"run_id = '{run}'" in " ".join(rollup_reads) for run in (RUN, BRANCH))
    con = store.connect(big / "conveyor.db")
    try:
        lo, hi = con.execute(
            "SELECT MIN(loss), MAX(loss) FROM metrics WHERE (run_id = ? AND step <= ?) OR run_id = ?",
            (RUN, BRANCH_AT, BRANCH)).fetchone()
    finally:
        con.close()
    assert (min(r["loss_min"] for r in rows), max(r["loss_max"] for r in rows)) == (lo, hi)
    evals = client.get(f"/api/evals?run={BRANCH}&points=5000&start={BRANCH_AT - 199}&end={BRANCH_AT + 200}").json()
    assert [(e["step"], e["run"], e["inherited"]) for e in evals["rows"]] == [
        (BRANCH_AT - 100, RUN, True), (BRANCH_AT, RUN, True), (BRANCH_AT + 100, BRANCH, False),
        (BRANCH_AT + 200, BRANCH, False)]
    page = client.get(f"/api/ledger?run={BRANCH}&limit=2").json()
    assert page["total"] == 2 * BRANCH_AT // scale.PER_JOB  # the parent's two rows a job up to the branch
    assert [(r["run"], r["inherited"], r["end_step"]) for r in page["rows"]] == [
        (RUN, True, BRANCH_AT), (RUN, True, BRANCH_AT - scale.PER_JOB + 60)]


# ---- the rollups under the write path, on a small run


def _rollup(con) -> list[tuple]:
    return [tuple(r) for r in con.execute("SELECT * FROM metrics_rollup ORDER BY run_id, level, bucket")]


def _from_scratch(con) -> list[tuple]:
    """The rollups rebuilt from the metric rows alone, the table left as it was."""
    kept = _rollup(con)
    series.rebuild_rollups(con)
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


def test_old_database_gets_its_rollups_when_opened(tmp_path):
    path = tmp_path / "old.db"
    con = store.connect(path)
    _write(con, range(1, 1001))
    expected = _rollup(con)
    con.execute("DELETE FROM metrics_rollup")
    con.execute("PRAGMA user_version = 0")  # as a database from before the rollups
    con.close()
    con = store.connect(path)
    upgrade(con, path)  # as Workspace.db does on every open
    try:
        assert _rollup(con) == expected
        assert con.execute("PRAGMA user_version").fetchone()[0] == store.CURRENT_VERSION
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


def _preference_steps(steps) -> list[dict]:
    """Steps 1001–3000 a preference job's (a margin and an accuracy), the others supervised (neither)."""
    return [{**metric(s), "margin": (s % 7) / 10 - 0.3, "accuracy": (s % 4) / 4} if 1000 < s <= 3000 else metric(s)
            for s in steps]


def test_rollups_keep_preference_steps_margin_and_accuracy(small):
    """Downsampled rows average margin and accuracy over the preference steps they merge (None where none is)."""
    rows = _preference_steps(range(1, 5001))
    for i in range(0, len(rows), 37):
        ledger.write_steps(small, RUN, [], rows[i:i + 37])
    assert _rollup(small) == _from_scratch(small)
    small.execute("INSERT INTO runs (id, created_at, identity, active) VALUES (?, 0, '{}', 1)", (RUN,))
    body = series.metric_series(small, RUN, 1, 5000, 100)
    assert body["downsampled"] and body["level"] > 1  # read from the rollups
    for row in body["rows"]:
        raw = small.execute("SELECT AVG(margin), AVG(accuracy) FROM metrics WHERE run_id = ? AND step BETWEEN ? AND ?",
                            (RUN, row["step_min"], row["step"])).fetchone()
        assert (row["margin"] is None, row["accuracy"] is None) == (raw[0] is None, raw[1] is None)
        if raw[0] is not None:
            assert row["margin"] == pytest.approx(raw[0]) and row["accuracy"] == pytest.approx(raw[1])
    assert {r["margin"] is None for r in body["rows"] if r["step"] <= 1000 or r["step_min"] > 3000} == {True}


def test_preference_steps_rolled_up_before_the_margins_get_them_when_opened(tmp_path):
    path = tmp_path / "old.db"
    con = store.connect(path)
    _write(con, range(1, 1001))  # another run's supervised steps: left as they are
    ledger.write_steps(con, "run-0002", [], _preference_steps(range(990, 1200)))
    expected = _rollup(con)
    con.execute("UPDATE metrics_rollup SET margin_sum = NULL, margin_n = 0, accuracy_sum = NULL, accuracy_n = 0")
    con.execute("PRAGMA user_version = 2")  # as a database whose rollups did not keep margins
    con.close()
    con = store.connect(path)
    upgrade(con, path)
    try:
        assert _rollup(con) == expected
        assert con.execute("PRAGMA user_version").fetchone()[0] == store.CURRENT_VERSION
    finally:
        con.close()
