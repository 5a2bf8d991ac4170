"""ledger.py, the one writer of the per-step tables: exact ledger, audit, metric and evaluation rows, versions at job
ends, rows lost to a rewind, and metric rollups that always equal a rebuild from the metric rows (series.py)."""

from __future__ import annotations

import pytest

from conveyor.data.holdout import set_name
from conveyor.data.plan import Position
from conveyor.store import jobs, ledger, runs, series, versions
from conveyor.store.database import connect, transaction
from conveyor.store.jobs import Conflict, JobState

IDENTITY = {"model.name": "tiny", "adapter.r": 8}


@pytest.fixture
def con(tmp_path):
    con = connect(tmp_path / "conveyor.db")
    yield con
    con.close()


def new_job(con, tag: str) -> int:
    return jobs.insert(con, file=f"{tag}.jsonl", source=f"/in/{tag}.jsonl", stored=f"/data/{tag}.jsonl",
                       fingerprint=tag * 64, priority=1, state=JobState.QUEUED).id


def metric(step: int, job_id: int, loss: float | None, tokens: int = 10) -> dict:
    """A metric row; losses are binary fractions so that sums are exact whatever their order."""
    return {"step": step, "job_id": job_id, "loss": loss, "learning_rate": 0.5, "grad_norm": 0.25, "tokens": tokens,
            "examples": 4, "step_time": 0.125}


def select(con, sql: str, *args) -> list[tuple]:
    return [tuple(r) for r in con.execute(sql, args)]


def rollups(con, run_id: str) -> list[tuple]:
    return select(con, "SELECT level, bucket, n, step_min, step_max, job_id, loss_n, loss_sum, loss_min, loss_max,"
                  " lr_sum, lr_n, grad_norm_sum, grad_norm_n, tokens, examples, step_time FROM metrics_rollup"
                  " WHERE run_id = ? ORDER BY level, bucket", run_id)


def assert_rollups_rebuild_the_same(con, run_id: str) -> list[tuple]:
    """The rollups as kept on every write equal those built from scratch from the metric rows (series.py)."""
    kept = rollups(con, run_id)
    with transaction(con):
        series.rebuild_rollups(con, run_id)
    assert rollups(con, run_id) == kept
    return kept


def ledger_rows(con) -> list[tuple]:
    return select(con, "SELECT run_id, job_id, start_step, end_step, examples, replayed, epochs, tokens, first_loss,"
                  " last_loss, mean_loss, outcome FROM ledger ORDER BY id")


def test_write_steps_appends_audit_metric_evaluation_and_sample_rows_together(con):
    """One call writes every kind of per-step row as given, with replayed lines kept and one creation time."""
    run = runs.create(con, IDENTITY)
    a, b = new_job(con, "a"), new_job(con, "b")
    ledger.write_steps(con, run.id, [(1, b, [3, 1, 2, 4]), (2, b, [5, 6], [[a, 7]]), (3, b, [8], [])],
                       [metric(1, b, 2.0), metric(2, b, 1.5), metric(3, b, 1.0, tokens=6)],
                       evals=[{"step": 3, "job_id": b, "eval_loss": 1.25, "examples": 4},
                              {"step": 3, "name": set_name(b), "job_id": b, "loss": 1.75, "examples": 2, "tokens": 30}],
                       samples=[{"step": 3, "prompt": "hi", "output": "there"}])
    assert select(con, "SELECT run_id, step, job_id, lines, replay FROM audit ORDER BY step") == [
        (run.id, 1, b, "[3, 1, 2, 4]", None), (run.id, 2, b, "[5, 6]", f"[[{a}, 7]]"), (run.id, 3, b, "[8]", None)]
    assert select(con, "SELECT step, job_id, loss, learning_rate, grad_norm, tokens, examples, step_time FROM metrics"
                  " ORDER BY step") == [(1, b, 2.0, 0.5, 0.25, 10, 4, 0.125), (2, b, 1.5, 0.5, 0.25, 10, 4, 0.125),
                                        (3, b, 1.0, 0.5, 0.25, 6, 4, 0.125)]
    assert select(con, "SELECT run_id, step, job_id, eval_loss, examples FROM evals") == [(run.id, 3, b, 1.25, 4)]
    assert select(con, "SELECT run_id, step, name, job_id, loss, examples, tokens FROM set_evals") == [
        (run.id, 3, "job 2", b, 1.75, 2, 30)]
    assert select(con, "SELECT run_id, step, prompt, output FROM samples") == [(run.id, 3, "hi", "there")]
    created = {r[0] for table in ("metrics", "evals", "set_evals", "samples")
               for r in con.execute(f"SELECT created_at FROM {table}")}
    assert len(created) == 1
    assert ledger.audit_rows(con, run.id) == [
        {"run": run.id, "inherited": False, "step": 1, "job": b, "lines": [3, 1, 2, 4]},
        {"run": run.id, "inherited": False, "step": 2, "job": b, "lines": [5, 6], "replay": [{"job": a, "line": 7}]},
        {"run": run.id, "inherited": False, "step": 3, "job": b, "lines": [8]}]
    assert ledger.losses(con, run.id, b) == [2.0, 1.5, 1.0]
    assert ledger.losses(con, run.id, b, 2, 3) == [1.5, 1.0]
    assert assert_rollups_rebuild_the_same(con, run.id) == [
        (level, 0, 3, 1, 3, b, 3, 4.5, 1.0, 2.0, 1.5, 3, 0.75, 3, 26, 12, 0.375) for level in series.ROLLUP_LEVELS]


