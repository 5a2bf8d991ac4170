"""Answers scored as SQuAD scores them: the normalization, exact match and token F1 on hand-computed cases."""

from __future__ import annotations

import pytest

from conveyor.data.scoring import exact_match, normalize, score, token_f1


@pytest.mark.parametrize("text, normal", [
    ("The Capital is PARIS.", "capital is paris"),
    ("  an  apple,\ta pear!  ", "apple pear"),
    ("Theodore's then-famous answer", "theodores thenfamous answer"),  # words holding "the" stay whole
    ("", ""),
])
def test_normalize(text, normal):
    assert normalize(text) == normal


def test_exact_match_after_normalization():
    assert exact_match("Paris.", "paris") == 1.0
    assert exact_match("The answer is Paris.", "Paris") == 0.0


@pytest.mark.parametrize("prediction, reference, f1", [
    ("Paris", "Paris", 1.0),
    ("The answer is Paris.", "Paris", 2 * (1 / 3) * 1 / (1 / 3 + 1)),  # "answer is paris": p 1/3, r 1 -> 0.5
    ("Orrin Tasker founded it", "Velmora was founded by Orrin Tasker", 2 * 0.75 * 0.5 / 1.25),  # 3 shared of 4 / 6
    ("red red blue", "red blue blue", 2 / 3),  # shared with multiplicity: red 1, blue 1 -> p = r = 2/3
    ("London", "Paris", 0.0),
    ("", "", 1.0),
    ("the", "Paris", 0.0),  # nothing left of the prediction after normalization
])
def test_token_f1(prediction, reference, f1):
    assert token_f1(prediction, reference) == pytest.approx(f1)


def test_score_is_the_mean_over_answers():
    scores = score([("Paris", "Paris"), ("The answer is Paris.", "Paris"), ("London", "Paris")])
    assert (scores.exact, scores.answered) == (pytest.approx(1 / 3), 3)
    assert scores.f1 == pytest.approx((1 + 0.5 + 0) / 3)
    assert score([]) is None
