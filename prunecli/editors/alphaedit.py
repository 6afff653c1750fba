"""AlphaEdit (Fang et al., ICLR 2025): MEMIT with every update projected onto the null space of the preserved keys.

Keys and targets are MEMIT's (`memit.spread_over_layers`: z at the last edited layer by the value optimisation, the
residual spread over the layers, each layer's keys read on the partly edited model); only the per-layer solve
differs. The official code (jianghoucheng/AlphaEdit, `AlphaEdit_main.py`, commit f5248d3) solves for the transpose,
`solve(P (K K^T + cache_c) + L2 I, P K R^T)`; as a [out, in] update that is

    Delta W = R K^T P [(K_p^T K_p + K K^T) P + L2 I]^-1

- P = U U^T, U = the eigenvectors of the *mean* second moment C0 = sum / count of the keys over a corpus
  (`prunecli stats`) whose eigenvalue is below `nullspace_threshold`. The threshold is absolute and the official
  code applies it to the mean (its statistics divide by the token count), so 2e-2 means the same here: the
  statistics' sum and count are divided before the eigendecomposition (float64 `eigh`).
- K_p [edits, d_in] are the keys of all earlier edits (official `cache_c` = K_p^T K_p): read again on the edited
  model after all layers of a batch are written (unprojected, unscaled, as the official code), and appended.

In U's coordinates (m = null-space dimension, G = U^T [K_p^T, K] [m, N], N = preserved + new keys) this is exactly
Delta W = R b^T with b = U (G G^T + L2 I_m)^-1 U^T K, and by the push-through identity
(G G^T + L2 I_m)^-1 G = G (G^T G + L2 I_N)^-1; whichever of the two symmetric positive definite systems is smaller
is solved, in float64. No d_in x d_in projector is formed: the basis U [d_in, m] (float64, on the statistics'
device) is what is kept, once per (layer, statistics, threshold) for one editor, i.e. one `edit` run. The update is
factored with rank <= batch size, and Delta W v = 0 exactly (up to rounding) for every v in the preserved
eigenspace (orthogonal to U).

Sequential memory across files: K_p is carried in the delta as extra tensors `alphaedit.keys::<weight name>`
([edits, d_in], float32; see `core/delta.py`), so `edit --delta a -o b` preserves the same keys as one run over all
requests; a previous delta without them (made by another method or by `diff`) is refused, since AlphaEdit could
not protect its edits.

Deviations from the official code: float64 solves (it uses float32); keys averaged uniformly over the context
prefixes, as prunecli's MEMIT does (the official compute_ks averages per prefix length group first, giving the bare
prompt weight 1/2 with the default 5 prefixes). `mom2_update_weight` is accepted and recorded but, as officially,
unused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from prunecli.editors.base import EditContext, Editor, LayerUpdate, RequestOutcome
from prunecli.editors.key_memory import KeyMemory
from prunecli.editors.memit import check_moments, spread_over_layers, value_site
from prunecli.editors.value import ValueHParams
from prunecli.errors import PruneCliError
from prunecli.models.adapters import ModelAdapter
from prunecli.requests import EditRequest

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class AlphaEditHParams(ValueHParams):
    """AlphaEdit's hyper-parameters: MEMIT's value optimisation and layers, the null-space threshold and the ridge
    term (the official key names); `mom2_update_weight` is accepted and recorded but, as officially, unused."""

    method: ClassVar[str] = "alphaedit"
    nullspace_threshold: float = 2e-2  # eigenvalues of the mean second moment below this span the null space
    L2: float = 10.0  # ridge term L2 I added after projecting
    # Extra rounds for the edits of a batch that did not take, as MEMIT's (`memit.spread_over_layers`); None: off.
    retry_rounds: int | None = None
    retry_below: float | None = None

    def validate(self, num_layers: int) -> None:
        super().validate(num_layers)
        for key in ("nullspace_threshold", "L2"):
            if not getattr(self, key) > 0:
                raise PruneCliError(f"AlphaEdit needs {key} > 0, got {getattr(self, key)!r}")
        self.require([("retry_rounds", self.retry_rounds is None or self.retry_rounds >= 0),
                      ("retry_below", self.retry_below is None or 0 <= self.retry_below <= 1)])


KEYS_EXTRA = "alphaedit.keys::"  # + weight name: the edited keys [edits, d_in] carried in delta files
MEMORY = KeyMemory(KEYS_EXTRA, "alphaedit", "AlphaEdit key cache", "start a new chain without --delta")


def null_space_basis(moment: torch.Tensor, threshold: float) -> torch.Tensor:
    """U [d, m] (float64): the eigenvectors of the mean second moment C0 with eigenvalue < `threshold`."""
    values, vectors = torch.linalg.eigh(moment.double())
    keep = values < threshold
    if not bool(keep.any()):
        raise PruneCliError(f"no eigenvalue of the key second moment is below nullspace_threshold={threshold:g} "
                            f"(smallest {float(values[0]):.3g}): the null space is empty; raise the threshold")
    return vectors[:, keep]


def null_space_update(residual: torch.Tensor, keys: torch.Tensor, basis: torch.Tensor, preserved: torch.Tensor,
                      l2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (a = R [out, n], b [in, n]) of Delta W = R K^T P [(K_p^T K_p + K K^T) P + L2 I]^-1 with P = U U^T.

    `keys` K [in, n], `basis` U [in, m], `preserved` K_p [N_p, in] (rows = earlier edits' keys). Float64."""
    u = basis.double()
    g_new = u.T @ keys.to(u.device, torch.float64)  # [m, n]
    g = torch.cat([u.T @ preserved.to(u.device, torch.float64).T, g_new], 1)  # [m, N]
    m, total = g.shape
    if total <= m:  # (G G^T + L2 I)^-1 G_new = G (G^T G + L2 I_N)^-1 [last n columns of I_N]
        pick = torch.eye(total, dtype=g.dtype, device=g.device)[:, total - g_new.shape[1]:]
        core = g @ torch.linalg.solve(g.T @ g + l2 * torch.eye(total, dtype=g.dtype, device=g.device), pick)
    else:
        core = torch.linalg.solve(g @ g.T + l2 * torch.eye(m, dtype=g.dtype, device=g.device), g_new)
    return residual.float(), (u @ core).float().to(residual.device)


