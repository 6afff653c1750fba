"""From a wanted shift of the residual stream to the shift of an MLP projection's output that produces it.

MEMIT-style editors (MEMIT, AlphaEdit) find target residual-stream vectors and ask each edited layer to add a share r
of the remaining shift. The update of the projection W is solved for a change R of the projection output
(Delta W K ~ R). In a "residual += mlp(x)" block R = r. In Gemma-2/3 the block adds norm(m) instead, where m is the
projection output and `norm` an RMSNorm with large gains (Gemma-3-270M: |m| ~ 3 while |norm(m)| ~ 800 and the
residual stream ~ 2600 at layer 4): adding r to m then moves the residual stream by norm(m + r) - norm(m), which is
neither r in direction nor in size, and an r of residual-stream size (hundreds) added to an m of size 3 needs a
weight update hundreds of times too large. That is why MEMIT destroyed Gemma-3 without reaching any target.

Here R is the change that makes norm(m + R) = norm(m) + r: x = m + R solves min_x |norm(x) - (norm(m) + r)|^2
(L-BFGS on the norm module itself, so any normalisation works). Normalisations are invariant to the scale of their
input, so the solution is a ray; the point on it closest to m is taken (the smallest weight change). When
norm(m) + r is not reachable (an RMSNorm output has a fixed gain-weighted size), the closest reachable vector is
used and the editor's next layer takes the rest, as MEMIT's spreading does anyway.
"""

from __future__ import annotations

import torch

from prunecli.models.adapters import ModelAdapter

# L-BFGS budget of the inversion; it converges in a few dozen iterations for reachable targets.
_MAX_ITER = 200


def invert_norm(norm: torch.nn.Module, current: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """x [n, d] with norm(x) as close to `target` [n, d] as the norm allows, on the ray closest to `current`."""
    param = next(norm.parameters())
    target = target.float()
    scale = current.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    # Solve on unit-size inputs (the norm does not see the scale), which keeps L-BFGS well conditioned.
    x = (current.float() / scale).clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([x], lr=1.0, max_iter=_MAX_ITER, history_size=20, tolerance_grad=1e-12,
                                  tolerance_change=1e-16, line_search_fn="strong_wolfe")
    size = (target ** 2).sum().clamp_min(1e-30)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = ((norm(x.to(param.device, param.dtype)).to(target.device, torch.float32) - target) ** 2).sum() / size
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    x = x.detach()
    along = (x * current.float()).sum(-1, keepdim=True) / (x * x).sum(-1, keepdim=True)
    same_size = scale / x.norm(dim=-1, keepdim=True)
    return x * torch.where(along > 0, along, same_size)


def projection_shift(adapter: ModelAdapter, layer: int, residual_shift: torch.Tensor,
                     current: torch.Tensor | None) -> torch.Tensor:
    """The change [n, d] of layer `layer`'s projection output that adds `residual_shift` [n, d] to the residual
    stream, given the projection's current output `current` [n, d] (needed only for post-MLP-norm blocks).

    For "residual += mlp(x)" blocks this is `residual_shift` itself (the same tensor, so such models' edits are
    unchanged bit for bit)."""
    norm = adapter.mlp_output_norm(layer)
    if norm is None:
        return residual_shift
    if current is None:
        raise ValueError(f"layer {layer} normalises its MLP output: its current projection output is needed")
    param = next(norm.parameters())
    with torch.no_grad():
        target = norm(current.to(param.device, param.dtype)).to(current.device, torch.float32) + residual_shift.float()
    return invert_norm(norm, current, target) - current.float()


def needs_projection_output(adapter: ModelAdapter, layer: int) -> bool:
    """Whether `projection_shift` needs the projection's current output at this layer."""
    return adapter.mlp_output_norm(layer) is not None
