"""MEMIT: the float64 spread update equals its dense formula; a batch of facts is edited in one go."""

from __future__ import annotations

import pytest
import torch
from editing_helpers import REQUESTS, TINY_SETS
from tiny_models import CORPUS

from prunecli.editors import corpus
from prunecli.editors.base import EditContext
from prunecli.editors.keys import prompt_token_keys, subject_keys
from prunecli.editors.memit import MemitEditor, spread_update
from prunecli.editors.prompts import request_prompts
from prunecli.editors.registry import resolve_hparams
from prunecli.editors.stats import accumulate
from prunecli.editors.success import check_edits
from prunecli.errors import PruneCliError
from prunecli.models.adapters import resolve_adapter
from prunecli.models.loading import load_model
from prunecli.models.scoring import score_targets


def test_spread_update_equals_the_dense_formula():
    g = torch.Generator().manual_seed(0)
    r, k = torch.randn(6, 3, generator=g), torch.randn(8, 3, generator=g)
    x = torch.randn(40, 8, generator=g, dtype=torch.float64)
    c = x.T @ x / 40
    a, b = spread_update(r, k, c, 2.0)
    kd = k.double()
    dense = r.double() @ kd.T @ torch.linalg.inv(2.0 * c + kd @ kd.T)
    torch.testing.assert_close((a @ b.T).double(), dense, rtol=1e-5, atol=1e-6)
    assert a.shape == (6, 3) and b.shape == (8, 3)


def _moments(model, tok, adapter, layers):
    sums, counts = accumulate(model, tok, adapter, layers, corpus.token_chunks(tok, CORPUS, 32, 10_000))
    return {L: sums[L] / counts[L] for L in layers}


@pytest.mark.parametrize("fixture", ["gpt2_dir", "llama_dir"])
def test_batch_of_facts_in_one_go(request, fixture):
    model, tok, _ = load_model(request.getfixturevalue(fixture))
    model.requires_grad_(False)
    adapter = resolve_adapter(model)
    hp = resolve_hparams("memit", adapter.family, adapter.num_layers,
                         sets=[*TINY_SETS, "layers=[1,0]", "mom2_update_weight=1"])
    ctx = EditContext(hp, [""], _moments(model, tok, adapter, [0, 1]))
    texts, targets = [r.text for r in REQUESTS], [r.target_new for r in REQUESTS]
    assert not any(s.all_correct for s in score_targets(model, tok, texts, targets))
    w0 = {L: adapter.weight_matrix(L) for L in (0, 1)}
    updates, outcomes = MemitEditor().apply(model, tok, adapter, REQUESTS, ctx)
    assert all(s.all_correct for s in score_targets(model, tok, texts, targets))
    assert [u.layer for u in updates] == [0, 1]  # ascending, whatever order the user gave
    for u in updates:
        assert u.a.shape[1] == len(REQUESTS)  # rank <= batch size
        torch.testing.assert_close(adapter.weight_matrix(u.layer) - w0[u.layer], u.a @ u.b.T, rtol=1e-4, atol=1e-5)
    assert len(outcomes) == len(REQUESTS)


def test_memit_needs_statistics_of_every_layer(llama_dir):
    model, tok, _ = load_model(llama_dir)
    adapter = resolve_adapter(model)
    hp = resolve_hparams("memit", adapter.family, adapter.num_layers, sets=[*TINY_SETS, "layers=[0,1]"])
    with pytest.raises(PruneCliError, match=r"needs key statistics of layers \[1\]"):
        MemitEditor().apply(model, tok, adapter, REQUESTS, EditContext(hp, [""], {0: torch.eye(32)}))


