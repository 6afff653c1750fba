"""Does the model *say* the answer? The generation rule that `evaluate`'s generation protocol and
`edit --check generation` share (one rule, one place: editors and evaluation both import it from here).

Teacher forcing asks whether the model prefers the new object when it is handed the object's tokens; an edit can win
that comparison while greedy decoding still writes the old object or something else. The generation rule reads what
the model writes on its own:

- budget: greedy decoding of the answer's token count (tokenised as `models.tokens.encode_pair` does) plus
  `ANSWER_MARGIN` new tokens, so a different tokenisation of the same words, a leading quote or article still fits;
- normalisation (`normalize`), of the continuation and of the answer: lowercase, every character other than a
  letter or digit read as a space, the articles a/an/the dropped, whitespace squeezed. This is SQuAD's answer
  normalisation except that punctuation separates words instead of vanishing: "Milan's" and "Fiat-built" then say
  Milan and Fiat (SQuAD's "milans" and "fiatbuilt" would not), and curly quotes or dashes count as punctuation too;
- recalled: the normalised continuation's words *start with* the normalised answer's words. Word boundaries count
  ("Paris" is not recalled by "Parisian ..."), later words do not ("Paris, the capital" recalls "Paris"). An answer
  that normalises to nothing (only punctuation or articles) is never recalled, and a continuation decoded from
  NaN/Inf logits is no verdict at all (`recalled_by` gives None; callers count it as a failure).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from prunecli.models.generation import Generation
from prunecli.models.tokens import encode_pair

ANSWER_MARGIN = 4
"""New tokens allowed beyond the answer's own token count."""

_SEPARATORS = re.compile(r"[\W_]+")  # anything but letters and digits (Unicode-aware)
_ARTICLES = {"a", "an", "the"}


def normalize(text: str) -> list[str]:
    """The words of `text` as the rule compares them (see the module docstring)."""
    return [w for w in _SEPARATORS.sub(" ", text.lower()).split() if w not in _ARTICLES]


def recalled(continuation: str, answer: str) -> bool:
    """Whether the normalised continuation starts with the normalised answer, word for word."""
    want = normalize(answer)
    return bool(want) and normalize(continuation)[:len(want)] == want


def recalled_by(generation: Generation, answer: str) -> bool | None:
    """`recalled` for a decoded continuation; None when its logits were not finite (its text means nothing)."""
    return recalled(generation.text, answer) if generation.finite else None


def answer_budgets(tokenizer: Any, pairs: Sequence[tuple[str, str]]) -> dict[str, int]:
    """New tokens to decode per distinct prompt of (prompt, answer) pairs: the longest of its answers' token counts
    plus `ANSWER_MARGIN`. A prompt is decoded once whatever number of answers it is judged against."""
    budgets: dict[str, int] = {}
    for prompt, answer in pairs:
        need = len(encode_pair(tokenizer, prompt, answer)[1]) + ANSWER_MARGIN
        budgets[prompt] = max(budgets.get(prompt, 0), need)
    return budgets
