"""The generation rule (`models.recall`) on hand-made cases, and the generation protocol of edits on a bigram model
whose greedy continuations are known exactly."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from test_eval_metrics import ROWS, Bigram, WordTokenizer
from tiny_models import tiny_tokenizer

from prunecli.evaluation import counterfact, zsre
from prunecli.evaluation.edit_generation import evaluate_generation, prompt_count
from prunecli.evaluation.uncertainty import PROPORTION
from prunecli.models.generation import Generation, greedy_generate
from prunecli.models.recall import ANSWER_MARGIN, answer_budgets, normalize, recalled, recalled_by
from prunecli.requests import EditRequest


@pytest.mark.parametrize("continuation, answer, expected", [
    (" Paris, the capital of France", "Paris", True),  # later words do not matter
    (" Parisian food", "Paris", False),  # word boundaries do
    ("Paris", "Paris", True),
    (" the English language", "English", True),  # a leading article is dropped
    ('\n"Chess Player" at heart', "chess player", True),  # case, punctuation, newlines
    (" chess", "chess player", False),  # a multi-token answer must be written whole
    (" soccer player", "chess player", False),
    (" chess  player.", "Chess player", True),  # whitespace squeezed
    (" Paris", "  Paris ", True),  # an answer stored with spaces around it
    ("", "Paris", False),
    (" He was born in Paris", "Paris", False),  # the answer must come first
    (" the", "The", False),  # an answer that normalises to nothing is never recalled
    (" Milan's Milanese architecture", "Milan", True),  # punctuation separates words: a possessive says Milan
    (" Fiat-Positron", "Fiat", True),
    (" Guinea, then", "Guinea-Bissau", False),  # ... on both sides: the answer's second word is missing
    (" Côte d’Ivoire.", "Côte d'Ivoire", True),  # Unicode letters stay, a curly apostrophe separates like ASCII's
])
def test_recall_rule(continuation: str, answer: str, expected: bool) -> None:
    assert recalled(continuation, answer) is expected


def test_normalisation() -> None:
    assert normalize("The  Beatles!") == ["beatles"]
    assert normalize("  A Tale of Two Cities. ") == ["tale", "of", "two", "cities"]
    assert normalize("U.S.-born\n\"Anna\"") == ["u", "s", "born", "anna"]


def test_a_continuation_from_nan_logits_is_no_verdict() -> None:
    assert recalled_by(Generation(" Paris", [1], True), "Paris") is True
    assert recalled_by(Generation(" Paris", [1], False), "Paris") is None


class Scripted(torch.nn.Module):
    """Writes the token ids of `script` after a prompt of `prompt_len` tokens, then end-of-sequence (id 0)."""

    def __init__(self, script: list[int], prompt_len: int, vocab: int) -> None:
        super().__init__()
        self.script, self.prompt_len, self.vocab = script, prompt_len, vocab
        self.config = SimpleNamespace(max_position_embeddings=64)
        self.anchor = torch.nn.Parameter(torch.zeros(1), requires_grad=False)  # says which device inputs go to

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: object = None, use_cache: bool = False,
                logits_to_keep: int = 0) -> SimpleNamespace:
        assert position_ids is not None
        logits = torch.zeros(len(input_ids), 1, self.vocab)
        for row, pos in enumerate(position_ids[:, -1].tolist()):
            step = pos - (self.prompt_len - 1)
            logits[row, 0, self.script[step] if step < len(self.script) else 0] = 1.0
        return SimpleNamespace(logits=logits, cache=None)


def test_another_tokenisation_of_the_same_words_is_recalled() -> None:
    """" Paris" encodes as [ĠPar, is]; a model writing [ĠPar, i, s] says the same words: the rule reads text."""
    tok = tiny_tokenizer()
    prompt = "The Eiffel Tower is located in"
    answer_ids = tok(" Paris", add_special_tokens=False)["input_ids"]
    other = tok(" Par", add_special_tokens=False)["input_ids"] + tok.convert_tokens_to_ids(["i", "s"])
    assert other != answer_ids and tok.decode(other) == " Paris"
    budgets = answer_budgets(tok, [(prompt, "Paris")])
    assert budgets == {prompt: len(answer_ids) + ANSWER_MARGIN}
    model = Scripted(other + tok(" is", add_special_tokens=False)["input_ids"], len(tok(prompt)["input_ids"]),
                     len(tok))
    (said,) = greedy_generate(model, tok, list(budgets), list(budgets.values()))
    assert said.token_ids == other + tok(" is", add_special_tokens=False)["input_ids"]
    assert recalled_by(said, "Paris") and not recalled_by(said, "Paris is located")


def test_budgets_follow_the_tokenisation_convention() -> None:
    """The answer's token count as `encode_pair` counts it (a leading space unless the prompt ends in whitespace),
    the largest over a prompt's answers, plus the margin."""
    tok = tiny_tokenizer()
    spaced = len(tok(" chess player", add_special_tokens=False)["input_ids"])
    bare = len(tok("Paris", add_special_tokens=False)["input_ids"])
    budgets = answer_budgets(tok, [("He is a", "Paris"), ("He is a", " chess player "), ("She is ", "Paris")])
    assert budgets == {"He is a": spaced + ANSWER_MARGIN, "She is ": bare + ANSWER_MARGIN}


