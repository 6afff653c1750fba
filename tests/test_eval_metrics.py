"""Metric arithmetic against hand-built logits: a bigram "model" whose next-token distributions are chosen so every
metric has an exact fractional value; NaN rows check that broken cases are counted, never dropped."""

from __future__ import annotations

import math
from fractions import Fraction as F
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from prunecli.errors import PruneCliError
from prunecli.evaluation.base import EvalContext, EvalOptions
from prunecli.evaluation.choice import TASKS as CHOICE_TASKS
from prunecli.evaluation.choice import run_choice
from prunecli.evaluation.counterfact import evaluate_counterfact
from prunecli.evaluation.metrics import MetricValue, case_means, lower, prob_gap, weighted_f1
from prunecli.evaluation.perplexity import evaluate_perplexity, sliding_windows
from prunecli.evaluation.uncertainty import MEAN, PROPORTION, Outcomes
from prunecli.evaluation.zsre import evaluate_zsre, reference_scores
from prunecli.models.generation import greedy_generate
from prunecli.models.scoring import score_targets
from prunecli.requests import EditRequest

WORDS = ["<s>", "<unk>", "N", "T", "M", "U", "X", "V", "s", "s2", "o", "o2", "p1", "p2", "r1", "r2", "r3", "l1", "l2",
         "l3", "bad", "a", "b", ":", "positive", "negative"]
ID = {w: i for i, w in enumerate(WORDS)}


class WordTokenizer:
    """Whitespace tokenizer over WORDS (unknown words -> <unk>); BOS added like LLaMA's."""

    pad_token_id = 0
    eos_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids = [ID.get(w, ID["<unk>"]) for w in text.split()]
        return {"input_ids": ([ID["<s>"]] if add_special_tokens else []) + ids}

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return " ".join(WORDS[i] for i in ids)


class StatelessCache:
    """A bigram needs no history: its "cache" only has to survive the batch reordering done for shared prompts."""

    def reorder_cache(self, index: torch.Tensor) -> None:
        pass


class Bigram(torch.nn.Module):
    """logits[t] = log P(next | token t): the next-token distribution depends only on the current token."""

    def __init__(self, rows: dict[str, dict[str, float]]) -> None:
        super().__init__()
        table = torch.empty(len(WORDS), len(WORDS), dtype=torch.float64)
        for i, w in enumerate(WORDS):
            table[i] = torch.log(torch.tensor(_distribution(rows.get(w, {}))))
        self.table = torch.nn.Parameter(table.float(), requires_grad=False)
        self.config = SimpleNamespace(max_position_embeddings=64)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: object = None, use_cache: bool = False,
                logits_to_keep: int = 0) -> SimpleNamespace:
        logits = self.table[input_ids]
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits,
                               cache=StatelessCache())


def _distribution(spec: dict[str, float]) -> list[float]:
    """Given probabilities for some words; the rest of the mass spread evenly over the other words."""
    if spec == {"*": math.nan}:
        return [math.nan] * len(WORDS)
    rest = (1.0 - sum(spec.values())) / (len(WORDS) - len(spec))
    return [spec.get(w, rest) for w in WORDS]


ROWS = {
    "p1": {"N": 1 / 2, "T": 1 / 4}, "r1": {"N": 1 / 8, "T": 1 / 2}, "r2": {"N": 1 / 2, "T": 1 / 8},
    "l1": {"T": 1 / 2, "N": 1 / 4}, "p2": {"N": 1 / 4, "T": 1 / 2}, "r3": {"N": 1 / 16, "T": 1 / 2},
    "l2": {"T": 1 / 4, "N": 1 / 2}, "l3": {"T": 1 / 2, "N": 1 / 8}, "N": {"M": 1 / 8, "X": 1 / 2},
    "bad": {"*": math.nan},
}


def _requests() -> list[EditRequest]:
    return [
        EditRequest(0, "{} p1", "s", "N", "T", ["s r1", "s r2"], ["o l1"], ["T"], source_format="counterfact"),
        EditRequest(1, "{} p2", "s2", "N", "T", ["s2 r3"], ["o2 l2", "o2 l3"], ["T", "T"],
                    source_format="counterfact"),
    ]


def _metrics(groups: list) -> dict[str, MetricValue]:
    return {k: v for g in groups for k, v in g.metrics.items()}


def test_counterfact_metrics_exact_fractions() -> None:
    m = _metrics(evaluate_counterfact(Bigram(ROWS), WordTokenizer(), _requests(), batch_size=3))
    expected = {
        "efficacy_score": F(1, 2), "paraphrase_score": F(1, 4), "neighborhood_score": F(3, 4),
        "efficacy_magnitude": F(0), "paraphrase_magnitude": F(-7, 32), "neighborhood_magnitude": F(5, 32),
        "efficacy_acc": F(1, 2), "paraphrase_acc": F(1, 4), "neighborhood_acc": F(3, 4),
    }
    assert set(m) == set(expected)
    for name, value in expected.items():
        assert m[name].value == pytest.approx(float(value), abs=1e-6), name
        assert (m[name].n, m[name].n_nonfinite) == (2, 0)


