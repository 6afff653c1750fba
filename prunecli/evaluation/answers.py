"""Answer extraction and matching for the generative general-ability tasks (pure string functions).

- `normalize_answer`: the SQuAD normalisation (lowercase, drop punctuation and the articles a/an/the, squeeze
  whitespace) used for open-domain QA exact match.
- `span_match`: PRUNE's NQ criterion: a normalised gold answer equals some contiguous word span of the normalised
  generation (a short model answer followed by more text still counts).
- `first_number`: the answer-cleansing step of zero-shot chain of thought (Kojima et al.): the first number in the
  text after the answer trigger, commas removed.
- `nli_verdict`: "true"/"false" read from an RTE completion.
"""

from __future__ import annotations

import re
import string

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def normalize_answer(text: str) -> str:
    text = text.lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def span_match(prediction: str, golds: list[str]) -> bool:
    words = normalize_answer(prediction).split()
    for gold in golds:
        target = normalize_answer(gold).split()
        if target and any(words[i:i + len(target)] == target for i in range(len(words) - len(target) + 1)):
            return True
    return False


def parse_number(text: str) -> float | None:
    """A number written with optional thousands separators ("1,000", "-3.5"), or None."""
    try:
        return float(text.replace(",", "").strip())
    except ValueError:
        return None


def first_number(text: str) -> float | None:
    match = _NUMBER.search(text)
    return parse_number(match.group(0)) if match else None


def nli_verdict(text: str) -> bool | None:
    """True for an answer saying "true", False for "false" (whichever comes first), None when neither appears."""
    lowered = text.lower()
    hits = [(lowered.find(word), value) for word, value in (("true", True), ("false", False)) if word in lowered]
    return min(hits)[1] if hits else None
