"""CounterFact editing metrics: ROME's probability protocol, the argmax protocol of PRUNE's main text, and the
generation protocol (`GENERATION`, task `counterfact-gen`: what greedy decoding writes, `evaluation.edit_generation`).

Every (prompt, target) pair of every request is scored in one batched teacher-forced pass; the judgements follow
ROME's definitions:
- efficacy / paraphrase: the edit prompt / each rephrase prompt; success when P(target_new) > P(target_true),
  P = exp(-mean token NLL); magnitude = P(new) - P(true).
- neighborhood: each locality prompt (another subject with the same relation and true object); success when
  P(true) > P(new), true = that prompt's ground truth (the request's target_true when the file gives none);
  magnitude = P(true) - P(new).
- argmax variants: every target token is the top-1 prediction (efficacy/paraphrase: target_new; neighborhood:
  the ground truth).
Sequential protocol: the model handed in already carries every delta, so each edit is judged on the final model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from prunecli.distributed import SINGLE, Workers
from prunecli.evaluation.base import MetricGroup, request_records
from prunecli.evaluation.edit_generation import Answers, GenerationSpec
from prunecli.evaluation.metrics import Judgement, MetricValue, case_means, flag, lower, prob_gap
from prunecli.models.scoring import TargetScore, score_targets
from prunecli.progress import Advance
from prunecli.requests import EditRequest

GROUP_PROB = "counterfact_rome"
GROUP_ARGMAX = "counterfact_argmax"
PROTOCOL_PROB = (
    "CounterFact, ROME protocol: teacher-forced mean token NLL of target_new and target_true after each prompt, "
    "P = exp(-NLL). *_score: share of prompts with P(new) > P(true) (neighborhood: P(true) > P(new), true = the "
    "neighborhood prompt's ground truth); *_magnitude: mean P(new) - P(true) (neighborhood: P(true) - P(new)). "
    "Mean over each case's prompts, then over cases. NaN/Inf prompts count as failures in scores and are left out "
    "of magnitudes; both count them in n_nonfinite. Sequential: every edit judged on the final model (all deltas).")
PROTOCOL_ARGMAX = (
    "CounterFact, argmax protocol (PRUNE main text): a prompt succeeds when every target token is the model's top-1 "
    "prediction under teacher forcing (efficacy/paraphrase: target_new; neighborhood: the ground truth). Mean over "
    "each case's prompts, then over cases; NaN/Inf counts as failure (n_nonfinite). Sequential: final model.")

_KINDS = ("efficacy", "paraphrase", "neighborhood")


def _pairs_of(req: EditRequest) -> dict[str, list[tuple[str, str, str | None]]]:
    """Per prompt kind: (prompt, the target that should win, the target that should lose or None)."""
    new, true = req.target_new, req.target_true
    loc_truths = [req.locality_answers[i] if i < len(req.locality_answers) else true
                  for i in range(len(req.locality_prompts))]
    return {
        "efficacy": [(req.text, new, true)],
        "paraphrase": [(p, new, true) for p in req.rephrase_prompts],
        "neighborhood": [(p, t, new) for p, t in zip(req.locality_prompts, loc_truths) if t is not None],
    }


def expected_answers(req: EditRequest) -> Answers:
    """Per prompt kind: (prompt, what the model should say): the new object after edit and rephrase prompts, the
    neighborhood prompt's true object after it."""
    return {kind: [(prompt, win) for prompt, win, _ in pairs] for kind, pairs in _pairs_of(req).items()}


GENERATION = GenerationSpec(
    "counterfact_generation", "CounterFact", {kind: f"{kind}_gen" for kind in _KINDS}, expected_answers,
    "efficacy_gen / paraphrase_gen: the answer is target_new, after the edit prompt / each rephrase; neighborhood_gen: "
    "the neighborhood prompt's ground truth (the model still says the true object).")


def _judge(win: TargetScore, lose: TargetScore | None) -> tuple[Judgement, Judgement, Judgement]:
    """(score, magnitude, argmax) judgements of one prompt; the first two need the losing target."""
    acc = flag(win.all_correct, *win.token_logprobs)
    if lose is None:
        return None, None, acc
    return lower(win.nll, lose.nll), prob_gap(win.nll, lose.nll), acc


def counterfact_metrics(requests: Sequence[EditRequest], scores: dict[tuple[str, str], TargetScore]
                        ) -> list[MetricGroup]:
    """The nine CounterFact metrics from the scores of every (prompt, target) pair the requests need."""
    per_metric: dict[str, list[list[Judgement]]] = {}
    for req in requests:
        for kind, pairs in _pairs_of(req).items():
            cells: dict[str, list[Judgement]] = {f"{kind}_score": [], f"{kind}_magnitude": [], f"{kind}_acc": []}
            for prompt, win, lose in pairs:
                s, m, a = _judge(scores[(prompt, win)], scores[(prompt, lose)] if lose is not None else None)
                cells[f"{kind}_acc"].append(a)
                if lose is not None:
                    cells[f"{kind}_score"].append(s)
                    cells[f"{kind}_magnitude"].append(m)
            for name, judgements in cells.items():
                per_metric.setdefault(name, []).append(judgements)

    def agg(suffix: str, nonfinite_as: float | None, flags: bool) -> dict[str, MetricValue]:
        out = {}
        for kind in _KINDS:
            value = case_means(per_metric.get(f"{kind}_{suffix}", []), nonfinite_as, flags)
            if value.n:
                out[f"{kind}_{suffix}"] = value
        return out

    prob = {**agg("score", 0.0, True), **agg("magnitude", None, False)}
    argmax = agg("acc", 0.0, True)
    records = request_records(requests)
    return [g for g in (MetricGroup(GROUP_PROB, PROTOCOL_PROB, prob, records),
                        MetricGroup(GROUP_ARGMAX, PROTOCOL_ARGMAX, argmax, records)) if g.metrics]


def fewer_scored(n: dict[str, int]) -> str | None:
    """Why a report's *_score metrics count fewer records than its *_acc ones (None when they do not): the score
    compares P(new) with P(true), and a record without a true object (the minimal format) has nothing to compare."""
    short = [name for name in n if name.endswith("_score") and n[name] < n.get(name.removesuffix("score") + "acc", 0)]
    if not short:
        return None
    first, acc = short[0], short[0].removesuffix("score") + "acc"
    return (f"{', '.join(short)}: n counts only the records with a true object (target_true / ground_truth) to compare "
            f"the new one with ({first} n={n[first]}, {acc} n={n[acc]}); records without one (the minimal format) are "
            "judged by the *_acc metrics only")


def needed_pairs(requests: Sequence[EditRequest]) -> list[tuple[str, str]]:
    """Every distinct (prompt, target) pair the metrics read, in first-use order."""
    seen: dict[tuple[str, str], None] = {}
    for req in requests:
        for pairs in _pairs_of(req).values():
            for prompt, win, lose in pairs:
                seen[(prompt, win)] = None
                if lose is not None:
                    seen[(prompt, lose)] = None
    return list(seen)


def evaluate_counterfact(model: Any, tokenizer: Any, requests: Sequence[EditRequest], batch_size: int = 16,
                         on_batch: Advance | None = None, workers: Workers = SINGLE) -> list[MetricGroup]:
    """Score every pair in batches (each process its share), then judge (see the module docstring)."""
    pairs = needed_pairs(requests)
    results = workers.map(lambda part: score_targets(model, tokenizer, [p for p, _ in part], [t for _, t in part],
                                                     batch_size, on_batch), pairs)
    return counterfact_metrics(requests, dict(zip(pairs, results)))
