"""Singular spectra of weight matrices: the Gram paths (eigvalsh of the Gram matrix, in float64 or guarded float32)
and the exact one (SVD).

Full SVDs are slow (docs/DESIGN.md section 4). The singular values of W are the square roots of the eigenvalues of the
smaller Gram matrix W W^T (or W^T W); formed and diagonalised in float64 they are accurate while kappa stays far below
1e7 (relative error of sigma_min about eps64 * kappa^2). `exact=True` uses an SVD in float64 instead.

`precision="float32"` forms and diagonalises the Gram matrix in float32 (half the memory traffic of float64 and about
twice its speed on a CPU) and keeps the result only where it is provably within `FLOAT32_TOLERANCE` of the float64
path; any other matrix goes through the float64 path. The bound: every computed eigenvalue of the m x m Gram matrix is
within delta = c(m) eps32 lambda_max of the exact one (`float32_error_factor`), so sigma_i has a relative error of at
most r / (2 (1 - r)) with r = delta / lambda_i, largest for sigma_min, where r = c(m) eps32 kappa^2. The guard
evaluates that bound at the measured kappa; c(m) carries a margin of at least 3 over the largest errors measured, so
the switch to float64 comes well before the actual error reaches the tolerance (figures in docs/SPECTRA.md). Trained
weights are mostly too ill-conditioned for float32: a Cholesky test turns them away before the eigvalsh, and
`Float32Attempts` stops trying a shape that keeps being turned away.

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

import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch

FAST_KAPPA_LIMIT = 1e6
"""Above this kappa the fast path's sigma_min loses more than ~1e-4 relative accuracy: use `exact=True`."""

Precision = Literal["float32", "float64"]
"""The Gram paths: float64, or float32 guarded by `FLOAT32_TOLERANCE` (float64 wherever that cannot be met)."""
PATH_GRAM32, PATH_GRAM64, PATH_SVD = "gram-float32", "gram-float64", "svd-float64"
"""How a spectrum was computed, as reports name it."""
FLOAT32_TOLERANCE = 1e-3
"""Relative error bound of every singular value the float32 Gram path keeps, against the float64 path."""
_EPS32 = torch.finfo(torch.float32).eps
_FLOAT32_EXACT = (torch.float32, torch.bfloat16, torch.float16)
"""Stored dtypes the float32 path reads without rounding (wider ones go through float64)."""

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


def float32_error_factor(m: int) -> float:
    """c(m) in the float32 path's bound |computed lambda_i - lambda_i| <= c(m) eps32 lambda_max (m x m Gram matrix).

    Two errors add up: the float32 Gram product's (products of float32/bf16/fp16 values round once or not at all,
    the sums round; a few eps32 lambda_max at most) and float32 eigvalsh's (the backward error of the Householder
    tridiagonalisation, which grows about linearly with m). 4 + m / 5 is at least three times the largest sum of
    both measured at every m from 256 to 4096 (`benchmarks/spectra_float32_error.py`, figures in docs/SPECTRA.md).
    """
    return 4.0 + m / 5.0


def _float32_trusted(m: int, kappa: float) -> bool:
    """Whether the float32 path's bound at this measured kappa is within `FLOAT32_TOLERANCE` (module docstring)."""
    c = float32_error_factor(m) * _EPS32
    r = c * kappa**2 / (1 - c)  # delta / lambda_min, with lambda_max <= computed lambda_max + delta folded in
    return r < 1 and r / (2 * (1 - r)) <= FLOAT32_TOLERANCE


def float32_kappa_limit(m: int) -> float:
    """The largest measured kappa at which the float32 path keeps its result for an m x m Gram matrix."""
    c = float32_error_factor(m) * _EPS32
    r = 2 * FLOAT32_TOLERANCE / (1 + 2 * FLOAT32_TOLERANCE)
    return math.sqrt(r * (1 - c) / c)