def test_write_steps_with_nothing_to_write_writes_nothing(con):
    """An empty buffer is not a transaction: no row and no change at all."""
    run = runs.create(con, IDENTITY)
    before = con.total_changes
    ledger.write_steps(con, run.id, [], [])
    assert con.total_changes == before and not con.in_transaction
    assert select(con, "SELECT COUNT(*) FROM audit") == [(0,)] and rollups(con, run.id) == []


def test_a_step_written_again_replaces_its_rows_and_is_rolled_up_once(con):
    """A step retrained after a crash replaces its audit and metric rows; its rollup bucket counts it once."""
    run = runs.create(con, IDENTITY)
    j = new_job(con, "a")
    ledger.write_steps(con, run.id, [(1, j, [1, 2])], [metric(1, j, 2.0), metric(2, j, 1.0)])
    ledger.write_steps(con, run.id, [(1, j, [3, 4])], [metric(1, j, 0.5)])
    assert select(con, "SELECT step, lines FROM audit") == [(1, "[3, 4]")]
    assert select(con, "SELECT step, loss FROM metrics ORDER BY step") == [(1, 0.5), (2, 1.0)]
    kept = assert_rollups_rebuild_the_same(con, run.id)
    assert [(r[0], r[2], r[7]) for r in kept] == [(level, 2, 1.5) for level in series.ROLLUP_LEVELS]


def test_forget_after_drops_the_lost_steps_of_one_run_and_recounts_the_rollups(con):
    """Steps after a checkpoint's step go from every per-step table of that run only; the rollups follow."""
    run = runs.create(con, IDENTITY)
    other = runs.create(con, IDENTITY)
    j = new_job(con, "a")
    for run_id in (run.id, other.id):
        ledger.write_steps(con, run_id, [(s, j, [s]) for s in range(1, 21)],
                           [metric(s, j, s / 4) for s in range(1, 21)],
                           evals=[{"step": s, "job_id": j, "eval_loss": 1.0, "examples": 4} for s in (10, 20)]
                           + [{"step": s, "name": set_name(j), "job_id": j, "loss": 1.0, "examples": 2, "tokens": 9}
                              for s in (10, 20)],
                           samples=[{"step": s, "prompt": "p", "output": "o"} for s in (10, 20)])
    assert ledger.forget_after(con, run.id, 10) == 10
    for table in ("audit", "metrics", "evals", "set_evals", "samples"):
        assert select(con, f"SELECT MAX(step) FROM {table} WHERE run_id = ?", run.id) == [(10,)], table
        assert select(con, f"SELECT MAX(step) FROM {table} WHERE run_id = ?", other.id) == [(20,)], table
    assert select(con, "SELECT COUNT(*) FROM audit WHERE run_id = ?", run.id) == [(10,)]
    kept = assert_rollups_rebuild_the_same(con, run.id)
    assert [(level, bucket, n, lo, hi) for level, bucket, n, lo, hi, *_ in kept] == \
        [(level, 0, 10, 1, 10) for level in series.ROLLUP_LEVELS]  # bucket 1 of level 16 (steps 16–20) is gone
    assert [r[:5] for r in rollups(con, other.id)][:2] == [(16, 0, 15, 1, 15), (16, 1, 5, 16, 20)]
    assert ledger.forget_after(con, run.id, 10) == 0