def _requests() -> list[EditRequest]:
    return [
        # "s p1" continues "N X"; "s r1" "T"; "s r2" "N X"; "o l1" "T".
        EditRequest(0, "{} p1", "s", "N", "T", ["s r1", "s r2"], ["o l1"], ["T"], case_id=10,
                    source_format="counterfact"),
        # "s2 p2" continues "T"; the multi-token target "N M" is not what "s2 r2" writes ("N X"); "bad" has NaN.
        EditRequest(1, "{} p2", "s2", "N M", "T", ["s2 r2"], ["o2 l2", "o bad"], ["T", "T"], case_id=11,
                    source_format="counterfact"),
    ]


def test_counterfact_generation_protocol_exact() -> None:
    model, tok = Bigram(ROWS), WordTokenizer()
    requests = _requests()
    assert prompt_count(tok, requests, counterfact.GENERATION) == 8
    group = evaluate_generation(model, tok, requests, counterfact.GENERATION, batch_size=3)
    m = group.metrics
    assert group.name == "counterfact_generation" and "start with the answer's words" in group.protocol
    assert m["efficacy_gen"].value == 0.5 and m["efficacy_gen"].outcomes.values == [1.0, 0.0]
    assert m["efficacy_gen"].outcomes.statistic == PROPORTION
    assert m["paraphrase_gen"].value == pytest.approx(0.25) and m["paraphrase_gen"].outcomes.values == [0.5, 0.0]
    # Neighborhood: "o l1" still says T; "o2 l2" says N, "o bad" decodes from NaN logits (a failure, counted).
    assert m["neighborhood_gen"].value == pytest.approx(0.5) and m["neighborhood_gen"].n_nonfinite == 1
    assert group.records.ids == [10, 11]
    assert group.generations[0] == {"case_id": 10, "efficacy": [["s p1", "N X"]],
                                    "paraphrase": [["s r1", "T"], ["s r2", "N X"]], "neighborhood": [["o l1", "T"]]}
    assert group.generations[1]["paraphrase"] == [["s2 r2", "N X"]]
    # Batching changes nothing.
    alone = evaluate_generation(model, tok, requests, counterfact.GENERATION, batch_size=1)
    assert alone.generations == group.generations and alone.metrics == group.metrics


def test_zsre_generation_protocol_uses_the_gold_locality_answer() -> None:
    req = EditRequest(0, "{} p1", "s", "N", "T", ["s r1"], ["o l1", "o2 l2"], ["T", "T"], source_format="zsre")
    group = evaluate_generation(Bigram(ROWS), WordTokenizer(), [req], zsre.GENERATION)
    assert {k: v.value for k, v in group.metrics.items()} == {
        "zsre_edit_gen": 1.0, "zsre_rephrase_gen": 0.0, "zsre_locality_gen": 0.5}