def test_prior_edit_weight_preserves_earlier_keys(llama_dir):
    """With prior_edit_weight the second batch barely moves the outputs for the first batch's keys, its subjects' and
    every token's of its prompts (they join the preserved set, re-read on the edited model); the published MEMIT
    moves them and keeps no key memory, so its deltas carry no extra tensors."""
    moments = None
    sets = [*TINY_SETS, "layers=[0,1]", "mom2_update_weight=1"]
    leaks = {}
    for prior in (None, 1e4):
        model, tok, _ = load_model(llama_dir)  # the same base model for both runs
        model.requires_grad_(False)
        adapter = resolve_adapter(model)
        moments = moments or _moments(model, tok, adapter, [0, 1])
        hp = resolve_hparams("memit", adapter.family, adapter.num_layers,
                             sets=[*sets, *([f"prior_edit_weight={prior}"] if prior else [])])
        ctx = EditContext(hp, [""], moments)
        MemitEditor().apply(model, tok, adapter, REQUESTS[:2], ctx)
        first, _ = subject_keys(model, tok, adapter.projection(0), REQUESTS[:2], [""])
        tokens = prompt_token_keys(model, tok, adapter.projection(0), REQUESTS[:2])
        (update, *_), _ = MemitEditor().apply(model, tok, adapter, REQUESTS[2:], ctx)
        dw = (update.a @ update.b.T).double()
        leaks[prior] = [float(dw.matmul(k.double().T).norm() / dw.norm()) for k in (first, tokens)]
        names = {"memit.keys::" + adapter.weight_name(L) for L in (0, 1)}
        assert set(ctx.carried) == (names if prior else set())
        if prior:
            # per batch: one row per subject, then one per token of each bare prompt
            n_tokens = [request_prompts(tok, r, [""], with_target=False)[0].n_prompt for r in REQUESTS]
            assert all(t.shape == (3 + sum(n_tokens), adapter.key_size(0)) for t in ctx.carried.values())
            memory = ctx.carried["memit.keys::" + adapter.weight_name(0)]
            torch.testing.assert_close(memory[:2], first)
            torch.testing.assert_close(memory[2:2 + len(tokens)], tokens)
    assert all(p < 0.01 * n for p, n in zip(leaks[1e4], leaks[None])), leaks


def test_prior_edit_weight_is_memit_only(llama_dir):
    with pytest.raises(PruneCliError, match="prior_edit_weight only applies to memit, not alphaedit"):
        resolve_hparams("alphaedit", "llama", 4, sets=["prior_edit_weight=1"])
    with pytest.raises(PruneCliError, match="out of range"):
        resolve_hparams("memit", "llama", 4, sets=["prior_edit_weight=-1"])
    assert "prior_edit_weight" not in resolve_hparams("memit", "llama", 4).to_json()


def test_prior_edit_weight_refuses_a_previous_delta_without_its_keys(llama_dir):
    model, tok, _ = load_model(llama_dir)
    adapter = resolve_adapter(model)
    hp = resolve_hparams("memit", adapter.family, adapter.num_layers,
                         sets=[*TINY_SETS, "layers=[0,1]", "prior_edit_weight=10"])
    ctx = EditContext(hp, [""], {0: torch.eye(32), 1: torch.eye(32)}, continues=True)  # e.g. `--delta rome.safetensors`
    with pytest.raises(PruneCliError, match=r"carries no MEMIT key cache .*prior_edit_weight=0"):
        MemitEditor().apply(model, tok, adapter, REQUESTS, ctx)


def test_retry_rounds_retake_only_the_edits_that_did_not_take(llama_dir):
    """lambda 1650 on the tiny model leaves two of three edits below the success threshold after one round. With
    retry_rounds those two are optimised again on the edited model and take, while the one that took is held where
    it was; once all have taken no further round runs. retry_below also retries an edit that took too weakly.
    retry_rounds=0 is the published single round."""
    model, tok, _ = load_model(llama_dir)
    model.requires_grad_(False)
    adapter = resolve_adapter(model)
    moments = _moments(model, tok, adapter, [0, 1])
    results = {}
    for retry in ((), ("retry_rounds=3",), ("retry_rounds=3", "retry_below=0.5")):
        model, tok, _ = load_model(llama_dir)
        model.requires_grad_(False)
        hp = resolve_hparams("memit", adapter.family, adapter.num_layers,
                             sets=[*TINY_SETS, "layers=[0,1]", "mom2_update_weight=1650", "v_num_grad_steps=20",
                                   *retry])
        ctx = EditContext(hp, [""], moments)
        updates, outcomes = MemitEditor().apply(model, tok, resolve_adapter(model), REQUESTS, ctx)
        results[len(retry)] = (updates, outcomes, check_edits(model, tok, REQUESTS))
    once, retried = results[0][2], results[1][2]
    took = [i for i, c in enumerate(once) if c.took]
    assert 0 < len(took) < len(REQUESTS), [c.prob_new for c in once]
    assert all(c.took for c in retried), [c.prob_new for c in retried]
    for i in took:  # held: its probability barely moved
        assert abs(retried[i].prob_new - once[i].prob_new) < 0.05 * once[i].prob_new
    assert [o.steps for o in results[1][1]] == [20 if i in took else 40 for i in range(len(REQUESTS))]
    assert [u.layer for u in results[1][0]] == [0, 1, 0, 1]  # one retry round sufficed, so no third
    assert len(results[0][0]) == 2
    # With retry_below 0.5 the weak one that took (P ~0.11) is retried too, and every edit ends stronger.
    assert all(o.steps >= 40 for o in results[2][1])
    assert all(c.prob_new > once[i].prob_new for i, c in enumerate(results[2][2]))


