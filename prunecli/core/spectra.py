"""Singular spectra of weight matrices: the fast path (Gram + eigvalsh in float64) and the exact one (SVD).

Full SVDs are slow (docs/DESIGN.md section 4). The singular values of W are the square roots of the eigenvalues of the
smaller Gram matrix W W^T (or W^T W); formed and diagonalised in float64 they are accurate while kappa stays far below
1e7 (relative error of sigma_min about eps64 * kappa^2). `exact=True` uses an SVD in float64 instead.

The Gram matrix is accumulated over column chunks cast to float64 one at a time, so a float32/bf16 matrix never has a
full float64 copy in memory, and only its upper triangle is formed (block rows times the columns right of the
diagonal block: about 5/8 of the flops of a full product), which `eigvalsh(..., UPLO="U")` reads.

sigma_max alone (what the restraint needs when no kappa is asked for) is `largest_singular_value`: Lanczos on the
float32 Gram matrix, certified in float64; where kappa is computed, sigma_max comes with the spectrum.

Threads: nothing here changes torch's (process-wide) thread count. On a CPU shared with other processes, small
eigvalsh calls run faster on one thread than on several (a descheduled thread stalls the others; docs/RESULTS.md), so
the CLI takes the count once (`prunecli --threads N`, or OMP_NUM_THREADS).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch

FAST_KAPPA_LIMIT = 1e6
"""Above this kappa the fast path's sigma_min loses more than ~1e-4 relative accuracy: use `exact=True`."""

_CHUNK_ELEMENTS = 1 << 23  # float64 chunk of the long side: 64 MiB
_ROW_BLOCKS = 4  # upper-triangle blocking of the Gram product
_VECTOR_CHUNK_ELEMENTS = 1 << 18
"""float64 chunk for matrix-vector products: cache-sized chunks convert faster than large ones (for a 1600 x 6400
float32 W, sigma_max's Rayleigh-Ritz step took 35 ms with these and 123 ms with 64 MiB chunks, one thread, loaded)."""


def _short_side_rows(w: torch.Tensor) -> torch.Tensor:
    """W or W^T, whichever is [m, n] with m <= n: the Gram matrix x x^T is then the smaller one."""
    return w if w.shape[0] <= w.shape[1] else w.T


