"""Exact SVD of factored updates without ever forming the dense matrix.

For D = A B^T with A [out, r], B [in, r]: QR(A) = Qa Ra, QR(B) = Qb Rb, SVD(Ra Rb^T) = Us S Vs^T, hence
D = (Qa Us) S (Qb Vs)^T. Cost O((out + in) r^2 + r^3) instead of O(out * in * min(out, in)) for a dense SVD.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from prunecli.core.checkpoint import Layout
from prunecli.core.delta import DeltaEntry


class SVD(NamedTuple):
    """D = u @ diag(s) @ v.T, singular values descending; u [out, k], s [k], v [in, k]."""

    u: torch.Tensor
    s: torch.Tensor
    v: torch.Tensor


def factored_svd(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype = torch.float64) -> SVD:
    """Thin SVD of a @ b.T computed on the factors (k = rank of the factor columns, at most r)."""
    qa, ra = torch.linalg.qr(a.to(dtype))
    qb, rb = torch.linalg.qr(b.to(dtype))
    us, s, vsh = torch.linalg.svd(ra @ rb.T)
    return SVD(qa @ us, s, qb @ vsh.T)


def entry_svd(entry: DeltaEntry, dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu") -> SVD:
    """Thin SVD of a delta entry in math orientation [out, in]: factored when low rank, dense otherwise."""
    if entry.is_lowrank:
        assert entry.a is not None and entry.b is not None
        return factored_svd(entry.a.to(device), entry.b.to(device), dtype)
    assert entry.dense is not None
    u, s, vh = torch.linalg.svd(entry.dense.to(device, dtype), full_matrices=False)
    return SVD(u, s, vh.T)


class Compressed(NamedTuple):
    """A compressed dense update: the entry, the rank kept and the relative Frobenius error of the truncation."""

    entry: DeltaEntry
    rank: int
    rel_error: float


def compress_dense(d: torch.Tensor, layout: Layout, rank: int | None = None, tol: float | None = None,
                          atol: float = 0.0) -> Compressed:
    """Best rank-k approximation of a dense update (Eckart-Young), stored factored when that pays off.

    k is `rank` (capped at min(out, in)); or, with `tol`, the smallest k whose relative Frobenius error
    ||D - D_k||_F / ||D||_F is <= tol; by default the numerical rank, counted like `torch.linalg.matrix_rank`:
    singular values above max(atol, sigma_1 * max(out, in) * eps), eps of d's dtype. `atol` lets the caller
    discount noise
    it knows of, such as the rounding of a checkpoint stored in bf16. A nonzero D keeps at least rank 1.
    The entry is factored (a = U_k S_k, b = V_k) when k <= min(out, in) / 2, dense otherwise; a full-rank dense entry
    is D itself, bit for bit, not its SVD reconstruction.
    """
    if d.ndim != 2:
        raise ValueError(f"compress_dense needs a 2-D update, got shape {list(d.shape)}")
    if rank is not None and tol is not None:
        raise ValueError("give rank or tol, not both")
    if rank is not None and rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if tol is not None and not 0.0 <= tol < 1.0:
        raise ValueError(f"tol must be in [0, 1), got {tol}")
    x = d.detach().to("cpu", torch.float64)
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    full = s.numel()
    # tail[k] = squared Frobenius error of the rank-k truncation = sum of s_i^2 for i >= k.
    tail = torch.cat([(s**2).flip(0).cumsum(0).flip(0), s.new_zeros(1)])
    total = float(tail[0])
    if total == 0.0:
        raise ValueError("the update is zero; there is nothing to compress")
    if rank is not None:
        k = min(rank, full)
    elif tol is not None:
        k = int((tail.sqrt() > tol * total**0.5).sum())  # tail is non-increasing: count of ranks still too coarse
    else:
        eps = torch.finfo(d.dtype if d.is_floating_point() else torch.float32).eps
        cutoff = max(atol, float(s[0]) * max(x.shape) * eps)
        k = int((s > cutoff).sum())
    k = max(k, 1)
    rel_error = float(tail[k].sqrt()) / total**0.5
    if k <= full // 2:
        entry = DeltaEntry.lowrank(u[:, :k] * s[:k], vh[:k].T, layout)
    elif k == full:
        entry, rel_error = DeltaEntry.from_dense(d, layout), 0.0
    else:
        entry = DeltaEntry.from_dense((u[:, :k] * s[:k]) @ vh[:k], layout)
    return Compressed(entry, k, rel_error)
