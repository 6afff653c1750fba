"""Singular spectra of weight matrices: the fast path (Gram + eigvalsh in float64) and the exact one (SVD).

Full SVDs are slow (DESIGN.md section 4). The singular values of W are the square roots of the eigenvalues of the
smaller Gram matrix W W^T (or W^T W); formed and diagonalised in float64 they are accurate while kappa stays far below
1e7 (relative error of sigma_min about eps64 * kappa^2). `exact=True` uses an SVD in float64 instead.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch


def singular_values(w: torch.Tensor, exact: bool = False, device: str | torch.device | None = None) -> torch.Tensor:
    """All min(m, n) singular values of a 2-D matrix, descending, float64, on the CPU."""
    x = w.to(device or w.device, torch.float64)
    if exact:
        s = torch.linalg.svdvals(x)
    else:
        gram = x @ x.T if x.shape[0] <= x.shape[1] else x.T @ x
        s = torch.linalg.eigvalsh(gram).clamp_min(0.0).sqrt().flip(0)
    return s.cpu()


@dataclass(frozen=True)
class SpectrumStats:
    """Summary of one matrix's spectrum (kappa = sigma_max / sigma_min; inf when singular)."""

    sigma_max: float
    sigma_min: float
    kappa: float
    fro: float
    stable_rank: float

    @classmethod
    def from_singular_values(cls, s: torch.Tensor) -> SpectrumStats:
        smax, smin = float(s[0]), float(s[-1])
        fro = float(torch.sqrt((s.double() ** 2).sum()))
        return cls(smax, smin, smax / smin if smin > 0 else float("inf"), fro,
                   (fro / smax) ** 2 if smax > 0 else 0.0)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def matrix_stats(w: torch.Tensor, exact: bool = False, device: str | torch.device | None = None) -> SpectrumStats:
    """Spectrum summary of a dense matrix."""
    return SpectrumStats.from_singular_values(singular_values(w, exact, device))
