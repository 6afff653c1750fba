"""MEMIT (Meng et al. 2023): a batch of facts spread over several consecutive layers' MLP output projections.

For each fact, z = the residual stream after the last edited layer at the subject's last token plus the shift found by
the value optimisation (`value.optimize_values` at that layer's output; the batch's facts together, each as if alone).
Then, layer by layer from the first:
K = the layer's keys (averaged over context prefixes) [in, n], R = (z - current residual) / (layers left) [out, n],
Delta W = R K^T (lambda C + K K^T)^-1, solved in float64 and applied before the next layer's keys are read.
R is a residual-stream shift; where the block normalises its MLP output before the residual add (Gemma-2/3), it is
mapped to the projection-output change that produces it (`residual.projection_shift`).
Needs key statistics C of every edited layer (`prunecli stats --method memit`).

Sequential editing: lambda C preserves the outputs of the corpus keys only; the keys of earlier edits are not among
them, so every later batch moves the earlier subjects' outputs by R K^T (lambda C + K K^T)^-1 k_old and can undo
those edits. With `prior_edit_weight` w (> 0) the earlier edits' keys K_p (their subjects' and every token's of their
prompts, re-read on the edited model after each batch, `key_memory`, carried in delta files) join the preserved set,
as the memories MEMIT's derivation keeps:
Delta W = R K^T (lambda C + w K_p K_p^T + K K^T)^-1. Without it (the default) this is the published MEMIT.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from prunecli.editors import nas
from prunecli.editors.base import EditContext, Editor, LayerUpdate, RequestOutcome
from prunecli.editors.key_memory import KeyMemory
from prunecli.editors.keys import subject_keys
from prunecli.editors.residual import needs_projection_output, projection_shift
from prunecli.editors.success import check_edits
from prunecli.editors.value import ValueHParams, optimize_values
from prunecli.errors import PruneCliError
from prunecli.models.adapters import ModelAdapter
from prunecli.requests import EditRequest


@dataclass(frozen=True)
class MemitHParams(ValueHParams):
    """MEMIT's hyper-parameters: the value optimisation's, consecutive layers, and three options that are off (None)
    in the published method, so its records are unchanged."""

    method: ClassVar[str] = "memit"
    # Weight w of the earlier edits' keys K_p in (lambda C + w K_p K_p^T + K K^T)^-1 (see the module docstring).
    prior_edit_weight: float | None = None
    # Extra rounds per batch for the edits that did not take (`spread_over_layers`); None: one round, as published.
    retry_rounds: int | None = None
    # With retry_rounds: also retry edits that took with the new target's mean token probability below this.
    retry_below: float | None = None

    def validate(self, num_layers: int) -> None:
        super().validate(num_layers)
        self.require([("prior_edit_weight", self.prior_edit_weight is None or self.prior_edit_weight >= 0),
                      ("retry_rounds", self.retry_rounds is None or self.retry_rounds >= 0),
                      ("retry_below", self.retry_below is None or 0 <= self.retry_below <= 1)])


def spread_update(residual: torch.Tensor, keys: torch.Tensor, moment: torch.Tensor, weight: float,
                  preserved: torch.Tensor | None = None,
                  preserved_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (a = R [out, n], b = (lambda C + K K^T)^-1 K [in, n]) of Delta W = R K^T (lambda C + K K^T)^-1.

    With `preserved` K_p [N_p, in] (earlier edits' keys, rows) the system is lambda C + w K_p^T K_p + K K^T."""
    k = keys.double()
    system = weight * moment.double() + k @ k.T
    if preserved is not None:
        kp = preserved.to(system.device, torch.float64)
        system = system + preserved_weight * (kp.T @ kp)
    try:
        b = torch.linalg.solve(system, k)
    except torch.linalg.LinAlgError:
        raise PruneCliError("MEMIT's system lambda C + K K^T is singular; recompute the statistics with more "
                            "--tokens or raise mom2_update_weight") from None
    return residual.float(), b.float()


def value_site(adapter: ModelAdapter, layer: int) -> torch.nn.Module:
    """Where MEMIT's value optimisation shifts: the residual stream after `layer`, or the MLP output projection's
    output where the block normalises it (`residual_targets`)."""
    return adapter.layer_module(layer) if adapter.mlp_output_norm(layer) is None else adapter.projection(layer)