class Float32Attempts:
    """Which matrices the float32 path is tried on during one pass over a checkpoint.

    A rejected attempt costs the float32 Gram matrix and a Cholesky factorisation on top of the float64 path (about
    a fifth more). Trained weights are mostly too ill-conditioned for float32, and a checkpoint repeats each shape
    once per layer with similar conditioning, so a shape whose last `give_up_after` attempts were all rejected is
    not attempted again in this pass; an accepted attempt resets its count. Only the speed depends on this: every
    matrix's values are within `FLOAT32_TOLERANCE` of the float64 path either way, and its report names its path.
    """

    def __init__(self, give_up_after: int = 2) -> None:
        self.give_up_after = give_up_after
        self._rejected: dict[tuple[int, int], int] = {}  # shape -> consecutive rejections

    def worth_trying(self, shape: tuple[int, int]) -> bool:
        return self._rejected.get(shape, 0) < self.give_up_after

    def record(self, shape: tuple[int, int], accepted: bool) -> None:
        self._rejected[shape] = 0 if accepted else self._rejected.get(shape, 0) + 1


def _gram32_singular_values(w: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """Singular values from the float32 Gram matrix and float32 eigvalsh, or None where the guard does not trust
    them (kappa too large for `FLOAT32_TOLERANCE`, a singular or zero matrix) or w is stored wider than float32."""
    if w.dtype not in _FLOAT32_EXACT:
        return None
    m = min(w.shape)
    g = _gram_upper(w, device, dtype=torch.float32)
    # kappa <= limit needs lambda_min >= lambda_max / limit^2 >= max_i G_ii / limit^2 (a Rayleigh quotient), i.e. a
    # positive definite G - shift I: a Cholesky factorisation (a fifth of eigvalsh's cost) turns the hopeless away.
    shifted = g.clone()
    shifted.diagonal().sub_(float(g.diagonal().max()) / float32_kappa_limit(m) ** 2)
    if int(torch.linalg.cholesky_ex(shifted, upper=True).info) != 0:
        return None
    del shifted
    eig = torch.linalg.eigvalsh(g, UPLO="U").double()
    top, low = float(eig[-1]), float(eig[0])
    if low <= 0.0 or not math.isfinite(top) or not _float32_trusted(m, math.sqrt(top / low)):
        return None
    return eig.sqrt().flip(0)


def spectrum(w: torch.Tensor, exact: bool = False, device: str | torch.device | None = None,
             precision: Precision = "float64", attempts: Float32Attempts | None = None) -> tuple[torch.Tensor, str]:
    """(all min(m, n) singular values of a 2-D matrix, descending, float64, on the CPU; the path that computed
    them: `PATH_SVD` with `exact`, else `PATH_GRAM32` where `precision="float32"` could be trusted, else
    `PATH_GRAM64`). `attempts` skips the float32 attempt on shapes that keep failing it (`Float32Attempts`)."""
    dev = torch.device(device) if device is not None else w.device
    if exact:
        return torch.linalg.svdvals(w.to(dev, torch.float64)).cpu(), PATH_SVD
    shape = (w.shape[0], w.shape[1])
    if precision == "float32" and (attempts is None or attempts.worth_trying(shape)):
        s = _gram32_singular_values(w, dev)
        if attempts is not None:
            attempts.record(shape, s is not None)
        if s is not None:
            return s.cpu(), PATH_GRAM32
    return torch.linalg.eigvalsh(_gram_upper(w, dev), UPLO="U").clamp_min(0.0).sqrt().flip(0).cpu(), PATH_GRAM64


def singular_values(w: torch.Tensor, exact: bool = False, device: str | torch.device | None = None) -> torch.Tensor:
    """All min(m, n) singular values of a 2-D matrix, descending, float64, on the CPU (the float64 paths of
    `spectrum`)."""
    return spectrum(w, exact, device)[0]


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
    # x^T basis: [n, c]
    z = torch.cat([(basis.T @ c).T for _, c in _column_chunks(x, device, torch.float64, _VECTOR_CHUNK_ELEMENTS)])
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
