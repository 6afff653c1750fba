"""How sure is a number? Intervals for every rate and paired tests between two runs, from per-record outcomes.

A metric keeps the per-record values it was computed from (`Outcomes`, in record order), so its uncertainty can be
computed when it is reported and again, paired with another run's, from report files alone (`prunecli compare` reads
JSON only: this module needs numpy, never torch).

Intervals (95 %):
- proportion (each record one success or failure, e.g. efficacy over one edit prompt): the Wilson score interval.
- anything else (a record's mean over several prompts, token accuracies, magnitudes, ROUGE, F1, perplexity): a
  percentile bootstrap over records, `RESAMPLES` resamples drawn from numpy's PCG64 seeded with `SEED`, so the same
  outcomes always give the same interval. Records are the unit because prompts of one record (ten neighborhood
  prompts about one relation) are not independent of each other. Perplexity's records are its windows (blocks of
  consecutive tokens), resampled with their token counts: exp(sum of window NLLs / their tokens).

Paired differences (run B minus run A, the same records in the same order):
- proportions: McNemar's test on the discordant records (b: A succeeded and B failed, c: the other way round); the
  exact two-sided binomial test while b + c < `EXACT_BELOW`, else the chi-square test with continuity correction
  (|b - c| - 1)^2 / (b + c), one degree of freedom. Within noise when p >= 0.05.
- everything else: a paired bootstrap, both runs' statistic on the same resampled records; the difference's 95 %
  percentile interval, and p = twice the smaller tail share of resampled differences at or beyond 0 (at least
  1 / RESAMPLES, the resolution of the resampling). Within noise when the interval covers 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

LEVEL = 0.95
Z = 1.959963984540054  # the standard normal's 97.5 % quantile
RESAMPLES = 2000
SEED = 0
EXACT_BELOW = 25
"""McNemar: discordant counts below this use the exact binomial test (the chi-square approximation is poor there)."""
_CELLS_PER_CHUNK = 4_000_000  # resample weights held at once (rows x records), about 32 MB of float64

INTERVALS_TEXT = ("Wilson score for proportions (one success or failure per case); otherwise a percentile "
                  f"bootstrap over cases (perplexity: over windows), {RESAMPLES} resamples, seed {SEED}.")

PROPORTION = "proportion"  # values 0/1: the share of successes
MEAN = "mean"  # values: any numbers; their mean
PERPLEXITY = "perplexity"  # values: windows' mean token NLL, weights: their token counts; exp(weighted mean)
WEIGHTED_F1 = "weighted_f1"  # values: predicted labels, labels: gold labels; class-frequency-weighted F1
STATISTICS = (PROPORTION, MEAN, PERPLEXITY, WEIGHTED_F1)


@dataclass(frozen=True)
class Outcomes:
    """Per-record outcomes of one metric, in record order; a None value: the record did not take part (no prompt of
    that kind, or nothing finite to average)."""

    statistic: str
    values: list[float | None]
    weights: list[float] | None = None  # perplexity: scored tokens per window
    labels: list[int] | None = None  # weighted F1: gold labels (values are the predictions)

    def to_json(self) -> dict[str, Any]:
        extra = {k: v for k, v in (("weights", self.weights), ("labels", self.labels)) if v is not None}
        return {"statistic": self.statistic, "values": self.values, **extra}

    @classmethod
    def from_json(cls, obj: Any) -> Outcomes:
        """Read back what `to_json` wrote; ValueError when it is not that."""
        if not isinstance(obj, dict) or obj.get("statistic") not in STATISTICS or not isinstance(obj.get("values"),
                                                                                                  list):
            raise ValueError("outcomes need a known statistic and a list of values")
        values = [None if v is None else float(v) for v in obj["values"]]
        weights = [float(w) for w in obj["weights"]] if obj.get("weights") is not None else None
        labels = [int(x) for x in obj["labels"]] if obj.get("labels") is not None else None
        required = {PERPLEXITY: "weights", WEIGHTED_F1: "labels"}.get(obj["statistic"])
        if required is not None and obj.get(required) is None:
            raise ValueError(f"{obj['statistic']} outcomes need their {required}")
        for column in (weights, labels):
            if column is not None and len(column) != len(values):
                raise ValueError("outcome columns differ in length")
        return cls(obj["statistic"], values, weights, labels)

    def taking_part(self) -> list[int]:
        """Indices of the records with a value."""
        return [i for i, v in enumerate(self.values) if v is not None]

    def estimator(self, keep: Sequence[int]) -> Callable[[np.ndarray], np.ndarray]:
        """The statistic over records `keep`, as a function of resampling weights [rows, len(keep)] (how often each
        record is drawn; all ones: the statistic itself)."""
        v = np.array([self.values[i] for i in keep], dtype=np.float64)
        if self.statistic in (PROPORTION, MEAN):
            return lambda w: (w @ v) / w.sum(axis=1)
        if self.statistic == PERPLEXITY:
            tokens = np.array([self.weights[i] for i in keep], dtype=np.float64)  # type: ignore[index]
            return lambda w: np.exp((w @ (v * tokens)) / (w @ tokens))
        gold = np.array([self.labels[i] for i in keep])  # type: ignore[index]
        return _weighted_f1_estimator(gold, v.astype(np.int64))

    def estimate(self) -> float:
        keep = self.taking_part()
        return float(self.estimator(keep)(np.ones((1, len(keep))))[0]) if keep else math.nan

    def interval(self) -> tuple[float, float] | None:
        """The 95 % interval of the statistic (Wilson or bootstrap, see the module docstring); None when no record
        takes part or the statistic is not finite."""
        keep = self.taking_part()
        if not keep or not math.isfinite(self.estimate()):
            return None
        if self.statistic == PROPORTION:
            return wilson(sum(self.values[i] for i in keep), len(keep))  # type: ignore[misc]
        draws = bootstrap(self.estimator(keep), len(keep))
        return _percentiles(draws)

    @property
    def method(self) -> str:
        return "wilson" if self.statistic == PROPORTION else "bootstrap"


def _weighted_f1_estimator(gold: np.ndarray, pred: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """scikit-learn's weighted F1 (`metrics.weighted_f1`) under resampling weights: per class, weighted counts of
    true positives, false positives and false negatives."""
    classes = np.unique(gold)

    def f1(w: np.ndarray) -> np.ndarray:
        total = w.sum(axis=1)
        score = np.zeros(len(w))
        for c in classes:
            tp = w @ ((gold == c) & (pred == c))
            fp = w @ ((gold != c) & (pred == c))
            fn = w @ ((gold == c) & (pred != c))
            denominator = 2 * tp + fp + fn
            per_class = np.divide(2 * tp, denominator, out=np.zeros_like(tp, dtype=np.float64), where=denominator > 0)
            score += per_class * (w @ (gold == c)) / total
        return score

    return f1


def wilson(successes: float, n: int, z: float = Z) -> tuple[float, float]:
    """The Wilson score interval of `successes` out of `n` (no continuity correction)."""
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap(estimator: Callable[[np.ndarray], np.ndarray], n: int, resamples: int = RESAMPLES,
              seed: int = SEED) -> np.ndarray:
    """The estimator on `resamples` resamples (with replacement) of n records, from a seeded generator."""
    rng = np.random.default_rng(seed)
    rows = max(1, _CELLS_PER_CHUNK // n)
    out = []
    for start in range(0, resamples, rows):
        m = min(rows, resamples - start)
        cells = (rng.integers(0, n, size=(m, n)) + n * np.arange(m)[:, None]).ravel()
        out.append(estimator(np.bincount(cells, minlength=m * n).reshape(m, n).astype(np.float64)))
    return np.concatenate(out)


def _percentiles(draws: np.ndarray) -> tuple[float, float]:
    tail = (1 - LEVEL) / 2 * 100
    lo, hi = np.percentile(draws, [tail, 100 - tail])
    return float(lo), float(hi)


def mcnemar(b: int, c: int) -> tuple[float, str]:
    """Two-sided p-value of McNemar's test for discordant counts b and c, and the test used (see the module
    docstring): `exact` (binomial, b + c < EXACT_BELOW) or `chi2-cc` (chi-square with continuity correction)."""
    n = b + c
    if n == 0:
        return 1.0, "exact"
    if n < EXACT_BELOW:
        tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n
        return min(1.0, 2 * tail), "exact"
    chi2 = (abs(b - c) - 1) ** 2 / n
    return math.erfc(math.sqrt(chi2 / 2)), "chi2-cc"


@dataclass(frozen=True)
class PairedDifference:
    """Run B minus run A on the records both scored; `interval` for bootstraps, `discordant` (b, c) for McNemar."""

    n: int
    difference: float
    p: float
    test: str  # "mcnemar-exact", "mcnemar-chi2-cc" or "paired-bootstrap"
    interval: tuple[float, float] | None = None
    discordant: tuple[int, int] | None = None

    @property
    def within_noise(self) -> bool:
        if self.interval is not None:
            return self.interval[0] <= 0.0 <= self.interval[1]
        return self.p >= 1 - LEVEL

    def to_json(self) -> dict[str, Any]:
        return {"n": self.n, "difference": self.difference, "p": self.p, "test": self.test,
                "interval": list(self.interval) if self.interval else None,
                "discordant": list(self.discordant) if self.discordant else None, "within_noise": self.within_noise}


def paired_difference(a: Outcomes, b: Outcomes) -> PairedDifference | None:
    """B's statistic minus A's over the records both have a value for (the same records, in the same order: the
    caller checks that); None when they share no record or differ in statistic."""
    if a.statistic != b.statistic or len(a.values) != len(b.values):
        return None
    keep = [i for i in range(len(a.values)) if a.values[i] is not None and b.values[i] is not None]
    if not keep:
        return None
    if a.statistic == PROPORTION:
        a_only = sum(1 for i in keep if a.values[i] == 1.0 and b.values[i] == 0.0)
        b_only = sum(1 for i in keep if a.values[i] == 0.0 and b.values[i] == 1.0)
        p, test = mcnemar(a_only, b_only)
        return PairedDifference(len(keep), (b_only - a_only) / len(keep), p, f"mcnemar-{test}",
                                discordant=(a_only, b_only))
    est_a, est_b = a.estimator(keep), b.estimator(keep)
    ones = np.ones((1, len(keep)))
    difference = float(est_b(ones)[0] - est_a(ones)[0])
    if not math.isfinite(difference):
        return None
    draws = bootstrap(lambda w: est_b(w) - est_a(w), len(keep))
    p = min(1.0, max(1 / RESAMPLES, 2 * min(float(np.mean(draws <= 0)), float(np.mean(draws >= 0)))))
    return PairedDifference(len(keep), difference, p, "paired-bootstrap", _percentiles(draws))