def test_supersede_after_marks_ledger_rows_and_versions_past_the_step_lost(con):
    """A rewind to step 2 loses the rows and versions that reach past it, once; a later version gets a new name."""
    run = runs.create(con, IDENTITY)
    a, b, c = new_job(con, "a"), new_job(con, "b"), new_job(con, "c")
    for job_id, first, last, outcome in ((a, 1, 2, "done"), (b, 3, 5, "done"), (c, 6, 6, "interrupted")):
        ledger.record(con, run_id=run.id, job_id=job_id, start_step=first, end_step=last, examples=4, epochs=1,
                      tokens=10, outcome=outcome)
    v1, v2 = versions.add(con, run.id, a, 2), versions.add(con, run.id, b, 5)
    assert ledger.supersede_after(con, run.id, 2) == 2
    assert [(r[1], r[-1]) for r in ledger_rows(con)] == [(a, "done"), (b, "lost"), (c, "lost")]
    assert select(con, "SELECT id, lost FROM versions ORDER BY id") == [(v1, 0), (v2, 1)]
    assert versions.at_step(con, run.id, 5) is None and versions.at_step(con, run.id, 2) == v1
    assert ledger.supersede_after(con, run.id, 2) == 0  # rows already lost are not counted again
    assert not ledger.segment_closed(con, run.id, b, 5) and ledger.segment_closed(con, run.id, a, 2)
    assert versions.add(con, run.id, b, 5) == 3  # the retrained job end is v3, never v2 again


def _running(con, tag: str, claim: str = "w1") -> int:
    job_id = new_job(con, tag)
    assert jobs.claim_next(con, claim).id == job_id
    return job_id


def test_close_segment_at_a_job_end_writes_its_row_the_run_step_its_version_and_the_job(con):
    """A done segment: its ledger row counted from the audit and metrics, the run's step, a version, the job done."""
    run = runs.create(con, IDENTITY)
    earlier = new_job(con, "x")
    jobs.transition(con, earlier, JobState.SKIPPED, expect=JobState.QUEUED)
    j = _running(con, "a")
    ledger.write_steps(con, run.id, [(1, j, [1, 2, 3, 4]), (2, j, [5, 6, 7, 8], [[earlier, 1], [earlier, 2]])],
                       [metric(1, j, 2.0, tokens=12), metric(2, j, 1.0, tokens=10)])
    pos = Position(j, "a" * 64, examples=8, epochs=1, planned_steps=2, steps_done=2, position=8, start_step=1,
                   segment_start=1)
    ledger.close_segment(con, run.id, j, JobState.DONE, pos, expect=JobState.RUNNING, tokens=22, owner="w1")
    assert ledger_rows(con) == [(run.id, j, 1, 2, 8, 2, 1, 22, 2.0, 1.0, 1.5, "done")]
    assert runs.active(con).global_step == 2
    assert select(con, "SELECT id, run_id, job_id, step, pinned, lost FROM versions") == [(1, run.id, j, 2, 0, 0)]
    got = jobs.get(con, j)
    assert (got.state, got.steps_done, got.position, got.planned_steps, got.start_step, got.end_step,
            got.segment_start) == (JobState.DONE, 2, 8, 2, 1, 2, 1)
    assert ledger.rows(con, run.id) == [
        {"run": run.id, "inherited": False, "job": j, "file": "a.jsonl", "fingerprint": "a" * 64, "start_step": 1,
         "end_step": 2, "steps": 2, "examples": 8, "replayed": 2, "epochs": 1, "tokens": 22, "first_loss": 2.0,
         "last_loss": 1.0, "mean_loss": 1.5, "outcome": "done", "method": "sft",
         "overrides": {}}]  # a segment recorded without its method (a format of old): sft
    assert ledger.replayed_by_job(con, [j, earlier]) == {j: 2}


def test_close_segment_of_a_stopped_job_writes_an_interrupted_row_and_no_version(con):
    """A stop after 1 of 3 steps: an `interrupted` row, the run at that step, no version, the job ending at 3."""
    run = runs.create(con, IDENTITY)
    j = _running(con, "a")
    ledger.write_steps(con, run.id, [(1, j, [1, 2, 3, 4])], [metric(1, j, 2.0)])
    pos = Position(j, "a" * 64, examples=12, epochs=1, planned_steps=3, steps_done=1, position=4, start_step=1,
                   segment_start=1)
    ledger.close_segment(con, run.id, j, JobState.INTERRUPTED, pos, expect=JobState.RUNNING, tokens=10)
    assert ledger_rows(con) == [(run.id, j, 1, 1, 4, 0, 1, 10, 2.0, 2.0, 2.0, "interrupted")]
    assert runs.active(con).global_step == 1 and select(con, "SELECT * FROM versions") == []
    got = jobs.get(con, j)
    assert (got.state, got.steps_done, got.position, got.end_step) == (JobState.INTERRUPTED, 1, 4, 3)
    assert ledger.segment_closed(con, run.id, j, 1)
    assert not ledger.close_overtaken(con, run.id, pos)  # its row is written already