def residual_targets(model: torch.nn.Module, tokenizer, adapter: ModelAdapter, layer: int,  # noqa: ANN001
                     requests: Sequence[EditRequest], ctx: EditContext
                     ) -> tuple[torch.Tensor, list[RequestOutcome]]:
    """Target residual streams z [n, hidden] after `layer` (the last edited one) at each subject's last token.

    In a "residual += mlp(x)" block the shift is optimised on the layer's output itself (as published). Where the
    block normalises its MLP output, the shift delta is optimised on the projection output m before the norm (as ROME
    does) and z = h + norm(m + delta) - norm(m): a residual stream the last layer can produce by itself. A shift
    optimised on the residual stream instead can leave the set a normalised MLP output can reach (and its size is
    that of the residual stream, ~1000x the projection output's on Gemma-3), which no weight update realises."""
    norm = adapter.mlp_output_norm(layer)
    site = value_site(adapter, layer)
    values = optimize_values(model, tokenizer, adapter, layer, site, requests, ctx.prefixes, ctx.hparams,
                             ctx.value_task)
    initial = torch.stack([v.initial for v in values])  # [n, hidden]
    shifts = torch.stack([v.delta for v in values])
    dropped = [False] * len(values)
    if ctx.anchor is not None:  # NAS: the MLP output's target v* = v0 + shift gets the anchor's norm
        v0 = initial if norm is not None else nas.projection_outputs(model, tokenizer, adapter, layer, requests)
        shifts, dropped = nas.rescale(v0, shifts, ctx.anchor, ctx.hparams.method)
    outcomes = [RequestOutcome(v.loss, v.initial_loss, v.steps, d) for v, d in zip(values, dropped)]
    shifted = initial + shifts.to(initial.device)
    if norm is None:
        return shifted, outcomes
    _, bare = subject_keys(model, tokenizer, adapter.projection(layer), requests, [""],
                           {"h": (adapter.layer_module(layer), "output")})
    param = next(norm.parameters())
    with torch.no_grad():
        change = (norm(shifted.to(param.device, param.dtype)) - norm(initial.to(param.device, param.dtype)))
    return bare["h"] + change.to(bare["h"].device, torch.float32), outcomes


