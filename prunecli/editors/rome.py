"""ROME (Meng et al. 2022) with the R-ROME fix: one rank-1 update of one layer's MLP output projection per fact.

k* = the projection's input at the subject's last token, averaged over the edit prompt after each context prefix;
v* = W k* + delta, delta from the value optimisation at the projection's output (`value.optimize_values`);
u  = C^-1 k* (C = E[k k^T] from `prunecli stats`; C = I without statistics);
Delta W = (v* - W k*) u^T / (u^T k*), so W' k* = v* exactly.
The same k* appears in both places (R-ROME, Gupta et al. 2024): the original code mixed the averaged key with the
bare prompt's key k (denominator u^T k, so W' k = W k + delta on the bare prompt but W' k* != v*), which makes long
sequential runs collapse. `rome_key: original` reproduces that code's update for comparison; the default is
`averaged`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from prunecli.editors import nas
from prunecli.editors.base import EditContext, Editor, LayerUpdate, RequestOutcome
from prunecli.editors.keys import subject_keys
from prunecli.editors.value import ValueHParams, optimize_values
from prunecli.errors import PruneCliError
from prunecli.models.adapters import ModelAdapter
from prunecli.requests import EditRequest

ROME_KEYS = ("averaged", "original")


@dataclass(frozen=True)
class RomeHParams(ValueHParams):
    """ROME's hyper-parameters: the value optimisation's, one layer, and the key handling."""

    method: ClassVar[str] = "rome"
    # R-ROME's key-handling switches (EasyEdit r_rome files) and the value of each that describes prunecli's ROME.
    accepted: ClassVar[dict[str, Any]] = {"original_implementation": False, "enable_prompt_keys": False,
                                          "enable_random_prefix_keys": True}
    # "averaged" (R-ROME: the prefix-averaged key k* in the update and its denominator) or "original" (the published
    # ROME code: u = C^-1 k* but the denominator u^T k of the bare prompt's key), which the R-ROME paper blames for
    # the collapse of long sequential runs.
    rome_key: str = "averaged"

    def validate(self, num_layers: int) -> None:
        super().validate(num_layers)
        if len(self.layers) != 1:
            raise PruneCliError(f"ROME edits exactly one layer, got layers {list(self.layers)}")
        if self.rome_key not in ROME_KEYS:
            raise PruneCliError(f"rome_key must be one of {', '.join(ROME_KEYS)}, got {self.rome_key!r}")


@dataclass(frozen=True)
class MomentInverse:
    """u = C^-1 k for ROME's update: C's LU factorisation (float64), computed once per layer and run and applied to
    each edit's key (factorising a d_in x d_in matrix per edit costs O(d_in^3): 11008-wide on LLaMA-7B)."""

    moment: torch.Tensor  # the statistics it was computed from
    lu: torch.Tensor
    pivots: torch.Tensor

    @staticmethod
    def of(moment: torch.Tensor) -> MomentInverse:
        lu, pivots, info = torch.linalg.lu_factor_ex(moment.double())
        if int(info) != 0:
            raise PruneCliError("the key statistics are singular (too few tokens?); recompute them with more "
                                "--tokens")
        return MomentInverse(moment, lu, pivots)

    def __call__(self, key: torch.Tensor) -> torch.Tensor:
        return torch.linalg.lu_solve(self.lu, self.pivots, key.to(self.lu.device, torch.float64)[:, None])[:, 0]


def rank_one_update(w: torch.Tensor, key: torch.Tensor, v_star: torch.Tensor,
                    inverse: MomentInverse | None = None,
                    denominator_key: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (a [out, 1], b [in, 1]) of Delta W = (v* - W k) (C^-1 k)^T / ((C^-1 k)^T k'), computed in float64,
    with k' = k unless `denominator_key` is given (the original ROME code's bare-prompt key); C = I without
    `inverse`."""
    k = key.double()
    u = inverse(k).to(k.device) if inverse is not None else k
    denom = u @ (k if denominator_key is None else denominator_key.double())
    if not torch.isfinite(denom) or denom <= 0:
        raise PruneCliError(f"degenerate ROME update (u^T k = {float(denom):.3g}); the statistics may be broken")
    residual = v_star.double() - w.double() @ k
    return (residual / denom)[:, None].float(), u[:, None].float()


class RomeEditor(Editor):
    method = "rome"
    hparams = RomeHParams
    nas = True

    def __init__(self) -> None:
        self._inverses: dict[int, MomentInverse] = {}  # layer -> C^-1 of the statistics last used there

    def inverse(self, layer: int, moment: torch.Tensor) -> MomentInverse:
        """C^-1 of `layer`'s statistics, factorised once per editor (one `edit` run)."""
        cached = self._inverses.get(layer)
        if cached is None or cached.moment is not moment:
            cached = self._inverses[layer] = MomentInverse.of(moment)
        return cached

    def value_site(self, adapter: ModelAdapter, hparams: ValueHParams) -> tuple[int, torch.nn.Module]:
        (layer,) = hparams.layers
        return layer, adapter.projection(layer)

    def notes(self, hparams: RomeHParams, has_moments: bool) -> list[str]:  # type: ignore[override]
        if hparams.mom2_adjustment and not has_moments:
            return ["no --stats: ROME uses C = I (no second-moment adjustment); pass --stats for the full method"]
        if not hparams.mom2_adjustment and has_moments:
            return ["mom2_adjustment is false: the statistics are not used"]
        return []

    def apply(self, model: torch.nn.Module, tokenizer, adapter: ModelAdapter,  # noqa: ANN001
              requests: Sequence[EditRequest], ctx: EditContext) -> tuple[list[LayerUpdate], list[RequestOutcome]]:
        (layer,) = ctx.hparams.layers
        projection = adapter.projection(layer)
        moment = ctx.moments.get(layer) if ctx.hparams.mom2_adjustment else None
        inverse = self.inverse(layer, moment) if moment is not None else None
        updates, outcomes = [], []
        for request in requests:  # one after another, each on the model with the previous ones applied
            # The bare prompt's key (original key handling) comes from the same pass: prefixes[0] is "".
            original = ctx.hparams.rome_key == "original"
            keys, seen = subject_keys(model, tokenizer, projection, [request], ctx.prefixes,
                                      {"bare_key": (projection, "input")} if original else None, ctx.key_weights)
            bare = seen["bare_key"][0] if original else None
            w = adapter.weight_matrix(layer)
            (value,) = optimize_values(model, tokenizer, adapter, layer, projection, [request], ctx.prefixes,
                                       ctx.hparams, ctx.value_task)
            v0 = w.double() @ keys[0].double()
            shift, dropped = value.delta.double()[None], [False]
            if ctx.anchor is not None:  # NAS: ROME's whole target W k* + shift gets the anchor's norm
                shift, dropped = nas.rescale(v0[None], shift, ctx.anchor, self.method)
            a, b = ctx.restrain_update(adapter.weight_name(layer),
                                       *rank_one_update(w, keys[0], v0 + shift[0], inverse, bare))
            adapter.add_update(layer, a @ b.T)
            updates.append(LayerUpdate(layer, a, b))
            outcomes.append(RequestOutcome(value.loss, value.initial_loss, value.steps, dropped[0]))
        return updates, outcomes