def test_close_segment_of_no_steps_writes_no_ledger_row(con):
    """A job skipped before its first step changes state only: no ledger row, no version, the run's step kept."""
    run = runs.create(con, IDENTITY)
    runs.set_step(con, run.id, 4)
    j = _running(con, "a")
    pos = Position(j, "a" * 64, examples=8, epochs=1, planned_steps=2, segment_start=5)
    ledger.close_segment(con, run.id, j, JobState.SKIPPED, pos, expect=JobState.RUNNING, tokens=0)
    assert ledger_rows(con) == [] and select(con, "SELECT * FROM versions") == []
    assert runs.active(con).global_step == 4
    got = jobs.get(con, j)
    assert (got.state, got.steps_done, got.start_step) == (JobState.SKIPPED, 0, None)


def test_close_segment_is_one_transaction_a_lost_claim_writes_nothing(con):
    """When the job is no longer under the worker's claim, neither the ledger row nor the run's step is written."""
    run = runs.create(con, IDENTITY)
    j = _running(con, "a", claim="w1")
    ledger.write_steps(con, run.id, [(1, j, [1, 2, 3, 4]), (2, j, [5, 6, 7, 8])], [metric(1, j, 2.0)])
    pos = Position(j, "a" * 64, examples=8, epochs=1, planned_steps=2, steps_done=2, position=8, start_step=1,
                   segment_start=1)
    with pytest.raises(Conflict, match="job 1 is running, not running under this worker's claim"):
        ledger.close_segment(con, run.id, j, JobState.DONE, pos, expect=JobState.RUNNING, tokens=22, owner="w2")
    assert ledger_rows(con) == [] and select(con, "SELECT * FROM versions") == []
    assert runs.active(con).global_step == 0 and jobs.get(con, j).state == JobState.RUNNING


def test_close_overtaken_gives_an_open_segment_its_interrupted_row_once(con):
    """A segment cut by a crash gets its `interrupted` row from its own audit and metric rows, once per segment."""
    run = runs.create(con, IDENTITY)
    a, b = new_job(con, "a"), new_job(con, "b")
    # a trains steps 1–2, b overtakes it at step 3, a resumes at step 4 (its third step)
    ledger.write_steps(con, run.id, [(1, a, [1, 2]), (2, a, [3, 4], [[b, 1]]), (3, b, [1, 2]), (4, a, [5])],
                       [metric(1, a, 1.5, 7), metric(2, a, 1.0, 5), metric(3, b, 0.5, 100), metric(4, a, 0.75, 3)])
    assert ledger.segment_counts(con, run.id, a, 1, 4) == (3, [1, 2, 3, 4, 5])
    assert ledger.segment_counts(con, run.id, a, 2, 3) == (1, [3, 4])
    assert ledger.segment_replayed(con, run.id, a, 1, 4) == 1 and ledger.segment_replayed(con, run.id, a, 3, 4) == 0
    assert ledger.segment_tokens(con, run.id, a, 1, 4) == 15 and ledger.segment_tokens(con, run.id, b, 5, 9) == 0
    first = Position(a, "a" * 64, examples=6, epochs=1, planned_steps=3, steps_done=2, position=4, start_step=1,
                     segment_start=1)
    assert ledger.close_overtaken(con, run.id, first)
    assert not ledger.close_overtaken(con, run.id, first)
    second = Position(a, "a" * 64, examples=6, epochs=1, planned_steps=3, steps_done=3, position=5, start_step=1,
                      segment_start=4, segment_base=2)
    assert ledger.close_overtaken(con, run.id, second)
    assert not ledger.close_overtaken(con, run.id, Position(b, "b" * 64, 2, 1, 1, segment_start=5))  # no steps yet
    assert ledger_rows(con) == [(run.id, a, 1, 2, 4, 1, 1, 12, 1.5, 1.0, 1.25, "interrupted"),
                                (run.id, a, 4, 4, 1, 0, 1, 3, 0.75, 0.75, 0.75, "interrupted")]


def test_record_without_metrics_leaves_the_losses_empty(con):
    """A segment whose metric rows are gone still gets its row, with no losses rather than made-up ones."""
    run = runs.create(con, IDENTITY)
    j = new_job(con, "a")
    ledger.record(con, run_id=run.id, job_id=j, start_step=1, end_step=3, examples=12, epochs=2, tokens=0,
                  outcome="skipped")
    assert ledger_rows(con) == [(run.id, j, 1, 3, 12, 0, 2, 0, None, None, None, "skipped")]