def layer_targets(model: torch.nn.Module, tokenizer, adapter: ModelAdapter, layer: int,  # noqa: ANN001
                  requests: Sequence[EditRequest], prefixes: list[str], z_site: torch.nn.Module, z: torch.Tensor,
                  layers_left: int, weights: Sequence[float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys K [n, d_in] of `layer` (averaged over the prefixes, with `weights` if given) and the change R [n, d_out]
    of its projection output that adds this layer's share (z - h) / layers_left of the remaining shift to the residual
    stream, where h is the current output of `z_site` on the bare prompts (read on the model as edited so far)."""
    sites = {"z": (z_site, "output")}
    if needs_projection_output(adapter, layer):
        sites["m"] = (adapter.projection(layer), "output")
    keys, bare = subject_keys(model, tokenizer, adapter.projection(layer), requests, prefixes, sites, weights)
    share = (z - bare["z"]) / layers_left
    return keys, projection_shift(adapter, layer, share, bare.get("m"))


# The per-layer solve: (layer, residual R [out, n], keys K [in, n]) -> factors (a [out, r], b [in, r]) of Delta W.
LayerSolve = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def check_moments(ctx: EditContext, name: str) -> None:
    """Fail unless the statistics cover every edited layer (MEMIT and AlphaEdit need C for each)."""
    missing = [L for L in sorted(ctx.hparams.layers) if L not in ctx.moments]
    if missing:
        raise PruneCliError(f"{name} needs key statistics of layers {missing} "
                            f"(prunecli stats --method {ctx.hparams.method})")


def _spread(model: torch.nn.Module, tokenizer, adapter: ModelAdapter,  # noqa: ANN001
            requests: Sequence[EditRequest], ctx: EditContext, solve: LayerSolve, z: torch.Tensor) -> list[LayerUpdate]:
    """One pass over the layers in ascending order: the keys and the projection-output change on the partly edited
    model (`layer_targets`), the update from `solve`, added to the model before the next layer's keys are read."""
    layers = sorted(ctx.hparams.layers)
    z_site = adapter.layer_module(layers[-1])
    updates = []
    for i, layer in enumerate(layers):
        keys, residual = layer_targets(model, tokenizer, adapter, layer, requests, ctx.prefixes, z_site, z,
                                       len(layers) - i, ctx.key_weights)
        a, b = ctx.restrain_update(adapter.weight_name(layer), *solve(layer, residual.T, keys.T))
        adapter.add_update(layer, a @ b.T)
        updates.append(LayerUpdate(layer, a, b))
    return updates


def spread_over_layers(model: torch.nn.Module, tokenizer, adapter: ModelAdapter,  # noqa: ANN001
                       requests: Sequence[EditRequest], ctx: EditContext,
                       solve: LayerSolve) -> tuple[list[LayerUpdate], list[RequestOutcome]]:
    """MEMIT's procedure with the per-layer solve left open (MEMIT and AlphaEdit differ only there): targets z at the
    last edited layer (`residual_targets`), then one pass over the layers (`_spread`).

    The value optimisation shifts the subject's last token at the last edited layer only, while the update also
    moves the subject's token at the earlier layers (whose change reaches later tokens through attention) and every
    other token whose keys it touches, so an edit can reach its target residual at the subject and still not make the
    model say the target (docs/ARCHITECTURES.md, Gemma-3). The hyper-parameter `retry_rounds` (MEMIT's and
    AlphaEdit's; None: one round) gives extra rounds that each check the
    batch (`editors.success`) and, for the edits that did not take, optimise the value again on the model as edited
    (so it sees those side effects) and spread it; the batch's other edits are held where they are (target = their
    current residual), so a retry does not move them. `retry_below` p also retries edits that took with the new
    target's mean token probability below p: an edit that barely took is undone by small leaks of later batches."""
    retry_below = ctx.hparams.retry_below or 0.0
    last = max(ctx.hparams.layers)
    z, outcomes = residual_targets(model, tokenizer, adapter, last, requests, ctx)
    updates = _spread(model, tokenizer, adapter, requests, ctx, solve, z)
    for _ in range(ctx.hparams.retry_rounds or 0):
        failed = [i for i, c in enumerate(check_edits(model, tokenizer, requests))
                  if not c.took or not c.prob_new >= retry_below]
        if not failed:
            break
        _, bare = subject_keys(model, tokenizer, adapter.projection(last), requests, [""],
                               {"h": (adapter.layer_module(last), "output")})
        z = bare["h"]
        retried, again = residual_targets(model, tokenizer, adapter, last, [requests[i] for i in failed], ctx)
        z[failed] = retried
        for i, o in zip(failed, again):
            outcomes[i] = RequestOutcome(o.loss, outcomes[i].initial_loss, outcomes[i].steps + o.steps, o.dropped)
        updates += _spread(model, tokenizer, adapter, requests, ctx, solve, z)
    return updates, outcomes


# Where MEMIT keeps its earlier edits' keys when `prior_edit_weight` is set.
MEMORY = KeyMemory("memit.keys::", "memit with prior_edit_weight", "MEMIT key cache",
                   "start a new chain without --delta, or pass --set prior_edit_weight=0 (published MEMIT, which "
                   "does not protect earlier edits)", whole_prompts=True)


class MemitEditor(Editor):
    method = "memit"
    hparams = MemitHParams
    needs_stats = True
    batched = True
    nas = True

    def value_site(self, adapter: ModelAdapter, hparams: ValueHParams) -> tuple[int, torch.nn.Module]:
        return max(hparams.layers), value_site(adapter, max(hparams.layers))

    def apply(self, model: torch.nn.Module, tokenizer, adapter: ModelAdapter,  # noqa: ANN001
              requests: Sequence[EditRequest], ctx: EditContext) -> tuple[list[LayerUpdate], list[RequestOutcome]]:
        check_moments(ctx, "MEMIT")
        weight = ctx.hparams.mom2_update_weight
        prior = ctx.hparams.prior_edit_weight
        if not prior:
            return spread_over_layers(model, tokenizer, adapter, requests, ctx,
                                      lambda layer, r, k: spread_update(r, k, ctx.moments[layer], weight))
        layers = sorted(ctx.hparams.layers)
        MEMORY.prepare(ctx, adapter, layers)
        result = spread_over_layers(model, tokenizer, adapter, requests, ctx, lambda layer, r, k: spread_update(
            r, k, ctx.moments[layer], weight, MEMORY.keys(ctx, adapter, layer), prior))
        MEMORY.remember(model, tokenizer, adapter, requests, ctx, layers)
        return result
