"""Did an edit take? The check `edit` runs on the edit prompt after every request (MEMIT: after every batch).

An editor can finish without error and still leave the model saying the old fact (or nothing sensible): a value
optimisation that made no progress, an update that did not reach its target, a too-strong regulariser. So each edit
is judged on the model as edited, by the quantity `prunecli evaluate` uses for efficacy (ROME protocol), the mean
token probability P = exp(-mean token NLL) of a target after the edit prompt:

- with a true object (CounterFact `ground_truth`, zsRE `answers`): the edit took when P(new) > P(true);
- without one (minimal records): when P(new) >= MIN_PROB_WITHOUT_TRUE.

That is the fast check (`TEACHER_FORCED`, one scoring pass). Teacher forcing flatters edits: a model can prefer the
new object when handed its tokens and still write something else. `GENERATION` (`edit --check generation`) decodes
greedily from the edit prompt and applies the rule `evaluate`'s generation protocol uses (`models.recall`): the edit
took when the normalised continuation starts with the normalised new object. The probabilities are reported either
way. A non-finite score or continuation (a collapsed model) never counts as taken.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from prunecli.models.generation import greedy_generate
from prunecli.models.recall import answer_budgets, recalled_by
from prunecli.models.scoring import score_targets
from prunecli.requests import EditRequest

MIN_PROB_WITHOUT_TRUE = 0.1  # mean token probability of the new target, for requests that name no true object
TEACHER_FORCED = "teacher-forced"
GENERATION = "generation"
CHECKS = (TEACHER_FORCED, GENERATION)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class EditCheck:
    """The new and (where known) true target's mean token probability on the edit prompt, and the verdict."""

    sequence_prob_new: float  # probability of the whole new target sequence (the product over its tokens)
    prob_new: float
    prob_true: float | None
    took: bool
    generated: str | None = None  # the greedy continuation of the edit prompt (generation check only)


def _mean_token_prob(nll: float) -> float:
    return math.exp(-nll) if math.isfinite(nll) else float("nan")


def check_edits(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, requests: Sequence[EditRequest],
                check: str = TEACHER_FORCED) -> list[EditCheck]:
    """Judge each request on the current model by `check` (see the module docstring for the rules)."""
    if check not in CHECKS:
        raise ValueError(f"unknown edit check {check!r}; known: {', '.join(CHECKS)}")
    with_true = [i for i, r in enumerate(requests) if r.target_true]
    # One scoring pass for the new targets and the true ones (they share their prompts' forward pass).
    scored = score_targets(model, tokenizer, [r.text for r in requests] + [requests[i].text for i in with_true],
                           [r.target_new for r in requests] + [requests[i].target_true for i in with_true])  # type: ignore[misc]
    new = [_mean_token_prob(s.nll) for s in scored[:len(requests)]]
    true = {i: _mean_token_prob(s.nll) for i, s in zip(with_true, scored[len(requests):])}
    checks = []
    for i, p_new in enumerate(new):
        p_true = true.get(i)
        if not math.isfinite(p_new) or (p_true is not None and not math.isfinite(p_true)):
            took = False
        elif p_true is not None:
            took = p_new > p_true
        else:
            took = p_new >= MIN_PROB_WITHOUT_TRUE
        checks.append(EditCheck(math.exp(sum(scored[i].token_logprobs)), p_new, p_true, took))
    return _by_generation(model, tokenizer, requests, checks) if check == GENERATION else checks


def _by_generation(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, requests: Sequence[EditRequest],
                   checks: list[EditCheck]) -> list[EditCheck]:
    """The checks with their verdicts replaced by the generation rule's, and the continuations attached."""
    budgets = answer_budgets(tokenizer, [(r.text, r.target_new) for r in requests])
    said = dict(zip(budgets, greedy_generate(model, tokenizer, list(budgets), list(budgets.values()))))
    return [replace(c, took=recalled_by(said[r.text], r.target_new) is True, generated=said[r.text].text)
            for r, c in zip(requests, checks)]
