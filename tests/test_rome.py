"""ROME: the rank-1 update maps k* to v* exactly (both weight layouts), edits make the target the argmax, and the
value optimisation's losses are those of full forward passes (its shifts against a plain reference: test_value.py)."""

from __future__ import annotations

import pytest
import torch
from editing_helpers import REQUESTS, TINY_SETS

from prunecli.editors.base import EditContext
from prunecli.editors.keys import subject_keys
from prunecli.editors.prompts import encode_subject_prompt, generate_prefixes, request_prompts
from prunecli.editors.registry import resolve_hparams
from prunecli.editors.rome import MomentInverse, RomeEditor, rank_one_update
from prunecli.editors.tracing import shifted_output
from prunecli.editors.value import optimize_values
from prunecli.errors import PruneCliError
from prunecli.models.adapters import resolve_adapter
from prunecli.models.loading import load_model
from prunecli.models.scoring import score_targets

LAYER = 1


def _setup(path, sets=()):
    model, tok, base = load_model(path)
    model.requires_grad_(False)
    adapter = resolve_adapter(model)
    hp = resolve_hparams("rome", adapter.family, adapter.num_layers, sets=[*TINY_SETS, f"layers={LAYER}", *sets])
    return model, tok, adapter, hp


def _spd(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * n, n, generator=g, dtype=torch.float64)
    return x.T @ x / (4 * n)


