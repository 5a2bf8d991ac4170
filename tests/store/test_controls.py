"""Controls: ask → take → answer, each a compare-and-set; the table of what a request means where."""

from __future__ import annotations

import threading

from conveyor.store import controls
from conveyor.store import database as store
from conveyor.store.controls import Action, Context, Effect


def _db(tmp_path):
    return store.connect(tmp_path / "c.db")


def test_every_request_has_a_meaning_in_every_context():
    for where in Context:
        for action in Action:
            effect = controls.MEANING[where][action]
            if effect == Effect.NOTHING:
                assert controls.NOTHING_BECAUSE[(where, action)]


def test_a_request_is_taken_once(tmp_path):
    con = _db(tmp_path)
    rid = controls.ask(con, Action.PAUSE, "test")
    taken = []
    threads = [threading.Thread(target=lambda: taken.append(controls.take(store.connect(tmp_path / "c.db"), "t")))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.id for r in taken if r] == [rid]


def test_an_answer_is_never_overwritten_by_an_expiry(tmp_path):
    con = _db(tmp_path)
    rid = controls.ask(con, Action.STOP, "cli")
    req = controls.take(con, "worker")
    assert not controls.expire(con, rid)  # taken: it is being acted on, it cannot expire
    assert controls.answer(con, req.id, "stopped after step 9", Effect.STOP)
    assert not controls.expire(con, rid)
    assert not controls.answer(con, req.id, "second answer")
    assert controls.result_of(con, rid) == ("stopped after step 9", True)


def test_an_untaken_request_expires_and_is_then_never_acted_on(tmp_path):
    con = _db(tmp_path)
    rid = controls.ask(con, Action.PAUSE, "cli")
    assert controls.wait(con, rid, timeout=0.1) is None
    assert controls.take(con, "late daemon") is None
    assert controls.result_of(con, rid)[0] == controls.EXPIRED


def test_wait_returns_the_answer_of_a_taken_request_after_the_timeout(tmp_path):
    con = _db(tmp_path)
    rid = controls.ask(con, Action.STOP, "cli")
    controls.take(con, "worker")

    def answer_later():
        other = store.connect(tmp_path / "c.db")
        import time

        time.sleep(0.4)
        controls.answer(other, rid, "stopped", Effect.STOP)

    t = threading.Thread(target=answer_later)
    t.start()
    assert controls.wait(con, rid, timeout=0.1, taken_grace=30) == "stopped"
    t.join()


def test_paused_follows_the_last_effective_pause_or_resume(tmp_path):
    con = _db(tmp_path)
    assert not controls.paused(con)
    rid = controls.ask(con, Action.PAUSE, "cli")
    controls.take(con, "d")
    controls.answer(con, rid, "paused", Effect.HOLD)
    assert controls.paused(con)
    rid = controls.ask(con, Action.PAUSE, "cli")
    controls.take(con, "d")
    controls.answer(con, rid, "already paused")
    assert controls.paused(con)
    rid = controls.ask(con, Action.RESUME, "cli")
    controls.take(con, "d")
    controls.answer(con, rid, "resumed", Effect.GO_ON)
    assert not controls.paused(con)