def _column_chunks(x: torch.Tensor, device: torch.device, dtype: torch.dtype,
                   chunk_elements: int = _CHUNK_ELEMENTS) -> Iterator[tuple[int, torch.Tensor]]:
    """(first column, columns cast to `dtype` on `device`) of x, a few at a time: never a full converted copy."""
    cols = max(1, chunk_elements // max(x.shape[0], 1))
    for j in range(0, x.shape[1], cols):
        yield j, x[:, j:j + cols].to(device, dtype)


def _gram_upper(w: torch.Tensor, device: torch.device, chunk_elements: int = _CHUNK_ELEMENTS,
                dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Upper triangle (diagonal included) of the smaller Gram matrix of `w`; the lower part is garbage."""
    x = _short_side_rows(w)
    m = x.shape[0]
    g = torch.zeros(m, m, dtype=dtype, device=device)
    step = -(-m // _ROW_BLOCKS)
    for _, c in _column_chunks(x, device, dtype, chunk_elements):
        for i in range(0, m, step):
            g[i:i + step, i:].addmm_(c[i:i + step], c[i:].T)
    return g


def _gram(w: torch.Tensor, device: torch.device, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The smaller Gram matrix of `w`, exactly symmetric (upper triangle mirrored)."""
    upper = _gram_upper(w, device, dtype=dtype)
    return upper.triu() + upper.triu(1).T


def singular_values(w: torch.Tensor, exact: bool = False, device: str | torch.device | None = None) -> torch.Tensor:
    """All min(m, n) singular values of a 2-D matrix, descending, float64, on the CPU."""
    dev = torch.device(device) if device is not None else w.device
    if exact:
        s = torch.linalg.svdvals(w.to(dev, torch.float64))
    else:
        s = torch.linalg.eigvalsh(_gram_upper(w, dev), UPLO="U").clamp_min(0.0).sqrt().flip(0)
    return s.cpu()


# ------------------------------------------------------------------------------------------------ sigma_max
_DENSE_UP_TO = 256
"""Smaller side up to this: the float64 Gram eigenvalues directly (cheap at that size)."""
_MAX_DIM = 1024
"""Largest Lanczos basis tried before falling back to the float64 Gram eigenvalues."""
_CHECK_EVERY = 8
"""Lanczos steps between convergence checks (each check is an eigendecomposition of the small projected matrix)."""
_CLUSTER = 1e-3
"""Ritz values within this relative distance of the top one are resolved together by the float64 Rayleigh-Ritz
step: float32 Lanczos separates values that close only slowly."""


def largest_singular_value(w: torch.Tensor, tol: float = 1e-10, device: str | torch.device | None = None) -> float:
    """sigma_max(W) to about `tol` relative accuracy, without a full spectrum; the same for W and W^T.

    PRUNE needs only sigma_max of W; a float64 Gram eigendecomposition of a 1600 x 6400 matrix costs about a second.
    Here: the float32 Gram matrix (one GEMM, the main cost), Lanczos with full reorthogonalisation on it, stopped when
    the Kato-Temple bound resid^2 / (2 gap top) of its top Ritz value(s) is below `tol`, then Rayleigh-Ritz with W
    itself in float64 on those Ritz vectors (their float32 errors enter only squared), accepted only if the float64
    residual confirms the bound. Gaussian matrices, whose top values lie within 0.3 % of each other, are the slow
    case. Small matrices, and anything float32 cannot resolve, get the float64 Gram eigenvalues. Deterministic.
    """
    dev = torch.device(device) if device is not None else w.device
    if w.ndim != 2:
        raise ValueError(f"expected a matrix, got shape {list(w.shape)}")
    x = _short_side_rows(w.detach())
    if x.shape[0] > _DENSE_UP_TO:
        found = _lanczos_top(_gram(x, dev, torch.float32), tol)
        if found is not None:
            sigma = _rayleigh_ritz(x, dev, *found, tol)
            if sigma is not None:
                return sigma
    return float(singular_values(x, device=dev)[0])


def _lanczos_top(gram: torch.Tensor, tol: float) -> tuple[torch.Tensor, float] | None:
    """(Orthonormal float64 basis [m, c] of the Ritz vectors of the top eigenvalue cluster of the symmetric float32
    `gram`, gap from the cluster to the next Ritz value), or None when float32 cannot reach `tol`."""
    m = gram.shape[0]
    max_dim = min(_MAX_DIM, m)
    basis = torch.empty(max_dim, m, dtype=torch.float32, device=gram.device)  # one Lanczos vector per row
    start = torch.randn(m, generator=torch.Generator(device=gram.device).manual_seed(0), device=gram.device)
    basis[0] = start / torch.linalg.vector_norm(start)
    t = torch.zeros(max_dim, max_dim, dtype=torch.float64)  # projected matrix Q^T G Q, from the coefficients
    floor = 4 * torch.finfo(torch.float32).eps
    for k in range(1, max_dim + 1):
        q = basis[:k]
        y = gram @ q[-1]
        for _ in range(2):  # full Gram-Schmidt, twice: float32 loses orthogonality to the earlier vectors
            coef = q @ y
            y -= coef @ q
            t[:k, k - 1] += coef.double().cpu()
        t[k - 1, :k - 1] = t[:k - 1, k - 1]
        beta = float(torch.linalg.vector_norm(y))
        exhausted = beta <= floor * max(float(t[0, 0]), 0.0)  # an invariant subspace (W of low rank, or W = 0)
        if exhausted or k % _CHECK_EVERY == 0 or k == max_dim:
            theta, vecs = torch.linalg.eigh(t[:k, :k])
            top = float(theta[-1])
            if top <= 0.0:  # W = 0
                return q[:1].T.double(), 1.0
            n_cluster = int((theta >= top * (1 - _CLUSTER)).sum())
            cluster = vecs[:, k - n_cluster:]
            resid = 0.0 if exhausted else beta * float(torch.linalg.vector_norm(cluster[-1]))
            gap = top - float(theta[k - n_cluster - 1]) if n_cluster < k else 0.0
            if gap > 0 and 0.5 * resid**2 / (gap * top) <= tol:
                return torch.linalg.qr(q.T.double() @ cluster.to(q.device))[0], gap
            if exhausted or resid <= floor * top:
                return None
        if k < max_dim:
            basis[k] = y / beta
    return None


def _rayleigh_ritz(x: torch.Tensor, device: torch.device, basis: torch.Tensor, gap: float, tol: float) -> float | None:
    """sigma_max of x [m, n] on span(basis) [m, c] in float64, if the float64 residual confirms the bound."""
    z = torch.cat([(basis.T @ c).T for _, c in _column_chunks(x, device, torch.float64, _VECTOR_CHUNK_ELEMENTS)])  # x^T basis: [n, c]
    u, s, vh = torch.linalg.svd(z, full_matrices=False)
    sigma = float(s[0])
    if sigma == 0.0:
        return 0.0
    xu = torch.zeros(x.shape[0], dtype=torch.float64, device=device)
    for j, c in _column_chunks(x, device, torch.float64, _VECTOR_CHUNK_ELEMENTS):
        xu += c @ u[j:j + c.shape[1], 0]
    residual = sigma * xu - sigma**2 * (basis @ vh[0])  # (x x^T - sigma^2) v with v = basis @ vh[0]
    est = 0.5 * float(torch.linalg.vector_norm(residual)) ** 2 / (gap * sigma**2)
    return sigma if est <= tol else None


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
        self.x = _short_side_rows(w).to(dev, torch.float64)  # [m, n], m <= n
        self.gram = _gram(self.x, dev)
        self._base: dict[float, SpectrumStats] = {}  # exact_above -> summary of X alone

    def orient(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(P, Q) of the update a b^T ([out, in], math orientation) in X's orientation, float64."""
        p, q = (b, a) if self.transposed else (a, b)
        return p.to(self.x.device, torch.float64), q.to(self.x.device, torch.float64)

    def project(self, q: torch.Tensor) -> torch.Tensor:
        """X Q, the part of an update's Gram matrix that depends only on Q."""
        return self.x @ q

    def stats(self, p: torch.Tensor | None = None, q: torch.Tensor | None = None, xq: torch.Tensor | None = None,
              exact_above: float = FAST_KAPPA_LIMIT) -> SpectrumStats:
        """Spectrum summary of X + P Q^T (of X alone without factors: computed once, it is asked for repeatedly:
        sigma_max, kappa(W), the strength search's bound); `xq` = `project(q)` when already known."""
        if p is None or q is None or p.shape[1] == 0:
            if exact_above not in self._base:
                self._base[exact_above] = self._summary(self.gram, lambda: self.x, exact_above)
            return self._base[exact_above]
        xq = self.project(q) if xq is None else xq
        cross = p @ xq.T
        return self._summary(self.gram + cross + cross.T + p @ (q.T @ q) @ p.T, lambda: self.x + p @ q.T, exact_above)

    @staticmethod
    def _summary(gram: torch.Tensor, dense: Callable[[], torch.Tensor], exact_above: float) -> SpectrumStats:
        """From the Gram eigenvalues; an exact SVD of the matrix `dense()` builds where kappa is above `exact_above`."""
        eig = torch.linalg.eigvalsh(gram)
        found = SpectrumStats.from_singular_values(eig.clamp_min(0.0).sqrt().flip(0).cpu())
        return found if found.kappa <= exact_above else matrix_stats(dense(), exact=True)
