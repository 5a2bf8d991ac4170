"""Position and step arithmetic (laws 1 and 2), torch-free: segments, re-planning, global steps."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from conveyor.data.plan import JobOrder, Position, fresh, planned_steps


def test_planned_steps_counts_the_last_partial_step():
    assert planned_steps(20, 8) == 3
    assert planned_steps(16, 8) == 2
    assert planned_steps(1, 8) == 1
    assert planned_steps(0, 8) == 0


def test_a_job_overtaken_mid_way_continues_from_its_own_position():
    """40 examples, 1 a step: steps 1–9, another job takes 10–14, the rest is 15–45 (law 1 per segment)."""
    a = fresh(1, "fa", 40, 1).begin_segment(0, 1)
    assert (a.planned_steps, a.start_step, a.segment_start, a.end_step) == (40, 1, 1, 40)
    for _ in range(9):
        a = a.after_step(1)
    assert (a.steps_done, a.position, a.last_step) == (9, 9, 9)
    b = fresh(2, "fb", 5, 1).begin_segment(a.last_step, 1)
    assert (b.segment_start, b.end_step) == (10, 14)
    a = a.begin_segment(14, 1)
    assert (a.steps_done, a.position, a.start_step, a.segment_start, a.last_step, a.end_step) == (9, 9, 1, 15, 14, 45)
    a = a.after_step(1)
    assert (a.last_step, a.position) == (15, 10)


def test_a_batch_size_change_mid_job_replans_from_the_position():
    a = fresh(1, "f", 20, 1).begin_segment(0, 4)
    a = a.after_step(4).after_step(4)  # 8 of 20 examples in 2 steps
    b = a.begin_segment(a.last_step, 8)  # now 8 a step: 12 left → 2 more steps
    assert (b.planned_steps, b.end_step) == (4, 4)
    b = b.after_step(8)
    assert b.next_step_examples(8) == 4  # the last partial step
    assert b.after_step(8).finished and b.after_step(8).position == 20


def test_json_round_trip():
    p = fresh(3, "abc", 7, 2).begin_segment(10, 3).after_step(3)
    assert Position.from_json(p.to_json()) == p


@given(examples=st.integers(1, 50), epochs=st.integers(1, 3), per_step=st.integers(1, 9),
       cuts=st.lists(st.integers(0, 40), max_size=4), others=st.lists(st.integers(1, 5), min_size=4, max_size=4))
def test_any_interleaving_trains_each_position_once_with_contiguous_global_steps(examples, epochs, per_step, cuts,
                                                                                 others):
    """Cut a job into segments anywhere, with other jobs' steps in between: every plan position is trained once,
    the step count is the planned one, and each segment's global steps are contiguous and increasing."""
    order = JobOrder(7, "fp", examples, epochs)
    pos = fresh(1, "fp", examples, epochs).begin_segment(0, per_step)
    planned = pos.planned_steps
    global_step, trained, steps = 0, [], []
    cuts = sorted(set(c % planned for c in cuts))
    for k in range(planned):
        if k in cuts and k:
            global_step += others[len(steps) % 4]  # another job ran in between
            pos = pos.begin_segment(global_step, per_step)
        n = pos.next_step_examples(per_step)
        trained += [order[p] for p in range(pos.position, pos.position + n)]
        pos = pos.after_step(per_step)
        assert pos.last_step == global_step + 1
        global_step = pos.last_step
        steps.append(global_step)
    assert pos.finished and pos.steps_done == planned == -(-examples * epochs // per_step)
    assert steps == sorted(set(steps))
    for epoch in range(epochs):
        assert sorted(i for e, i in trained if e == epoch) == list(range(examples))
