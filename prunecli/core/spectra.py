"""Singular spectra of weight matrices: the fast path (Gram + eigvalsh in float64) and the exact one (SVD).

Full SVDs are slow (docs/DESIGN.md section 4). The singular values of W are the square roots of the eigenvalues of the
smaller Gram matrix W W^T (or W^T W); formed and diagonalised in float64 they are accurate while kappa stays far below
1e7 (relative error of sigma_min about eps64 * kappa^2). `exact=True` uses an SVD in float64 instead.

The Gram matrix is accumulated over column chunks cast to float64 one at a time, so a float32/bf16 matrix never has a
full float64 copy in memory, and only its upper triangle is formed (block rows times the columns right of the
diagonal block: about 5/8 of the flops of a full product), which `eigvalsh(..., UPLO="U")` reads.

On the CPU, eigvalsh of a Gram matrix up to 2048 x 2048 runs on one thread: its tridiagonal reduction is a long chain
of small memory-bound steps, each a thread synchronisation. Measured on our 2-core box for n = 1600: 0.27 s on one
thread vs 0.49 s on two when lightly loaded, 1.3-3.6 s on two when other processes compete for the cores. Larger
matrices keep torch's thread count (not measured here; more work per step should amortise the synchronisation).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch

FAST_KAPPA_LIMIT = 1e6
"""Above this kappa the fast path's sigma_min loses more than ~1e-4 relative accuracy: use `exact=True`."""

_CHUNK_ELEMENTS = 1 << 23  # float64 chunk of the long side: 64 MiB
_ROW_BLOCKS = 4  # upper-triangle blocking of the Gram product
_SINGLE_THREAD_EIG_MAX = 2048


def _gram_upper(w: torch.Tensor, device: torch.device, chunk_elements: int = _CHUNK_ELEMENTS) -> torch.Tensor:
    """Upper triangle (diagonal included) of the smaller Gram matrix of `w` in float64; the lower part is garbage."""
    x = w if w.shape[0] <= w.shape[1] else w.T  # [m, n] with m <= n: gram = x x^T is m x m
    m, n = x.shape
    g = torch.zeros(m, m, dtype=torch.float64, device=device)
    step = -(-m // _ROW_BLOCKS)
    cols = max(1, chunk_elements // max(m, 1))
    for j in range(0, n, cols):
        c = x[:, j:j + cols].to(device, torch.float64)
        for i in range(0, m, step):
            g[i:i + step, i:].addmm_(c[i:i + step], c[i:].T)
    return g


@contextlib.contextmanager
def single_cpu_thread(device: torch.device | str | None, enabled: bool = True) -> Iterator[None]:
    """Run small CPU kernels on one thread, restoring torch's (process-wide) thread count afterwards.

    With a thread team per call, a shared CPU stalls each call whenever a team member is descheduled (see the module
    docstring); at these sizes one thread costs little on an idle machine. CUDA work is not affected."""
    if not enabled or (device is not None and torch.device(device).type != "cpu"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def singular_values(w: torch.Tensor, exact: bool = False, device: str | torch.device | None = None) -> torch.Tensor:
    """All min(m, n) singular values of a 2-D matrix, descending, float64, on the CPU."""
    dev = torch.device(device) if device is not None else w.device
    if exact:
        s = torch.linalg.svdvals(w.to(dev, torch.float64))
    else:
        gram = _gram_upper(w, dev)
        with single_cpu_thread(dev, gram.shape[0] <= _SINGLE_THREAD_EIG_MAX):
            eig = torch.linalg.eigvalsh(gram, UPLO="U")
        s = eig.clamp_min(0.0).sqrt().flip(0)
    return s.cpu()


def numerical_rank(s: torch.Tensor, shape: tuple[int, int], eps: float = torch.finfo(torch.float32).eps) -> int:
    """Number of singular values above s_max * max(shape) * eps (numpy's `matrix_rank` rule).

    The default eps is float32's because the matrices we look at (weights, delta factors) are stored in float32 or
    less: columns that agree to float32 precision are dependent for every practical purpose.
    """
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0
    return int((s > float(s[0]) * max(shape) * eps).sum())


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


class UpdatedSpectra:
    """Extreme singular values of W + P Q^T for many low-rank updates of one matrix W, from W's Gram matrix formed once.

    kappa(W + D) for a low-rank D = P Q^T (a search over restraint strengths, a check after every edit) would need a
    dense m x n sum and its spectrum each time. With X = W oriented so that m <= n (`transposed` says whether X = W^T,
    and `orient` turns math-orientation factors into X's),

        (X + P Q^T)(X + P Q^T)^T = X X^T + P (X Q)^T + (X Q) P^T + P (Q^T Q) P^T,

    so after X X^T (once, float64) each update costs X Q (m n r; reusable while Q is fixed, as in a strength search)
    and an m x m eigvalsh: W + D is never formed. float64 Gram spectra are accurate while kappa is far below 1e7
    (module docstring); above `FAST_KAPPA_LIMIT` the update is densified once for an exact SVD unless the caller
    only needs to know that kappa is large (`exact_above=math.inf`).
    """

    def __init__(self, w: torch.Tensor, device: str | torch.device | None = None) -> None:
        dev = torch.device(device) if device is not None else w.device
        self.transposed = w.shape[0] > w.shape[1]
        self.x = (w.T if self.transposed else w).to(dev, torch.float64)  # [m, n], m <= n
        upper = _gram_upper(self.x, dev)
        self.gram = upper.triu() + upper.triu(1).T

    def orient(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(P, Q) of the update a b^T ([out, in], math orientation) in X's orientation, float64."""
        p, q = (b, a) if self.transposed else (a, b)
        return p.to(self.x.device, torch.float64), q.to(self.x.device, torch.float64)

    def project(self, q: torch.Tensor) -> torch.Tensor:
        """X Q, the part of an update's Gram matrix that depends only on Q."""
        return self.x @ q

    def stats(self, p: torch.Tensor | None = None, q: torch.Tensor | None = None, xq: torch.Tensor | None = None,
              exact_above: float = FAST_KAPPA_LIMIT) -> SpectrumStats:
        """Spectrum summary of X + P Q^T (of X alone without factors); `xq` = `project(q)` when already known."""
        g = self.gram
        if p is not None and q is not None and p.shape[1] > 0:
            xq = self.project(q) if xq is None else xq
            cross = p @ xq.T
            g = g + cross + cross.T + p @ (q.T @ q) @ p.T
        with single_cpu_thread(g.device, g.shape[0] <= _SINGLE_THREAD_EIG_MAX):
            eig = torch.linalg.eigvalsh(g)
        found = SpectrumStats.from_singular_values(eig.clamp_min(0.0).sqrt().flip(0).cpu())
        if found.kappa <= exact_above:
            return found
        dense = self.x if p is None or q is None else self.x + p @ q.T
        return matrix_stats(dense, exact=True)
