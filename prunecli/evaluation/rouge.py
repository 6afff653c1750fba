"""ROUGE-1, ROUGE-2 and ROUGE-L F1, implemented here (no extra dependency) with a stated tokenisation.

Tokenisation: lowercase, then maximal runs of ASCII letters and digits are the tokens (everything else separates
them); no stemming and no stop-word removal. This matches the default tokenizer of Google's `rouge-score` package
without its optional Porter stemmer. ROUGE-N F1 uses clipped n-gram overlap counts; ROUGE-L F1 uses the longest
common subsequence of the two token lists (sentence-level, not the summary-level "Lsum"). An empty candidate or
reference scores 0.
"""

from __future__ import annotations

import re
from collections import Counter

_TOKEN = re.compile(r"[a-z0-9]+")


def tokenize(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def _f1(overlap: int, n_candidate: int, n_reference: int) -> float:
    if overlap == 0 or n_candidate == 0 or n_reference == 0:
        return 0.0
    precision, recall = overlap / n_candidate, overlap / n_reference
    return 2 * precision * recall / (precision + recall)


def rouge_n(candidate: list[str], reference: list[str], n: int) -> float:
    cand = Counter(tuple(candidate[i:i + n]) for i in range(len(candidate) - n + 1))
    ref = Counter(tuple(reference[i:i + n]) for i in range(len(reference) - n + 1))
    return _f1(sum((cand & ref).values()), sum(cand.values()), sum(ref.values()))


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, one row at a time)."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(candidate: list[str], reference: list[str]) -> float:
    return _f1(lcs_length(candidate, reference), len(candidate), len(reference))


def rouge_scores(candidate: str, reference: str) -> dict[str, float]:
    """{"rouge1", "rouge2", "rougeL"} F1 of a candidate summary against one reference."""
    c, r = tokenize(candidate), tokenize(reference)
    return {"rouge1": rouge_n(c, r, 1), "rouge2": rouge_n(c, r, 2), "rougeL": rouge_l(c, r)}
