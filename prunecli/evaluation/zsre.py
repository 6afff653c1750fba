"""zsRE editing metrics: token-level teacher-forced accuracy, and locality measured two named ways.

- zsre_edit_acc / zsre_rephrase_acc: share of target_new tokens that are the top-1 prediction after the edit prompt /
  each rephrase (teacher forced), mean over a case's prompts, then over cases (EasyEdit / MEND).
- zsre_locality_agreement: on each locality prompt + its answer tokens, the share of positions where the evaluated
  model's top-1 token equals the *reference* (unedited) model's top-1 token (EasyEdit's definition). The reference
  predictions are computed before any delta is added (see `reference_scores`).
- zsre_locality_gold_acc: token accuracy against the gold locality answer (ROME's definition).
NaN/Inf scores count as failures and are counted in n_nonfinite.

The generation protocol (`GENERATION`, task `zsre-gen`, `evaluation.edit_generation`) decodes greedily instead: the
continuation of the edit prompt / rephrases must start with target_new, a locality prompt's with its gold answer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from prunecli.distributed import SINGLE, Workers
from prunecli.errors import PruneCliError
from prunecli.evaluation.base import MetricGroup, request_records
from prunecli.evaluation.edit_generation import Answers, GenerationSpec
from prunecli.evaluation.metrics import Judgement, case_means
from prunecli.models.scoring import TargetScore, score_targets
from prunecli.progress import Advance
from prunecli.requests import EditRequest

GROUP = "zsre"


def protocol_text(reference_name: str) -> str:
    return ("zsRE, token-level teacher-forced top-1 accuracy: zsre_edit_acc / zsre_rephrase_acc = share of target_new "
            "tokens predicted after the edit prompt / rephrases; zsre_locality_agreement = share of locality-answer "
            f"positions where the top-1 token equals the reference model's ({reference_name}, EasyEdit's definition); "
            "zsre_locality_gold_acc = token accuracy on the gold locality answer (ROME's definition). Mean over a "
            "case's prompts, then over cases; NaN/Inf counts as failure (n_nonfinite). Sequential: final model.")


def expected_answers(req: EditRequest) -> Answers:
    """Per prompt kind: (prompt, what the model should say)."""
    return {"edit": [(req.text, req.target_new)], "rephrase": [(p, req.target_new) for p in req.rephrase_prompts],
            "locality": list(zip(req.locality_prompts, req.locality_answers))}


GENERATION = GenerationSpec(
    "zsre_generation", "zsRE",
    {"edit": "zsre_edit_gen", "rephrase": "zsre_rephrase_gen", "locality": "zsre_locality_gen"}, expected_answers,
    "zsre_edit_gen / zsre_rephrase_gen: the answer is target_new, after the edit prompt / each rephrase; "
    "zsre_locality_gen: the locality prompt's gold answer.")


def _locality_pairs(requests: Sequence[EditRequest]) -> list[list[tuple[str, str]]]:
    return [list(zip(r.locality_prompts, r.locality_answers)) for r in requests]


def locality_pairs(requests: Sequence[EditRequest]) -> list[tuple[str, str]]:
    """Every distinct (locality prompt, answer) pair of the requests, in first-use order."""
    return list(dict.fromkeys(pair for pairs in _locality_pairs(requests) for pair in pairs))


def score_pairs(model: Any, tokenizer: Any, pairs: Sequence[tuple[str, str]], batch_size: int = 16,
                on_batch: Advance | None = None, workers: Workers = SINGLE) -> dict[tuple[str, str], TargetScore]:
    """Teacher-forced scores of (prompt, answer) pairs, each process scoring its share."""
    return dict(zip(pairs, workers.map(lambda part: score_targets(model, tokenizer, [p for p, _ in part],
                                                                  [a for _, a in part], batch_size, on_batch), pairs)))


def reference_scores(model: Any, tokenizer: Any, requests: Sequence[EditRequest], batch_size: int = 16,
                     on_batch: Advance | None = None, workers: Workers = SINGLE,
                     known: Mapping[tuple[str, str], TargetScore] | None = None) -> list[list[TargetScore]]:
    """Teacher-forced scores of every locality answer (per request, per prompt) under the reference model; pairs in
    `known` (a cache's, `reference_cache`) are taken from it, the model is run only for the others."""
    scores = dict(known or {})
    missing = [pair for pair in locality_pairs(requests) if pair not in scores]
    if missing:
        scores.update(score_pairs(model, tokenizer, missing, batch_size, on_batch, workers))
    return [[scores[pair] for pair in pairs] for pairs in _locality_pairs(requests)]


def _agreement(edited: TargetScore, ref: TargetScore) -> Judgement:
    if len(edited.token_argmax) != len(ref.token_argmax):
        raise PruneCliError("the locality reference tokenizes the locality answers differently from the evaluated "
                            "model; use a reference with the same tokenizer")
    if not (edited.finite and ref.finite):
        return None
    same = sum(a == b for a, b in zip(edited.token_argmax, ref.token_argmax))
    return same / len(ref.token_argmax)


def _accuracy(score: TargetScore) -> Judgement:
    return score.token_accuracy if score.finite else None


def zsre_metrics(requests: Sequence[EditRequest], scores: dict[tuple[str, str], TargetScore],
                 reference: Sequence[Sequence[TargetScore]], reference_name: str) -> MetricGroup:
    """The four zsRE metrics from the evaluated model's scores and the reference's locality scores."""
    if len(reference) != len(requests):
        raise ValueError("one list of reference scores per request is needed")
    edit, rephrase, agree, gold = [], [], [], []
    for req, refs in zip(requests, reference):
        edit.append([_accuracy(scores[(req.text, req.target_new)])])
        rephrase.append([_accuracy(scores[(p, req.target_new)]) for p in req.rephrase_prompts])
        loc = [scores[pair] for pair in zip(req.locality_prompts, req.locality_answers)]
        agree.append([_agreement(s, r) for s, r in zip(loc, refs)])
        gold.append([_accuracy(s) for s in loc])
    metrics = {name: case_means(cases, 0.0) for name, cases in [
        ("zsre_edit_acc", edit), ("zsre_rephrase_acc", rephrase), ("zsre_locality_agreement", agree),
        ("zsre_locality_gold_acc", gold)]}
    return MetricGroup(GROUP, protocol_text(reference_name), {k: v for k, v in metrics.items() if v.n},
                       request_records(requests))


def needed_pairs(requests: Sequence[EditRequest]) -> list[tuple[str, str]]:
    """Every distinct (prompt, target) pair the metrics read, in first-use order."""
    pairs: dict[tuple[str, str], None] = {}
    for req in requests:
        pairs[(req.text, req.target_new)] = None
        pairs.update({(p, req.target_new): None for p in req.rephrase_prompts})
        pairs.update({pair: None for pair in zip(req.locality_prompts, req.locality_answers)})
    return list(pairs)


def evaluate_zsre(model: Any, tokenizer: Any, requests: Sequence[EditRequest],
                  reference: Sequence[Sequence[TargetScore]], reference_name: str, batch_size: int = 16,
                  on_batch: Advance | None = None, workers: Workers = SINGLE) -> list[MetricGroup]:
    """Score the edit, rephrase and locality pairs of every request in one batched pass (each process its share),
    then judge."""
    keys = needed_pairs(requests)
    results = workers.map(lambda part: score_targets(model, tokenizer, [p for p, _ in part], [t for _, t in part],
                                                     batch_size, on_batch), keys)
    return [zsre_metrics(requests, dict(zip(keys, results)), reference, reference_name)]