class AlphaEditEditor(Editor):
    method = "alphaedit"
    hparams = AlphaEditHParams
    needs_stats = True
    batched = True
    nas = True

    def value_site(self, adapter: ModelAdapter, hparams: ValueHParams) -> tuple[int, torch.nn.Module]:
        return max(hparams.layers), value_site(adapter, max(hparams.layers))

    def __init__(self) -> None:
        # (layer, threshold) -> (the moment it was computed from, U): one eigendecomposition per layer and run.
        self._bases: dict[tuple[int, float], tuple[torch.Tensor, torch.Tensor]] = {}

    def basis(self, layer: int, moment: torch.Tensor, threshold: float) -> torch.Tensor:
        cached = self._bases.get((layer, threshold))
        if cached is None or cached[0] is not moment:
            cached = (moment, null_space_basis(moment, threshold))
            self._bases[(layer, threshold)] = cached
        return cached[1]

    def apply(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, adapter: ModelAdapter,
              requests: Sequence[EditRequest], ctx: EditContext) -> tuple[list[LayerUpdate], list[RequestOutcome]]:
        check_moments(ctx, "AlphaEdit")
        hp = ctx.hparams
        layers = sorted(hp.layers)
        MEMORY.prepare(ctx, adapter, layers)

        def solve(layer: int, residual: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            basis = self.basis(layer, ctx.moments[layer], hp.nullspace_threshold)
            return null_space_update(residual, keys, basis, MEMORY.keys(ctx, adapter, layer), hp.L2)

        updates, outcomes = spread_over_layers(model, tokenizer, adapter, requests, ctx, solve)
        MEMORY.remember(model, tokenizer, adapter, requests, ctx, layers)  # the batch's keys join the preserved set
        return updates, outcomes