def test_counterfact_protocol_groups_are_named() -> None:
    groups = evaluate_counterfact(Bigram(ROWS), WordTokenizer(), _requests())
    assert [g.name for g in groups] == ["counterfact_rome", "counterfact_argmax"]
    assert "P(new) > P(true)" in groups[0].protocol and "top-1" in groups[1].protocol


def test_mean_token_nll_of_a_multi_token_target() -> None:
    (score,) = score_targets(Bigram(ROWS), WordTokenizer(), ["s p1"], ["N M"])
    assert score.nll == pytest.approx(2 * math.log(2), abs=1e-6)  # (ln 2 + ln 8) / 2
    assert score.token_correct == [True, False] and not score.all_correct  # after N the argmax is X, not M
    assert score.token_argmax == [ID["N"], ID["X"]]


def test_minimal_requests_without_true_target_get_argmax_metrics_only() -> None:
    req = EditRequest(0, "{} p1", "s", "N")
    m = _metrics(evaluate_counterfact(Bigram(ROWS), WordTokenizer(), [req]))
    assert set(m) == {"efficacy_acc"} and m["efficacy_acc"].value == 1.0


def test_nonfinite_cases_are_counted_not_dropped() -> None:
    broken = EditRequest(2, "{} bad", "s", "N", "T", source_format="counterfact")
    m = _metrics(evaluate_counterfact(Bigram(ROWS), WordTokenizer(), [*_requests(), broken]))
    # Scores: the NaN case counts as a failure in the denominator (3 cases), and is reported.
    # Per case: the broken one is a failure (0.0) in its outcomes too, one judgement per case: a proportion.
    flags = Outcomes(PROPORTION, [1.0, 0.0, 0.0])
    assert m["efficacy_score"] == MetricValue(pytest.approx(1 / 3), 3, 1, flags)
    assert m["efficacy_acc"] == MetricValue(pytest.approx(1 / 3), 3, 1, flags)
    # Magnitudes cannot use a NaN probability: averaged over the finite cases, still counted in n and n_nonfinite.
    assert m["efficacy_magnitude"].value == pytest.approx(0.0, abs=1e-6)
    assert (m["efficacy_magnitude"].n, m["efficacy_magnitude"].n_nonfinite) == (3, 1)
    assert m["efficacy_magnitude"].outcomes.statistic == MEAN and m["efficacy_magnitude"].outcomes.values[2] is None
    # Cases without paraphrases do not take part in paraphrase metrics (None in the outcomes, in record order).
    assert (m["paraphrase_score"].n, m["paraphrase_score"].n_nonfinite) == (2, 0)
    assert m["paraphrase_score"].outcomes.values[2] is None


def test_nan_scores_are_never_argmax_correct() -> None:
    (score,) = score_targets(Bigram(ROWS), WordTokenizer(), ["s bad"], ["<s>"])  # argmax of a NaN row is index 0
    assert not score.finite and score.token_correct == [False]


def test_case_means_and_helpers() -> None:
    assert case_means([[1.0, 0.0], [None], []], 0.0) == MetricValue(0.25, 2, 1, Outcomes(MEAN, [0.5, 0.0, None]))
    assert case_means([[1.0, None], [None]], None) == MetricValue(1.0, 2, 2, Outcomes(MEAN, [1.0, None]))
    assert math.isnan(case_means([[None]], None).value)
    # Success flags, one per case: a proportion; two prompts in a case make its outcome a share, hence a mean.
    assert case_means([[1.0], [], [0.0]], 0.0, flags=True).outcomes == Outcomes(PROPORTION, [1.0, None, 0.0])
    assert case_means([[1.0, 0.0], [0.0]], 0.0, flags=True).outcomes == Outcomes(MEAN, [0.5, 0.0])
    assert lower(1.0, 1.0) == 0.0 and lower(0.5, 1.0) == 1.0 and lower(math.inf, 1.0) is None
    assert prob_gap(0.0, math.log(2)) == pytest.approx(0.5) and prob_gap(math.nan, 0.0) is None
    assert weighted_f1([1, 1, 1, 0], [1, 1, 1, 1]) == pytest.approx(float(F(3, 4) * F(6, 7)))
    assert weighted_f1([0, 1], [0, 1]) == 1.0