@pytest.mark.parametrize("with_moment", [False, True])
def test_rank_one_update_maps_key_to_value(with_moment):
    g = torch.Generator().manual_seed(1)
    w, k, v = torch.randn(6, 8, generator=g), torch.randn(8, generator=g), torch.randn(6, generator=g)
    c = _spd(8) if with_moment else None
    a, b = rank_one_update(w, k, v, MomentInverse.of(c) if with_moment else None)
    assert a.shape == (6, 1) and b.shape == (8, 1)
    torch.testing.assert_close((w + a @ b.T) @ k, v, rtol=1e-5, atol=1e-5)
    u = torch.linalg.solve(c, k.double()) if with_moment else k.double()
    dense = torch.outer(v.double() - w.double() @ k.double(), u) / (u @ k.double())
    torch.testing.assert_close((a @ b.T).double(), dense, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fixture", ["gpt2_dir", "llama_dir"])
@pytest.mark.parametrize("with_moment", [False, True])
def test_edit_makes_target_argmax_and_w_maps_k_star_to_v_star(request, fixture, with_moment):
    """Conv1D ([in, out]) and Linear ([out, in]) weights both end up with W' k* = W k* + delta = v*."""
    model, tok, adapter, hp = _setup(request.getfixturevalue(fixture))
    req = REQUESTS[0]
    moments = {LAYER: _spd(adapter.key_size(LAYER))} if with_moment else {}
    ctx = EditContext(hp, [""], moments)
    # The editor is deterministic: computing k* and delta beforehand gives the values it uses.
    keys, _ = subject_keys(model, tok, adapter.projection(LAYER), [req], ctx.prefixes)
    (value,) = optimize_values(model, tok, adapter, LAYER, adapter.projection(LAYER), [req], ctx.prefixes, hp)
    w0 = adapter.weight_matrix(LAYER).double()
    before = score_targets(model, tok, [req.text], [req.target_new])[0]
    updates, outcomes = RomeEditor().apply(model, tok, adapter, [req], ctx)
    after = score_targets(model, tok, [req.text], [req.target_new])[0]
    assert not before.all_correct and after.all_correct
    assert outcomes[0].loss < outcomes[0].initial_loss
    (update,) = updates
    assert update.layer == LAYER and update.a.shape[1] == update.b.shape[1] == 1  # rank 1
    k = keys[0].double()
    w1 = adapter.weight_matrix(LAYER).double()
    torch.testing.assert_close(w1 @ k, w0 @ k + value.delta.double(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(w1 - w0, (update.a @ update.b.T).double(), rtol=1e-4, atol=1e-5)
    if with_moment:  # u = C^-1 k*, up to scale
        u = torch.linalg.solve(moments[LAYER], k)
        torch.testing.assert_close(update.b[:, 0].double() / update.b[0, 0], u / u[0], rtol=1e-4, atol=1e-6)


def test_value_losses_equal_full_forward_passes(llama_dir):
    model, tok, adapter, hp = _setup(llama_dir, ["v_num_grad_steps=3"])
    prefixes = generate_prefixes(model, tok, [(4, 3)], seed=0)
    req = REQUESTS[1]
    site = adapter.projection(LAYER)
    (value,) = optimize_values(model, tok, adapter, LAYER, site, [req], prefixes, hp)
    texts = [p + req.text for p in prefixes]

    def full_loss(delta):
        total = 0.0
        for prompt in request_prompts(tok, req, prefixes, with_target=True):
            rows, pos = torch.tensor([0]), torch.tensor([prompt.subject_index])
            with shifted_output(site, rows, pos, delta):
                total += score_targets(model, tok, [tok.decode(prompt.ids[:prompt.n_prompt])], [req.target_new])[0].nll
        return total / len(prefixes)

    reference0 = sum(s.nll for s in score_targets(model, tok, texts, [req.target_new] * len(texts))) / len(texts)
    assert value.initial_loss == pytest.approx(reference0, rel=1e-4)
    assert value.loss == pytest.approx(full_loss(value.delta), rel=1e-4)
    assert value.steps == 3 and value.loss < value.initial_loss


def test_prefixes_are_seeded_and_start_with_the_bare_prompt(llama_dir):
    model, tok, _, _ = _setup(llama_dir)
    a = generate_prefixes(model, tok, [(4, 3), (2, 6)], seed=5)
    assert a == generate_prefixes(model, tok, [(4, 3), (2, 6)], seed=5)
    assert a != generate_prefixes(model, tok, [(4, 3), (2, 6)], seed=6)
    assert a[0] == "" and len(a) == 10 and all(p.endswith(". ") and "{" not in p for p in a[1:])


def test_subject_last_token_is_found_when_it_merges_with_what_follows(llama_dir):
    _, tok, _, _ = _setup(llama_dir)
    p = encode_subject_prompt(tok, "In Paris. ", "What about {}? It is", "Lyon", "French")
    text = "In Paris. What about Lyon? It is"
    offsets = tok(text, return_offsets_mapping=True)["offset_mapping"]
    start, end = offsets[p.subject_index]
    assert start < text.index("Lyon") + 4 <= end  # the token holding "n", the subject's last character
    assert p.ids[:p.n_prompt] == tok(text)["input_ids"] and len(p.target) == 1


def test_original_key_handling_maps_the_bare_key_and_the_averaged_one_otherwise(llama_dir):
    """`rome_key: original` is the published ROME code's update: u = C^-1 k* (averaged key) but the denominator
    u^T k of the bare prompt's key, so W' k = W k + delta holds for the bare key k and not for k*; the default
    (`averaged`, R-ROME) maps k* to v* = W k* + delta. Same delta and same direction u in both."""
    prefixes = ["", "A short text. ", "Another one here. "]
    req = REQUESTS[0]
    runs = {}
    for mode in ("averaged", "original"):
        model, tok, adapter, hp = _setup(llama_dir, [f"rome_key={mode}", "v_num_grad_steps=5"])
        moments = {LAYER: _spd(adapter.key_size(LAYER))}
        k_star = subject_keys(model, tok, adapter.projection(LAYER), [req], prefixes)[0][0].double()
        k_bare = subject_keys(model, tok, adapter.projection(LAYER), [req], [""])[0][0].double()
        (value,) = optimize_values(model, tok, adapter, LAYER, adapter.projection(LAYER), [req], prefixes, hp)
        w0 = adapter.weight_matrix(LAYER).double()
        (update,), _ = RomeEditor().apply(model, tok, adapter, [req], EditContext(hp, prefixes, moments))
        runs[mode] = (adapter.weight_matrix(LAYER).double() - w0, k_star, k_bare, value.delta.double(), update)
    (d_avg, k_star, k_bare, delta, u_avg), (d_orig, _, _, delta_orig, u_orig) = runs["averaged"], runs["original"]
    torch.testing.assert_close(delta_orig, delta)  # the same value optimisation
    assert not torch.allclose(k_star, k_bare, rtol=1e-3)  # the prefixes change the key
    torch.testing.assert_close(d_avg @ k_star, delta, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(d_orig @ k_bare, delta, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(d_orig @ k_star, delta, rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(u_orig.b / u_orig.b.norm(), u_avg.b / u_avg.b.norm(), rtol=1e-5, atol=1e-6)


def test_rome_key_is_checked():
    with pytest.raises(PruneCliError, match="rome_key must be one of averaged, original"):
        resolve_hparams("rome", "llama", 4, sets=["rome_key=paper"])
    with pytest.raises(PruneCliError, match="rome_key only applies to rome"):
        resolve_hparams("memit", "llama", 4, sets=["rome_key=original"])
    assert resolve_hparams("rome", "llama", 4).rome_key == "averaged"
    assert "rome_key" not in resolve_hparams("memit", "llama", 4).to_json()


def test_statistics_are_factorised_once_per_run_and_singular_ones_refused(llama_dir, monkeypatch):
    with pytest.raises(PruneCliError, match="statistics are singular"):
        MomentInverse.of(torch.zeros(4, 4, dtype=torch.float64))
    model, tok, adapter, hp = _setup(llama_dir, ["v_num_grad_steps=2"])
    factorised = []
    real = MomentInverse.of
    monkeypatch.setattr(MomentInverse, "of", staticmethod(lambda moment: factorised.append(moment) or real(moment)))
    ctx = EditContext(hp, [""], {LAYER: _spd(adapter.key_size(LAYER))})
    editor = RomeEditor()
    editor.apply(model, tok, adapter, REQUESTS[:2], ctx)
    editor.apply(model, tok, adapter, REQUESTS[2:], ctx)
    assert len(factorised) == 1
