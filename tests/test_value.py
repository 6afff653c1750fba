"""The value optimisation (`editors.value`) gives every fact the shift of the plain reference (`value_reference`: each
prompt run alone and whole at every step, `torch.optim.Adam` on one fact), on the tiny model of every family, whether
the fact is optimised alone, with the others in one batch, in groups (`value_batch_rows`) or with every prompt width
in a forward pass of its own. The batch has facts that stop early (their Adam must stand still while the others go on)
and facts whose shift is clamped; the context prefixes are longer than the tiny Gemma-2/3 sliding window, and one
subject starts its prompt (an empty cached prefix)."""

from __future__ import annotations

import itertools

import pytest
import torch
from editing_helpers import REQUESTS
from tiny_models import FAMILIES, build_tiny_model, tiny_tokenizer
from value_reference import reference_value

from prunecli.editors import value
from prunecli.editors.registry import resolve_hparams
from prunecli.editors.value import optimize_values
from prunecli.models.adapters import resolve_adapter
from prunecli.requests import EditRequest

FACTS = [*REQUESTS, EditRequest(3, "{} was created by", "Apple", "Microsoft Windows")]
PREFIXES = ["", "The Eiffel Tower is located in Paris. ", "Apple. "]
STEPS = 8
SETS = ["layers=[1]", f"v_num_grad_steps={STEPS}", "clamp_norm_factor=0.8", "context_template_length_params=[]"]


def _stop_step(losses: list[float], stop: float) -> int:
    return next((t for t, x in enumerate(losses[:-1]) if x < stop), len(losses) - 1)


def _stop_between(trajectories: list[list[float]]) -> float:
    """A v_stop_loss that stops a fact after some steps and lets another run them all, with every loss far from it
    (not within rounding)."""
    values = sorted({x for t in trajectories for x in t})
    best, gap = None, 0.0
    for lo, hi in itertools.pairwise(values):
        stop = (lo + hi) / 2
        steps = [_stop_step(t, stop) for t in trajectories]
        if any(0 < s < STEPS for s in steps) and STEPS in steps and (hi - lo) / hi > gap:
            best, gap = stop, (hi - lo) / hi
    assert best is not None and gap > 1e-3, trajectories
    return best


@pytest.mark.parametrize("family, method", [*((f, "memit") for f in FAMILIES),
                                            *((f, "rome") for f in ("gpt2", "llama", "gemma3_text"))])
def test_every_fact_gets_the_reference_shift(family, method, monkeypatch):
    model = build_tiny_model(family).requires_grad_(False)
    tok = tiny_tokenizer()
    adapter = resolve_adapter(model)
    assert len(tok(FACTS[3].subject)["input_ids"]) == 1 and len(tok(" " + FACTS[3].target_new)["input_ids"]) > 1
    layer = 1
    # ROME's site: the projection's output (GPT-2: a Conv1D). MEMIT's: the layer's output, or its projection's where
    # the block normalises the MLP output (Gemma-2/3).
    plain = method == "memit" and adapter.mlp_output_norm(layer) is None
    site = adapter.layer_module(layer) if plain else adapter.projection(layer)
    never = resolve_hparams(method, adapter.family, adapter.num_layers, sets=[*SETS, "v_stop_loss=0"])
    full = [reference_value(model, tok, site, adapter.value_size(layer), r, PREFIXES, never) for r in FACTS]
    stop = _stop_between([r.losses for r in full])
    hp = resolve_hparams(method, adapter.family, adapter.num_layers, sets=[*SETS, f"v_stop_loss={stop}"])
    expected_steps = [_stop_step(r.losses, stop) for r in full]

    def run(requests, **sets):
        h = resolve_hparams(method, adapter.family, adapter.num_layers,
                            sets=[*SETS, f"v_stop_loss={stop}", *(f"{k}={v}" for k, v in sets.items())])
        return optimize_values(model, tok, adapter, layer, site, requests, PREFIXES, h)

    rows = len(PREFIXES) + 1
    variants = {"alone": [v for r in FACTS for v in run([r])], "batch": run(FACTS),
                "groups of two": run(FACTS, value_batch_rows=2 * rows + 1)}
    monkeypatch.setattr(value, "_CPU_PASS_COST", 0)  # every prompt width in a pass of its own
    variants["pass per width"] = run(FACTS)
    assert hp.v_stop_loss == stop
    for name, results in variants.items():
        for ref, steps, got in zip(full, expected_steps, results):
            assert got.steps == steps, name
            want = ref.deltas[steps]
            scale = float(want.abs().max())
            torch.testing.assert_close(got.delta, want, rtol=1e-4, atol=1e-5 * scale, msg=name)
            torch.testing.assert_close(got.initial, ref.initial, rtol=1e-5, atol=1e-5 * float(ref.initial.abs().max()))
            assert got.initial_loss == pytest.approx(ref.losses[0], rel=1e-5), name
            assert got.loss == pytest.approx(ref.losses[steps], rel=1e-4), name
    assert any(any(r.clamped[:s]) for r, s in zip(full, expected_steps))  # the clamp acted before a fact ended


def test_chunks_trade_padding_against_passes():
    """Rows are cut into passes by width so that padded tokens plus a fixed cost per pass are fewest."""
    def rows(widths):
        return [value._Row(0, value.SubjectPrompt(list(range(w)), 0, w), 1.0) for w in widths]

    def passes(widths, cost):
        return [[r.width for r in chunk] for chunk in value._chunks(rows(widths), cost)]

    assert passes([2] * 6 + [3], 32) == [[2] * 6 + [3]]  # one fact (ROME): one pass, as before
    assert passes([2] * 6 + [3], 0) == [[2] * 6, [3]]
    assert passes([2] * 20 + [8] * 20, 32) == [[2] * 20, [8] * 20]
    assert passes([2] * 20 + [8] * 20, float("inf")) == [[2] * 20 + [8] * 20]  # accelerators: one pass
