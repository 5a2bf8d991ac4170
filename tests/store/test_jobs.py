"""jobs: the one owner of job rows. Every change of state is a compare-and-set along TRANSITIONS, the queue order
is priority, then interrupted before queued, then arrival, and a claim is taken once."""

from __future__ import annotations

import pytest

from conveyor.errors import ConveyorError
from conveyor.store import jobs
from conveyor.store.database import connect
from conveyor.store.jobs import Conflict, JobState


@pytest.fixture
def con(tmp_path):
    return connect(tmp_path / "conveyor.db")


def _add(con, name: str, priority: str = "normal", state: JobState = JobState.QUEUED) -> jobs.Job:
    return jobs.insert(con, file=name, source=f"/in/{name}", stored=f"/data/{name}", fingerprint=name * 8,
                       priority=jobs.PRIORITIES[priority], state=state, examples=4, epochs=1)


def test_insert_and_read_back_every_column(con):
    job = _add(con, "a.jsonl", "high")
    assert (job.id, job.file, job.state, job.priority, job.examples, job.steps_done, job.holdout) == \
        (1, "a.jsonl", JobState.QUEUED, 0, 4, 0, None)
    jobs.update(con, job.id, warnings=["w"], excluded=[3], holdout=[2, 5])
    again = jobs.get(con, job.id)
    assert (again.warnings, again.excluded, again.holdout) == (["w"], [3], [2, 5])
    assert again.to_json()["held_out"] == [2, 5] and again.to_json()["priority"] == "high"
    with pytest.raises(ConveyorError, match="no job 9"):
        jobs.get(con, 9)


def test_the_queue_order_is_priority_then_interrupted_then_arrival(con):
    a = _add(con, "a", "low")
    b = _add(con, "b")
    c = _add(con, "c")
    d = _add(con, "d", "high")
    jobs.transition(con, c.id, JobState.RUNNING, expect=JobState.QUEUED, claim="x")
    jobs.transition(con, c.id, JobState.INTERRUPTED, expect=JobState.RUNNING, owner="x")
    assert [j.id for j in jobs.waiting(con)] == [d.id, c.id, b.id, a.id]
    first = jobs.claim_next(con, "claim-1")
    assert (first.id, first.state, first.claim) == (d.id, JobState.RUNNING, "claim-1")
    assert [j.id for j in jobs.running_and_waiting(con)] == [d.id, c.id, b.id, a.id]


def test_a_transition_is_a_compare_and_set_along_the_allowed_edges(con):
    job = _add(con, "a")
    jobs.transition(con, job.id, JobState.RUNNING, expect=JobState.QUEUED, claim="mine")
    with pytest.raises(Conflict, match="not queued"):  # someone else moved it first
        jobs.transition(con, job.id, JobState.RUNNING, expect=JobState.QUEUED, claim="theirs")
    with pytest.raises(Conflict, match="claim"):  # only under its own claim
        jobs.transition(con, job.id, JobState.DONE, expect=JobState.RUNNING, owner="theirs")
    done = jobs.transition(con, job.id, JobState.DONE, expect=JobState.RUNNING, owner="mine")
    assert done.state == JobState.DONE
    with pytest.raises(ConveyorError, match="cannot go from done to queued"):
        jobs.transition(con, job.id, JobState.QUEUED, expect=JobState.DONE)
    # Only reconciliation may reopen a done job (its later checkpoints were unusable).
    assert jobs.transition(con, job.id, JobState.INTERRUPTED, expect=JobState.DONE, reopen=True).state == \
        JobState.INTERRUPTED


def test_every_state_lists_its_transitions_and_terminal_states_have_none():
    assert set(jobs.TRANSITIONS) == set(JobState)
    for terminal in (JobState.DONE, JobState.SKIPPED, JobState.REJECTED):
        assert jobs.TRANSITIONS[terminal] == set()


def test_an_update_with_expect_or_owner_refuses_a_job_that_changed(con):
    job = _add(con, "a")
    jobs.update(con, job.id, priority=0)  # no condition: always
    with pytest.raises(Conflict):
        jobs.update(con, job.id, expect=JobState.RUNNING, steps_done=3)
    assert jobs.get(con, job.id).steps_done == 0


def test_claim_next_takes_each_job_once(con):
    _add(con, "a")
    _add(con, "b")
    claims = [jobs.claim_next(con, f"c{i}") for i in range(3)]
    assert [c.id if c else None for c in claims] == [1, 2, None]