def test_retry_rounds_is_for_the_spreading_editors_and_off_by_default():
    with pytest.raises(PruneCliError, match="retry_rounds only applies to alphaedit, memit, not rome"):
        resolve_hparams("rome", "llama", 4, sets=["retry_rounds=1"])
    assert resolve_hparams("alphaedit", "llama", 4, sets=["retry_rounds=1"]).to_json()["retry_rounds"] == 1
    with pytest.raises(PruneCliError, match="out of range"):
        resolve_hparams("memit", "llama", 4, sets=["retry_rounds=-1"])
    with pytest.raises(PruneCliError, match="out of range"):
        resolve_hparams("memit", "llama", 4, sets=["retry_below=1.5"])
    published = resolve_hparams("memit", "llama", 4).to_json()
    assert "retry_rounds" not in published and "retry_below" not in published


def test_group_key_averaging_weighs_each_prefix_group_alike(llama_dir):
    """key_averaging=groups (the published compute_ks): the mean within each group of prefixes of one length, then
    over the groups, so with [[3, 2], [4, 3]] the bare prompt weighs 1/3, each 3-token prefix 1/6, each 4-token 1/9."""
    from prunecli.editors.keys import prefix_weights, read_at_subject
    from prunecli.editors.prompts import generate_prefixes

    assert prefix_weights([(10, 5)], "prompts") is None
    assert prefix_weights([(10, 5)], "groups") == pytest.approx([1 / 2] + [1 / 10] * 5)
    model, tok, _ = load_model(llama_dir)
    adapter = resolve_adapter(model)
    prefixes = generate_prefixes(model, tok, [(3, 2), (4, 3)], 0)
    weights = prefix_weights([(3, 2), (4, 3)], "groups")
    assert weights == pytest.approx([1 / 3, 1 / 6, 1 / 6, 1 / 9, 1 / 9, 1 / 9]) and len(prefixes) == 6
    projection = adapter.projection(1)
    keys, _ = subject_keys(model, tok, projection, REQUESTS[:2], prefixes, weights=weights)
    for i, r in enumerate(REQUESTS[:2]):
        each = read_at_subject(model, tok, request_prompts(tok, r, prefixes, with_target=False),
                               {"k": (projection, "input")})["k"].double()
        expected = (each[:1].mean(0) + each[1:3].mean(0) + each[3:].mean(0)) / 3
        torch.testing.assert_close(keys[i].double(), expected, rtol=1e-5, atol=1e-6)
    hp = resolve_hparams("memit", adapter.family, adapter.num_layers, sets=["key_averaging=groups"])
    assert hp.to_json()["key_averaging"] == "groups"
    with pytest.raises(PruneCliError, match="key_averaging must be one of prompts, groups"):
        resolve_hparams("alphaedit", adapter.family, adapter.num_layers, sets=["key_averaging=tokens"])


def test_the_driver_hands_editors_the_key_weights_of_their_hyper_parameters(llama_dir):
    """run_edits sets EditContext.key_weights from key_averaging and the prefixes it generated."""
    from prunecli.editors.base import LayerUpdate, RequestOutcome
    from prunecli.editors.session import run_edits

    seen = []

    class Spy(MemitEditor):
        def apply(self, model, tokenizer, adapter, requests, ctx):
            seen.append((ctx.key_weights, len(ctx.prefixes)))
            zero = torch.zeros(adapter.value_size(1), 1), torch.zeros(adapter.key_size(1), 1)
            return [LayerUpdate(1, *zero)], [RequestOutcome(0.0, 0.0, 0) for _ in requests]

    model, tok, base = load_model(llama_dir)
    adapter = resolve_adapter(model)
    for averaging in ("prompts", "groups"):
        hp = resolve_hparams("memit", adapter.family, adapter.num_layers,
                             sets=[f"key_averaging={averaging}", "context_template_length_params=[[3, 2]]"])
        run_edits(model, tok, base, REQUESTS[:1], Spy(), hp)
    assert seen == [(None, 3), (pytest.approx([1 / 2, 1 / 4, 1 / 4]), 3)]