@pytest.fixture
def branched(con):
    """run-0001 trained jobs 1–3 (steps 1–2, 3–4, 5–6; v1–v3); run-0002 branched from v2 (step 4) and trained job 4
    at steps 5–6."""
    parent = runs.create(con, IDENTITY)
    ids = [new_job(con, tag) for tag in "abcd"]
    for job_id, (first, last) in zip(ids[:3], ((1, 2), (3, 4), (5, 6))):
        ledger.write_steps(con, parent.id, [(s, job_id, [s]) for s in (first, last)], [])
        ledger.record(con, run_id=parent.id, job_id=job_id, start_step=first, end_step=last, examples=2, epochs=1,
                      tokens=4, outcome="done")
        versions.add(con, parent.id, job_id, last)
    child = runs.create(con, IDENTITY, run_id="run-0002", step=4, parent_run=parent.id, parent_version=2)
    ledger.write_steps(con, child.id, [(5, ids[3], [9]), (6, ids[3], [10])], [])
    ledger.record(con, run_id=child.id, job_id=ids[3], start_step=5, end_step=6, examples=2, epochs=1, tokens=4,
                  outcome="done")
    return parent.id, child.id


def test_rows_follow_a_runs_lineage_and_mark_what_it_inherited(con, branched):
    """A rollback's run shows its parent's rows up to the branch step (inherited), then its own; `own` only its own."""
    parent, child = branched
    assert [(r["run"], r["inherited"], r["job"], r["end_step"]) for r in ledger.rows(con, child)] == \
        [(parent, True, 1, 2), (parent, True, 2, 4), (child, False, 4, 6)]
    assert [(r["run"], r["job"]) for r in ledger.rows(con, child, own=True)] == [(child, 4)]
    assert [(r["run"], r["inherited"], r["job"]) for r in ledger.rows(con)] == \
        [(parent, False, 1), (parent, False, 2), (parent, False, 3), (child, False, 4)]
    assert [(r["run"], r["inherited"], r["step"]) for r in ledger.audit_rows(con, child)] == \
        [(parent, True, 1), (parent, True, 2), (parent, True, 3), (parent, True, 4), (child, False, 5),
         (child, False, 6)]
    assert [r["step"] for r in ledger.audit_rows(con, child, own=True)] == [5, 6]
    assert [(r["run"], r["step"]) for r in ledger.audit_rows(con)][-3:] == [(parent, 6), (child, 5), (child, 6)]


def test_page_is_newest_first_across_the_lineage_with_the_total(con, branched):
    """Pages run over the run's own rows, then the inherited ones, newest first; the total counts the lineage."""
    parent, child = branched

    def jobs_of(offset: int, limit: int) -> tuple[list[tuple], int]:
        got, total = ledger.page(con, child, offset, limit)
        return [(r["job"], r["inherited"]) for r in got], total

    assert jobs_of(0, 2) == ([(4, False), (2, True)], 3)
    assert jobs_of(2, 2) == ([(1, True)], 3)
    assert jobs_of(1, 5) == ([(2, True), (1, True)], 3)
    assert jobs_of(3, 2) == ([], 3)
    assert jobs_of(0, 10)[0] == [(4, False), (2, True), (1, True)]
    assert [r["job"] for r in ledger.page(con, parent, 0, 10)[0]] == [3, 2, 1]


def test_replayed_by_job_sums_the_replay_of_rows_not_lost(con):
    """Replayed examples per job over its ledger rows; lost rows and jobs without replay are left out."""
    run = runs.create(con, IDENTITY)
    a, b, c = new_job(con, "a"), new_job(con, "b"), new_job(con, "c")
    ledger.write_steps(con, run.id, [(1, a, [1]), (2, b, [1], [[a, 1], [a, 2]]), (3, b, [2], [[a, 3]]),
                                     (4, c, [1], [[a, 1]])], [])
    for job_id, first, last in ((a, 1, 1), (b, 2, 2), (b, 3, 3), (c, 4, 4)):
        ledger.record(con, run_id=run.id, job_id=job_id, start_step=first, end_step=last, examples=1, epochs=1,
                      tokens=1, outcome="done")
    assert ledger.replayed_by_job(con, [a, b, c]) == {b: 3, c: 1}
    ledger.supersede_after(con, run.id, 3)
    assert ledger.replayed_by_job(con, [a, b, c]) == {b: 3}
    assert ledger.replayed_by_job(con, [b]) == {b: 3} and ledger.replayed_by_job(con, []) == {}