def test_zsre_locality_agreement_against_reference_and_gold() -> None:
    tok = WordTokenizer()
    req = EditRequest(0, "{} p1", "s", "N M", None, ["s r2"], ["o l1", "o l2"], ["T U", "N"], source_format="zsre")
    reference = Bigram({**ROWS, "l1": {"X": 1 / 2}, "T": {"U": 1 / 2}, "l2": {"N": 1 / 2}})
    edited = Bigram({**ROWS, "l1": {"X": 1 / 2}, "T": {"V": 1 / 2}, "l2": {"U": 1 / 2}})
    ref = reference_scores(reference, tok, [req])
    (group,) = evaluate_zsre(edited, tok, [req], ref, "the reference")
    m = group.metrics
    # Edit "N M" after p1: N is argmax, M is not (argmax after N is X) -> 1/2; rephrase after r2: same -> 1/2.
    assert m["zsre_edit_acc"].value == pytest.approx(0.5) and m["zsre_rephrase_acc"].value == pytest.approx(0.5)
    # Locality prompt 1 ("T U"): reference argmax [X, U], edited [X, V] -> 1/2; prompt 2 ("N"): [N] vs [U] -> 0.
    assert m["zsre_locality_agreement"].value == pytest.approx(0.25)
    # Gold: edited argmax [X, V] vs [T, U] -> 0; [U] vs [N] -> 0.
    assert m["zsre_locality_gold_acc"].value == pytest.approx(0.0)
    assert "the reference" in group.protocol
    # The unedited model agrees with itself everywhere.
    (same,) = evaluate_zsre(reference, tok, [req], ref, "itself")
    assert same.metrics["zsre_locality_agreement"].value == 1.0


def test_perplexity_exact_and_window_invariant(tmp_path: Path) -> None:
    text = tmp_path / "t.txt"
    text.write_text("a b a b a")
    model = Bigram({"<s>": {"a": 1 / 2}, "a": {"b": 1 / 2}, "b": {"a": 1 / 4}})
    expected = 2 ** (7 / 5)  # NLLs ln2, ln2, ln4, ln2, ln4 over 5 scored tokens
    for window, stride, batch in [(6, 3, 4), (2, 1, 1), (3, 2, 2), (4, 3, 8)]:
        outcome = evaluate_perplexity(model, WordTokenizer(), text, window, stride, batch_size=batch)
        value = outcome.groups[0].metrics["perplexity"]
        assert value.value == pytest.approx(expected, rel=1e-6) and value.n == 5


def test_sliding_windows_score_every_token_once() -> None:
    for n, window, stride in [(10, 4, 2), (10, 4, 3), (11, 3, 1), (5, 8, 4), (1000, 128, 100)]:
        scored = [t for w in sliding_windows(n, window, stride) for t in range(w.first_scored, w.end)]
        assert scored == list(range(1, n))
        assert all(w.end - w.begin <= window and w.first_scored > w.begin for w in sliding_windows(n, window, stride))
    with pytest.raises(PruneCliError, match="stride < window"):
        sliding_windows(10, 4, 4)  # the token at each window boundary would have no context


def test_perplexity_nan_is_reported(tmp_path: Path) -> None:
    text = tmp_path / "t.txt"
    text.write_text("a bad a")
    value = evaluate_perplexity(Bigram(ROWS), WordTokenizer(), text, 4, 2).groups[0].metrics["perplexity"]
    assert math.isnan(value.value) and value.n_nonfinite == 1 and value.n == 3
    assert value.outcomes is None  # no interval for a NaN perplexity


def test_label_word_classification_arithmetic(tmp_path: Path) -> None:
    data = tmp_path / "sst2.jsonl"
    data.write_text("\n".join(f'{{"sentence": "x", "label": {y}}}' for y in (1, 1, 1, 0)) + "\n")
    # Every sst2 prompt ends in ":"; its row prefers "positive", so every review is predicted positive.
    model = Bigram({":": {"positive": 1 / 2, "negative": 1 / 4}})
    ctx = EvalContext(model, WordTokenizer(), EvalOptions(batch_size=3))
    outcome = run_choice(CHOICE_TASKS["glue:sst2"], ctx, str(data))
    m = outcome.groups[0].metrics
    assert m["glue_sst2_acc"] == MetricValue(pytest.approx(0.75), 4, 0, Outcomes(PROPORTION, [1.0, 1.0, 1.0, 0.0]))
    assert m["glue_sst2_f1"].value == pytest.approx(float(F(3, 4) * F(6, 7)))  # class 1: tp 3, fp 1 -> F1 6/7
    # The F1 outcomes (predictions and gold labels) recompute the F1 itself.
    assert m["glue_sst2_f1"].outcomes.estimate() == pytest.approx(m["glue_sst2_f1"].value, abs=1e-12)
    assert outcome.cases == 4 and outcome.groups[0].records.ids == [0, 1, 2, 3]


def test_greedy_generation_follows_the_argmax_chain() -> None:
    model = Bigram({"p1": {"N": 1 / 2}, "N": {"X": 1 / 2}, "X": {"<s>": 1 / 2}, "bad": {"*": math.nan}})
    out = greedy_generate(model, WordTokenizer(), ["s p1", "s p1 s", "bad"], max_new_tokens=5, batch_size=2)
    assert out[0].token_ids == [ID["N"], ID["X"]] and out[0].text == "N X"  # stops at EOS (<s> = id 0)
    assert out[0].finite and not out[2].finite
    # One budget per prompt: a row that spent its budget stops, the others go on.
    short = greedy_generate(model, WordTokenizer(), ["s p1", "s p1"], max_new_tokens=[1, 5], batch_size=2)
    assert [g.text for g in short] == ["N", "N X"]
