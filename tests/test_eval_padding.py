"""Padding invariance on real (tiny) architectures: batch size 1 and 8 give the same scores, the same greedy
continuations (left padding) and the same perplexity; greedy decoding agrees with transformers' generate."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import CORPUS, build_tiny_model, tiny_tokenizer

from prunecli.evaluation.counterfact import evaluate_counterfact
from prunecli.evaluation.perplexity import evaluate_perplexity, leading_ids
from prunecli.models.generation import greedy_generate
from prunecli.models.scoring import score_targets
from prunecli.requests import EditRequest

FAMILIES = ["gpt2", "llama", "qwen2"]
PROMPTS = ["The Eiffel Tower is located in", "Michael Jordan plays", "The", "English, German",
           "Apple A5 was created by Apple. Windows was created by", "He played for the Chicago",
           "Danielle Darrieux's mother tongue is French. Her native", "Toko Yasuda plays the guitar and the piano. The"]
TARGETS = ["Paris", "basketball", "Space Needle", "Italian", "Microsoft", "Bulls", "language is French", "Seattle"]


@pytest.fixture(scope="module", params=FAMILIES)
def model(request: pytest.FixtureRequest) -> torch.nn.Module:
    return build_tiny_model(request.param)


def test_scores_do_not_depend_on_batching(model: torch.nn.Module) -> None:
    tok = tiny_tokenizer()
    one = score_targets(model, tok, PROMPTS, TARGETS, batch_size=1)
    eight = score_targets(model, tok, PROMPTS, TARGETS, batch_size=8)
    for a, b in zip(one, eight):
        assert a.token_logprobs == pytest.approx(b.token_logprobs, abs=1e-5)
        assert a.token_argmax == b.token_argmax


def test_scores_match_an_unpadded_forward(model: torch.nn.Module) -> None:
    """Shared prompts (read once, cache rows repeated per target) and targets of 1-3 tokens, batched together."""
    tok = tiny_tokenizer()
    prompts = [PROMPTS[4], PROMPTS[4], PROMPTS[4], PROMPTS[0], PROMPTS[0], PROMPTS[2]]
    targets = ["Microsoft", "Apple", "language is French", "Paris", "Seattle", "Space Needle"]
    scores = score_targets(model, tok, prompts, targets, batch_size=2)
    for prompt_text, target_text, score in zip(prompts, targets, scores):
        prompt = tok(prompt_text)["input_ids"]
        target = tok(" " + target_text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + target])).logits[0].log_softmax(-1)
        rows = logits[len(prompt) - 1:len(prompt) - 1 + len(target)]
        assert score.token_logprobs == pytest.approx([rows[j, t].item() for j, t in enumerate(target)], abs=1e-5)
        assert score.token_argmax == rows.argmax(-1).tolist()
    assert len({len(tok(" " + t, add_special_tokens=False)["input_ids"]) for t in targets}) > 1


def test_counterfact_metrics_do_not_depend_on_batching(model: torch.nn.Module) -> None:
    reqs = [EditRequest(i, "{}", p, t, TARGETS[(i + 1) % 8], [PROMPTS[(i + 2) % 8]], [PROMPTS[(i + 3) % 8]],
                        [TARGETS[(i + 3) % 8]], source_format="counterfact")
            for i, (p, t) in enumerate(zip(PROMPTS, TARGETS))]
    a = {k: v for g in evaluate_counterfact(model, tiny_tokenizer(), reqs, batch_size=1) for k, v in g.metrics.items()}
    b = {k: v for g in evaluate_counterfact(model, tiny_tokenizer(), reqs, batch_size=8) for k, v in g.metrics.items()}
    for name in a:
        assert a[name].value == pytest.approx(b[name].value, abs=1e-6), name


def test_greedy_generation_does_not_depend_on_left_padding(model: torch.nn.Module) -> None:
    tok = tiny_tokenizer()
    one = greedy_generate(model, tok, PROMPTS, max_new_tokens=10, batch_size=1)
    eight = greedy_generate(model, tok, PROMPTS, max_new_tokens=10, batch_size=8)
    assert [g.token_ids for g in one] == [g.token_ids for g in eight]
    assert all(g.finite for g in eight)
    assert len({len(p) for p in (tok(x)["input_ids"] for x in PROMPTS)}) > 1  # the batch really was padded


def test_greedy_generation_matches_transformers_generate(model: torch.nn.Module) -> None:
    tok = tiny_tokenizer()
    ours = greedy_generate(model, tok, PROMPTS[:4], max_new_tokens=8, batch_size=4)
    for prompt, g in zip(PROMPTS[:4], ours):
        ids = tok(prompt, return_tensors="pt")
        ref = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        expected = ref[0, ids["input_ids"].shape[1]:].tolist()
        if tok.eos_token_id in expected:
            expected = expected[:expected.index(tok.eos_token_id)]
        assert g.token_ids == expected


def test_perplexity_does_not_depend_on_batching(model: torch.nn.Module, tmp_path: Path) -> None:
    text = tmp_path / "corpus.txt"
    text.write_text(" ".join(CORPUS))
    tok = tiny_tokenizer()
    values = [evaluate_perplexity(model, tok, text, window=32, stride=12, batch_size=b).groups[0].metrics["perplexity"]
              for b in (1, 8)]
    assert values[0].value == pytest.approx(values[1].value, rel=1e-5)
    assert values[0].n == len(tok(text.read_text())["input_ids"]) - 1
    # One window covering the whole text: exactly the mean NLL of an unbatched forward pass.
    ids = tok(text.read_text())["input_ids"][:100]
    with torch.no_grad():
        logprobs = model(torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
    nll = -logprobs.gather(1, torch.tensor(ids[1:])[:, None]).mean().item()
    full = evaluate_perplexity(model, tok, text, window=100, stride=50, max_tokens=100).groups[0].metrics["perplexity"]
    assert full.value == pytest.approx(torch.tensor(nll).exp().item(), rel=1e-5)


def test_leading_ids_equal_the_start_of_the_whole_text(shared_data: Path) -> None:
    """Prefixes ending at line breaks (WikiText), or the whole text when it has none (the corpus on one line)."""
    tok = tiny_tokenizer()
    for text in [(shared_data / "wikitext" / "wiki.test.raw").read_text()[:200_000], " ".join(CORPUS) * 20]:
        whole = tok(text)["input_ids"]
        for limit in (1, 9, 300, 2500, len(whole) + 10):
            assert leading_ids(tok, text, limit) == whole[:limit]
        assert leading_ids(tok, text, None) == whole
