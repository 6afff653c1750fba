"""Exact SVD of factored updates without ever forming the dense matrix.

For D = A B^T with A [out, r], B [in, r]: QR(A) = Qa Ra, QR(B) = Qb Rb, SVD(Ra Rb^T) = Us S Vs^T, hence
D = (Qa Us) S (Qb Vs)^T. Cost O((out + in) r^2 + r^3) instead of O(out * in * min(out, in)) for a dense SVD.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

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
