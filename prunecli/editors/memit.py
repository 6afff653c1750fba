"""MEMIT (Meng et al. 2023): a batch of facts spread over several consecutive layers' MLP output projections.

For each fact, z = the residual stream after the last edited layer at the subject's last token plus the shift found by
the value optimisation (`value.optimize_value` at that layer's output). Then, layer by layer from the first:
K = the layer's keys (averaged over context prefixes) [in, n], R = (z - current residual) / (layers left) [out, n],
Delta W = R K^T (lambda C + K K^T)^-1, solved in float64 and applied before the next layer's keys are read.
Needs key statistics C of every edited layer (`prunecli stats --method memit`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from prunecli.editors.base import EditContext, Editor, LayerUpdate, RequestOutcome
from prunecli.editors.keys import subject_keys
from prunecli.editors.value import optimize_value
from prunecli.errors import PruneCliError
from prunecli.models.adapters import ModelAdapter
from prunecli.requests import EditRequest


def spread_update(residual: torch.Tensor, keys: torch.Tensor, moment: torch.Tensor,
                  weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (a = R [out, n], b = (lambda C + K K^T)^-1 K [in, n]) of Delta W = R K^T (lambda C + K K^T)^-1."""
    k = keys.double()
    system = weight * moment.double() + k @ k.T
    try:
        b = torch.linalg.solve(system, k)
    except torch.linalg.LinAlgError:
        raise PruneCliError("MEMIT's system lambda C + K K^T is singular; recompute the statistics with more "
                            "--tokens or raise mom2_update_weight") from None
    return residual.float(), b.float()


# The per-layer solve: (layer, residual R [out, n], keys K [in, n]) -> factors (a [out, r], b [in, r]) of Delta W.
LayerSolve = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def check_moments(ctx: EditContext, name: str) -> None:
    """Fail unless the statistics cover every edited layer (MEMIT and AlphaEdit need C for each)."""
    missing = [L for L in sorted(ctx.hparams.layers) if L not in ctx.moments]
    if missing:
        raise PruneCliError(f"{name} needs key statistics of layers {missing} "
                            f"(prunecli stats --method {ctx.hparams.method})")


def spread_over_layers(model: torch.nn.Module, tokenizer, adapter: ModelAdapter,  # noqa: ANN001
                       requests: Sequence[EditRequest], ctx: EditContext,
                       solve: LayerSolve) -> tuple[list[LayerUpdate], list[RequestOutcome]]:
    """MEMIT's procedure with the per-layer solve left open (MEMIT and AlphaEdit differ only there): targets z at the
    last edited layer, then for each layer in ascending order the keys and residual on the partly edited model,
    the update from `solve`, added to the model before the next layer's keys are read."""
    layers = sorted(ctx.hparams.layers)
    z_site = adapter.layer_module(layers[-1])
    width = adapter.value_size(layers[-1])
    targets, outcomes = [], []
    for request in requests:
        value = optimize_value(model, tokenizer, z_site, width, request, ctx.prefixes, ctx.hparams)
        targets.append(value.initial + value.delta)
        outcomes.append(RequestOutcome(value.loss, value.initial_loss, value.steps))
    z = torch.stack(targets)  # [n, hidden]
    updates = []
    for i, layer in enumerate(layers):
        keys, bare = subject_keys(model, tokenizer, adapter.projection(layer), requests, ctx.prefixes,
                                  {"z": (z_site, "output")})
        residual = (z - bare["z"]) / (len(layers) - i)
        a, b = solve(layer, residual.T, keys.T)
        adapter.add_update(layer, a @ b.T)
        updates.append(LayerUpdate(layer, a, b))
    return updates, outcomes


class MemitEditor(Editor):
    method = "memit"
    needs_stats = True
    batched = True

    def apply(self, model: torch.nn.Module, tokenizer, adapter: ModelAdapter,  # noqa: ANN001
              requests: Sequence[EditRequest], ctx: EditContext) -> tuple[list[LayerUpdate], list[RequestOutcome]]:
        check_moments(ctx, "MEMIT")
        weight = ctx.hparams.mom2_update_weight
        return spread_over_layers(model, tokenizer, adapter, requests, ctx,
                                  lambda layer, r, k: spread_update(r, k, ctx.moments[layer], weight))
