"""SPHERE (arXiv 2510.01172): keep each edit's update away from the principal directions of the weight it changes.

A weight's rows, normalised to unit length, concentrate around a few principal directions; sequential edits that
push along them disturb what the matrix does for every input. SPHERE projects every update away from them before it
is added: from the weight W in its stored layout with n rows, W_hat = rows / (|row| + 1e-8), C = W_hat^T W_hat / n,
U = the top-r eigenvectors of C with r = 1 + the number of leading eigenvalues whose cumulative share of the trace is
at most `eta`; the update becomes Delta W (I - alpha U U^T) (stored layout, as the official code does: for nn.Linear
that is the input / key side, for GPT-2's Conv1D the output side).

Updates are factored, D = a b^T in math orientation, so the projection is applied to one factor and never densifies
anything or raises the rank: `out_in` storage projects b, `in_out` storage projects a.

The eigenvectors come from the smaller of the two Gram matrices (W_hat^T W_hat or W_hat W_hat^T share their nonzero
eigenvalues), in float64. The user's settings (`SphereSettings`: eta, alpha, which weight) sit in the torch-free
restraint table, `core.restraint_functions`, beside PRUNE's.
"""

from __future__ import annotations

import torch

from prunecli.core.checkpoint import Layout

ROW_EPS = 1e-8
"""Added to each row's norm before normalising (the official code's guard for zero rows)."""


def principal_directions(stored: torch.Tensor, eta: float) -> torch.Tensor:
    """U [d, r] (float64, orthonormal columns): the top eigenvectors of C = W_hat^T W_hat / n of the row-normalised
    stored matrix [n, d], r = 1 + the number of leading eigenvalues whose cumulative share is <= eta."""
    w = stored.detach().to(torch.float64)
    rows = w / (w.norm(dim=1, keepdim=True) + ROW_EPS)
    n, d = rows.shape
    if d <= n:
        values, vectors = torch.linalg.eigh(rows.T @ rows / n)
        values, vectors = values.flip(0), vectors.flip(1)
    else:  # the nonzero spectrum of rows rows^T / n, with eigenvectors rows^T v / sqrt(n * lambda)
        values, small = torch.linalg.eigh(rows @ rows.T / n)
        values, small = values.flip(0), small.flip(1)
        keep = values > values[0] * 1e-12
        values, small = values[keep], small[:, keep]
        vectors = rows.T @ small / torch.sqrt(n * values)
    values = values.clamp_min(0)
    share = torch.cumsum(values, 0) / values.sum()
    r = min(1 + int((share <= eta).sum()), vectors.shape[1])
    return vectors[:, :r]


def project_update(a: torch.Tensor, b: torch.Tensor, layout: Layout, basis: torch.Tensor,
                   alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of D' with stored(D') = stored(D) (I - alpha U U^T), for D = a b^T (a [out, r], b [in, r]); the factor
    on the stored matrix's column side is projected, the other is returned as it is."""
    u = basis.to(torch.float64)

    def away(x: torch.Tensor) -> torch.Tensor:
        x64 = x.to(u.device, torch.float64)
        return (x64 - alpha * (u @ (u.T @ x64))).to(x.device, x.dtype)

    return (a, away(b)) if layout == "out_in" else (away(a), b)
