"""Intervals and paired tests (`evaluation.uncertainty`) against textbook values and exact arithmetic."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from prunecli.evaluation.metrics import weighted_f1
from prunecli.evaluation.uncertainty import (
    EXACT_BELOW,
    MEAN,
    PERPLEXITY,
    PROPORTION,
    RESAMPLES,
    WEIGHTED_F1,
    Outcomes,
    bootstrap,
    mcnemar,
    paired_difference,
    wilson,
)


@pytest.mark.parametrize("k, n, lo, hi", [
    (8, 10, 0.4902, 0.9433), (0, 10, 0.0, 0.2775), (10, 10, 0.7225, 1.0),
    # Newcombe (1998), Statistics in Medicine 17:857, Table I, method 3 (score interval without continuity correction)
    (81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718),
])
def test_wilson_textbook_values(k: int, n: int, lo: float, hi: float) -> None:
    assert wilson(k, n) == pytest.approx((lo, hi), abs=5e-5)


def test_mcnemar_exact_and_chi_square() -> None:
    # Exact: 2 vs 8 discordant pairs, two-sided binomial p = 2 * (C(10,0) + C(10,1) + C(10,2)) / 2^10 = 112/1024.
    assert mcnemar(2, 8) == (pytest.approx(112 / 1024), "exact")
    assert mcnemar(8, 2) == mcnemar(2, 8) and mcnemar(0, 0) == (1.0, "exact") and mcnemar(5, 5)[0] == 1.0
    # Agresti, An Introduction to Categorical Data Analysis (2nd ed.), section 8.1: presidential approval in two
    # surveys, 150 vs 86 discordant; with continuity correction chi2 = (|150 - 86| - 1)^2 / 236 = 16.82, p = 4.1e-5.
    p, test = mcnemar(150, 86)
    assert test == "chi2-cc" and p == pytest.approx(4.11e-5, rel=2e-3)
    assert math.erfc(math.sqrt(16.8178 / 2)) == pytest.approx(p, rel=1e-4)
    # The switch: exact below EXACT_BELOW discordant records, chi-square from there on.
    assert mcnemar(EXACT_BELOW - 1, 0)[1] == "exact" and mcnemar(EXACT_BELOW, 0)[1] == "chi2-cc"
    assert mcnemar(24, 0)[0] == pytest.approx(2 / 2 ** 24)


def test_proportion_outcomes_use_wilson_and_skip_records_without_a_value() -> None:
    o = Outcomes(PROPORTION, [1.0, None, 1.0, 0.0, 1.0])
    assert o.estimate() == 0.75 and o.method == "wilson"
    assert o.interval() == pytest.approx(wilson(3, 4))
    assert Outcomes(PROPORTION, [None]).interval() is None


def test_bootstrap_is_deterministic_and_about_the_normal_interval() -> None:
    rng = random.Random(1)
    values = [rng.gauss(0.5, 0.2) for _ in range(400)]
    o = Outcomes(MEAN, values)
    first = o.interval()
    assert first == o.interval() == Outcomes.from_json(o.to_json()).interval()
    estimator = o.estimator(range(400))
    assert not np.array_equal(bootstrap(estimator, 400, seed=1), bootstrap(estimator, 400))  # the seed matters
    mean, sd = float(np.mean(values)), float(np.std(values))
    half = 1.96 * sd / math.sqrt(len(values))
    assert first is not None and first[0] < mean < first[1]
    assert first == pytest.approx((mean - half, mean + half), abs=0.15 * half)


def test_perplexity_and_f1_estimators_recompute_the_metric() -> None:
    nll = [2.0, 3.0, 2.5]
    tokens = [31.0, 16.0, 16.0]
    ppl = Outcomes(PERPLEXITY, nll, tokens)
    assert ppl.estimate() == pytest.approx(math.exp((62 + 48 + 40) / 63))
    lo, hi = ppl.interval()  # type: ignore[misc]
    assert math.exp(2.0) <= lo <= ppl.estimate() <= hi <= math.exp(3.0)
    gold, pred = [1, 1, 1, 0, 0, 2], [1, 1, 0, 0, 2, 2]
    f1 = Outcomes(WEIGHTED_F1, [float(p) for p in pred], labels=gold)
    assert f1.estimate() == pytest.approx(weighted_f1(gold, pred))
    # Under resampling weights too: record 0 twice, record 3 not at all == that list of records.
    w = np.array([[2.0, 1, 1, 0, 1, 1]])
    again = [0, 0, 1, 2, 4, 5]
    assert f1.estimator(range(6))(w)[0] == pytest.approx(weighted_f1([gold[i] for i in again],
                                                                     [pred[i] for i in again]))


def test_paired_mcnemar_counts_discordant_records() -> None:
    a = Outcomes(PROPORTION, [1.0, 1.0, 0.0, 0.0, 1.0, None])
    b = Outcomes(PROPORTION, [1.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    d = paired_difference(a, b)
    assert d is not None and d.n == 5 and d.discordant == (1, 2) and d.test == "mcnemar-exact"
    assert d.difference == pytest.approx(1 / 5) and d.p == 1.0 and d.within_noise
    strong = paired_difference(Outcomes(PROPORTION, [0.0] * 30), Outcomes(PROPORTION, [1.0] * 30))
    assert strong is not None and strong.test == "mcnemar-chi2-cc" and not strong.within_noise
    assert paired_difference(a, Outcomes(MEAN, b.values)) is None  # different statistics never pair


def test_paired_bootstrap_sees_a_consistent_shift_that_the_unpaired_intervals_hide() -> None:
    rng = random.Random(2)
    base = [rng.uniform(0.0, 1.0) for _ in range(60)]
    a, b = Outcomes(MEAN, base), Outcomes(MEAN, [v + 0.02 for v in base])
    ia, ib = a.interval(), b.interval()
    assert ia is not None and ib is not None and ia[1] > ib[0]  # the unpaired intervals overlap widely
    d = paired_difference(a, b)
    assert d is not None and d.test == "paired-bootstrap" and d.difference == pytest.approx(0.02)
    assert d.interval == pytest.approx((0.02, 0.02)) and not d.within_noise and d.p == 1 / RESAMPLES
    same = paired_difference(a, a)
    assert same is not None and same.difference == 0.0 and same.within_noise and same.p == 1.0


def test_outcomes_json_round_trip_and_rejects_garbage() -> None:
    o = Outcomes(PERPLEXITY, [2.0, None], [3.0, 4.0])
    assert Outcomes.from_json(o.to_json()) == o
    for bad in ({"statistic": "median", "values": []}, {"statistic": MEAN}, [1, 2],
                {"statistic": PERPLEXITY, "values": [1.0], "weights": [1.0, 2.0]},
                {"statistic": PERPLEXITY, "values": [1.0]}, {"statistic": WEIGHTED_F1, "values": [1.0]}):
        with pytest.raises(ValueError):
            Outcomes.from_json(bad)
