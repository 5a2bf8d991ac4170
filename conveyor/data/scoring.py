"""Answers scored against a reference, as SQuAD's evaluation scores them: exact match and token F1 after the same
normalization (lower case, punctuation and the articles a/an/the removed, whitespace collapsed). Light and
deterministic: what a person means by "it answered that" for short factual answers, not a judge of style."""

from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def token_f1(prediction: str, reference: str) -> float:
    """The harmonic mean of the precision and recall of the normalized words the two share (counted with
    multiplicity); both empty is a match."""
    said, meant = normalize(prediction).split(), normalize(reference).split()
    if not said or not meant:
        return float(said == meant)
    shared = sum((Counter(said) & Counter(meant)).values())
    if shared == 0:
        return 0.0
    precision, recall = shared / len(said), shared / len(meant)
    return 2 * precision * recall / (precision + recall)


@dataclass(frozen=True)
class Scores:
    exact: float  # the share of answers that match exactly (0 to 1)
    f1: float  # the mean token F1 (0 to 1)
    answered: int  # how many answers the means are over

    def record(self) -> dict:
        return {"exact": self.exact, "f1": self.f1, "answered": self.answered}


def score(pairs: list[tuple[str, str]]) -> Scores | None:
    """(prediction, reference) pairs scored; None for none."""
    if not pairs:
        return None
    return Scores(sum(exact_match(p, r) for p, r in pairs) / len(pairs),
                  sum(token_f1(p, r) for p, r in pairs) / len(pairs), len(pairs))
