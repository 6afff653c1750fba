"""Pure metric arithmetic: per-prompt judgements, per-case means, and honest handling of NaN/Inf.

Every metric is a mean over cases of a mean over that case's prompts (ROME's summarisation: a case with two
paraphrases weighs as much as a case with one). A judgement that cannot be computed because the model produced
NaN/Inf is `None`; each aggregate says what it does with those (`nonfinite_as`) and always counts them, so a
collapsed model can never look good by having its broken cases silently dropped (the reference code drops them).
Each aggregate keeps its per-case values (`Outcomes`), from which its interval and paired tests are computed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from prunecli.evaluation.uncertainty import MEAN, PROPORTION, Outcomes

Judgement = float | None
"""One prompt's value (1.0/0.0 for a success flag, a number for a magnitude), or None when non-finite."""


@dataclass(frozen=True)
class MetricValue:
    """An aggregate: its value, over how many cases, how many of those had non-finite scores, and the per-case
    outcomes it was computed from (None: not kept, so no interval)."""

    value: float
    n: int
    n_nonfinite: int = 0
    outcomes: Outcomes | None = None


def finite(*xs: float) -> bool:
    return all(math.isfinite(x) for x in xs)


def lower(a: float, b: float) -> Judgement:
    """1.0 when a < b strictly (for NLLs: the first target is more likely), 0.0 otherwise, None if non-finite."""
    if not finite(a, b):
        return None
    return 1.0 if a < b else 0.0


def prob_gap(nll_a: float, nll_b: float) -> Judgement:
    """exp(-nll_a) - exp(-nll_b): the magnitude variant of `lower` (ROME's "magnitude" metrics), None if non-finite."""
    if not finite(nll_a, nll_b):
        return None
    return math.exp(-nll_a) - math.exp(-nll_b)


def flag(ok: bool, *values: float) -> Judgement:
    """A success flag that depends on `values` being finite (e.g. argmax correctness of a target)."""
    return (1.0 if ok else 0.0) if finite(*values) else None


def case_means(cases: Sequence[Sequence[Judgement]], nonfinite_as: float | None, flags: bool = False) -> MetricValue:
    """Mean over cases of the mean over each case's prompts; cases without prompts do not take part.

    `nonfinite_as` replaces a None judgement (0.0: a broken prompt is a failure); with None the broken prompts are
    left out of their case's mean (and a case left with nothing is left out). Either way `n_nonfinite` counts the
    cases that had at least one broken prompt, and `n` counts every case that had prompts. The outcomes hold each
    case's mean (None where a case takes no part); they are a proportion (Wilson interval, McNemar test) when the
    judgements are success `flags` and every case has exactly one, else a mean (bootstrap).
    """
    per_case: list[float | None] = []
    n = n_bad = 0
    for case in cases:
        kept = [k for k in ((nonfinite_as if j is None else j) for j in case) if k is not None]
        per_case.append(sum(kept) / len(kept) if kept else None)
        if case:
            n += 1
            n_bad += any(j is None for j in case)
    values = [v for v in per_case if v is not None]
    value = sum(values) / len(values) if values else math.nan
    single = all(len(case) <= 1 for case in cases)
    return MetricValue(value, n, n_bad, Outcomes(PROPORTION if flags and single else MEAN, per_case))


def weighted_f1(labels: Sequence[int], predictions: Sequence[int]) -> float:
    """F1 per class averaged with the class frequencies as weights (scikit-learn's average="weighted")."""
    total = len(labels)
    if total == 0:
        return math.nan
    score = 0.0
    for cls in sorted(set(labels)):
        tp = sum(1 for y, p in zip(labels, predictions) if y == cls and p == cls)
        fp = sum(1 for y, p in zip(labels, predictions) if y != cls and p == cls)
        fn = sum(1 for y, p in zip(labels, predictions) if y == cls and p != cls)
        f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
        score += f1 * sum(1 for y in labels if y == cls) / total
    return score
