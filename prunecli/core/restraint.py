"""PRUNE (arXiv 2405.16821, ICLR 2025): restrain the large singular values of an accumulated edit delta.

Given the base matrix W (never edited) and the accumulated update D = U diag(s) V^T, every s_i above
smax = sigma_max(W) is replaced by F(s_i) and D' = U diag(s') V^T:

    log:    F(s) = log_a(s) - log_a(smax) + smax          (a = alpha > 1)
    linear: F(s) = s / b + (b - 1) / b * smax             (b = beta > 1)

Like the released PRUNE code, D is first truncated to its numerical rank (NumPy `matrix_rank`'s default tolerance).
Unlike it, nothing is densified: the SVD of a factored delta is computed on its factors (`lowrank.entry_svd`), the
result is rebuilt as factors (rank never grows), and smax comes from Lanczos (`base_sigma_max`), not a full SVD of W.

Trap: log F only shrinks s when smax * ln(alpha) >= 1 (d/ds (s - F(s)) = 1 - 1 / (s ln alpha)); below that it
*enlarges* the singular values just above smax. By default the paper's formula is applied as is (so results match the
paper and its code) and the result carries a warning that counts the enlarged values; `clamp=True` uses
min(s, F(s)) instead, which never enlarges anything.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch

from prunecli.core.checkpoint import Checkpoint
from prunecli.core.delta import Delta, DeltaEntry
from prunecli.core.lowrank import entry_svd
from prunecli.core.spectra import (FAST_KAPPA_LIMIT, matrix_stats, numerical_rank, single_cpu_thread,
                                   singular_values)
from prunecli.errors import PruneCliError

RestraintFn = Literal["log", "linear"]
FUNCTIONS: tuple[str, ...] = ("log", "linear")
N_TOP = 5
"""How many leading singular values of D and D' the reports show."""

# ------------------------------------------------------------------------------------------ sigma_max of W
_DENSE_UP_TO = 256
"""Smaller side up to this: float64 Gram eigenvalues directly (cheap at that size)."""
_GRAM_UP_TO = 2048
"""Smaller side up to this: Lanczos on the explicit float32 Gram matrix. Forming it is one efficient GEMM (0.1 s for
1600x6400 on 2 CPU cores) after which a Lanczos step costs a matrix-vector product on a cache-resident m x m matrix;
block steps on W itself run at half the GEMM speed and need 25-30 of them (0.2 s) when the top values are close (random
matrices). Above this size the Gram matrix costs more than the block steps: Lanczos works on W."""
_BLOCK = 16
"""Block size on W: float32 GEMMs with 16 right-hand sides cost about as much as with 1 and far less than with 4-12
(MKL on the 2 AMD cores we measured), and blocks find close top values in fewer passes over W."""
_CLUSTER = 1e-3
"""Top Ritz values within this relative distance form one cluster: float32 Lanczos separates values that close only
slowly, the float64 Rayleigh-Ritz step on all the cluster's Ritz vectors does it exactly."""
_MAX_DIM = 1024
"""Largest Krylov basis tried before falling back to the float64 Gram eigenvalues."""


def base_sigma_max(w: torch.Tensor, tol: float = 1e-10, device: str | torch.device | None = None) -> float:
    """Largest singular value of a base matrix, to about `tol` relative accuracy, without a full SVD.

    A full SVD of a 1600x6400 matrix takes seconds on CPU, a float64 Gram eigendecomposition half a second; PRUNE
    only needs sigma_max. Lanczos with full reorthogonalisation finds the top eigenvector of the Gram operator W W^T
    in float32 (fast), on an explicit float32 Gram matrix or, for big matrices, blockwise on W; it stops when a
    Kato-Temple estimate of the error is below `tol`. The Rayleigh quotient of the top Ritz vector(s) is then
    evaluated in float64 with W itself, so the float32 errors of the vector enter only squared, and the float64
    residual must confirm the estimate. Random (Gaussian) matrices, whose top singular values lie within 0.3 % of each
    other, are the slow case. Small matrices, and anything float32 cannot resolve, use the float64 Gram eigenvalues.
    Deterministic (fixed seed). Transposing W gives the same value: callers may pass the tensor in its stored layout.
    """
    x = w.detach().to(device or w.device)
    if x.ndim != 2:
        raise ValueError(f"expected a matrix, got shape {list(x.shape)}")
    m = min(x.shape)
    if m > _DENSE_UP_TO:
        x = x.contiguous()
        row_side = x.shape[0] <= x.shape[1]  # Lanczos vectors live on the smaller side
        x32 = x.float()
        if m <= _GRAM_UP_TO:
            gram = _gram32(x32, row_side)
            with single_cpu_thread(x.device):  # matrix-vector products on a cached matrix: one thread is enough
                found = _lanczos_top(lambda q: gram @ q, m, 1, tol, x.device)
        else:  # blocks of W: GEMMs that use all threads
            apply = (lambda q: x32 @ (x32.T @ q)) if row_side else (lambda q: x32.T @ (x32 @ q))
            found = _lanczos_top(apply, m, _BLOCK, tol, x.device)
        if found is not None:
            with single_cpu_thread(x.device):
                sigma = _certified_sigma(x, row_side, *found, tol)
            if sigma is not None:
                return sigma
    return float(singular_values(x)[0])


def _gram32(x32: torch.Tensor, row_side: bool, blocks: int = 4) -> torch.Tensor:
    """The smaller Gram matrix in float32: block rows from the diagonal rightwards (5/8 of the flops of a full
    product), the blocks below the diagonal copied from their transposes (exactly symmetric)."""
    a = x32 if row_side else x32.T
    m = a.shape[0]
    g = torch.empty(m, m, dtype=torch.float32, device=a.device)
    step = -(-m // blocks)
    for i in range(0, m, step):
        g[i:i + step, i:] = a[i:i + step] @ a[i:].T
        g[i + step:, i:i + step] = g[i:i + step, i + step:].T
    return g


def _lanczos_top(apply: Callable[[torch.Tensor], torch.Tensor], m: int, p: int, tol: float,
                 device: torch.device) -> tuple[torch.Tensor, float] | None:
    """(Orthonormal float64 basis [m, c] of the Ritz vectors of the top eigenvalue cluster, gap from the cluster to
    the next Ritz value) of the float32 symmetric operator `apply`, by block Lanczos with block size p; None when
    float32 cannot reach `tol`. The Ritz values come from T = Q^T A Q, filled from the Gram-Schmidt coefficients."""
    max_dim = min(_MAX_DIM, m - p)
    gen = torch.Generator(device=device).manual_seed(0)
    basis = torch.empty(max_dim + p, m, dtype=torch.float32, device=device)  # one Lanczos vector per (contiguous) row
    basis[:p] = torch.linalg.qr(torch.randn(m, p, generator=gen, device=device))[0].T
    t = torch.zeros(max_dim, max_dim, dtype=torch.float64, device=device)
    floor = 4 * torch.finfo(torch.float32).eps
    k, next_check, last = p, 3, None
    while k <= max_dim:
        q = basis[:k]
        y = apply(basis[k - p:k].T)
        norms = torch.linalg.vector_norm(y, dim=0)
        # A Q_j lies in span(Q_j-1, Q_j, Q_j+1), so the first Gram-Schmidt pass needs only the last two blocks; the
        # second, full pass restores the orthogonality to all blocks that float32 loses.
        near = q[max(0, k - 2 * p):]
        local = near @ y
        y -= near.T @ local
        coef = q @ y
        y -= q.T @ coef
        coef = coef.double()
        coef[max(0, k - 2 * p):] += local.double()
        t[:k, k - p:k] = coef
        t[k - p:k, :k] = coef.T
        new_block, r = torch.linalg.qr(y)
        steps = k // p
        if steps >= next_check or k + p > max_dim:
            theta, vecs = torch.linalg.eigh(t[:k, :k])
            top = float(theta[-1])
            if top <= 0.0:  # W = 0
                return torch.eye(m, 1, dtype=torch.float64, device=device), 1.0
            n_cluster = int((theta >= top * (1 - _CLUSTER)).sum())
            cluster = vecs[:, k - n_cluster:]
            # Kato-Temple: eigenvalue error ~ residual^2 / gap, the gap taken to the first Ritz value outside the
            # cluster (float64 Rayleigh-Ritz resolves the cluster itself); with none outside yet, the rest of the
            # spectrum is unknown and nothing can be certified. The Lanczos residual is r @ last rows.
            resid = float(torch.linalg.matrix_norm(r.double() @ cluster[k - p:]))
            gap = top - float(theta[k - n_cluster - 1]) if n_cluster < k else 0.0
            est = 0.5 * resid**2 / (gap * top) if gap > 0 else math.inf
            if est <= tol:
                return torch.linalg.qr(q.T.double() @ cluster)[0], gap
            if resid <= floor * top:
                return None
            # An eigendecomposition per step can cost more than the step: extrapolate the (accelerating) geometric
            # decay of the estimate to the next check, at most half the steps done so far ahead.
            step = 2
            if last is not None and est < last[1] < math.inf:
                rate = (est / last[1]) ** (1 / (steps - last[0]))
                step = math.ceil(math.log(tol / est) / math.log(rate))
            next_check = steps + max(1, min(step, max(2, steps // 2)))
            last = (steps, est)
        if bool((r.diagonal().abs() < 1e-3 * norms).any()):
            # Cancellation (W of low rank, an invariant subspace found): orthogonality of the normalised block is
            # lost by the ratio of the norms, so it is orthogonalised once more.
            new_block -= q.T @ (q @ new_block)
            new_block = torch.linalg.qr(new_block)[0]
        basis[k:k + p] = new_block.T
        k += p
    return None


def _certified_sigma(x: torch.Tensor, row_side: bool, basis: torch.Tensor, gap: float, tol: float) -> float | None:
    """sigma_max from float64 Rayleigh-Ritz of W on `basis`, if the float64 residual confirms the error estimate."""
    z = _mul64(x, basis, transpose=row_side)  # W^T X (or W X for a tall W): [long side, c]
    _, s, vh = torch.linalg.svd(z, full_matrices=False)
    sigma = float(s[0])
    if sigma == 0.0:
        return 0.0
    v = basis @ vh[0]
    residual = _mul64(x, z @ vh[0], transpose=not row_side) - sigma**2 * v  # (W W^T - sigma^2) v
    est = 0.5 * float(torch.linalg.vector_norm(residual)) ** 2 / (gap * sigma**2)
    return sigma if est <= tol else None


def _mul64(x: torch.Tensor, v: torch.Tensor, transpose: bool) -> torch.Tensor:
    """X^T v or X v in float64, converting X a few rows at a time: never a full float64 copy, and each chunk stays
    below torch's parallel grain size (32768 elements), so no thread team is started per chunk (on a shared CPU that
    stalls: 64-row chunks took 30x longer than 5-row ones under load)."""
    chunk = max(1, 32768 // max(1, x.shape[1]))
    if not transpose:
        return torch.cat([x[i:i + chunk].double() @ v for i in range(0, x.shape[0], chunk)])
    out = torch.zeros((x.shape[1], *v.shape[1:]), dtype=torch.float64, device=x.device)
    for i in range(0, x.shape[0], chunk):
        out += x[i:i + chunk].T.double() @ v[i:i + chunk]
    return out


# ------------------------------------------------------------------------------------------------ F and checks
def check_params(fn: str, alpha: float, beta: float) -> None:
    """Reject what makes F meaningless, as one user-facing line."""
    if fn not in FUNCTIONS:
        raise PruneCliError(f"unknown restraint function {fn!r} (choose one of {', '.join(FUNCTIONS)})")
    if not (math.isfinite(alpha) and alpha > 1):
        raise PruneCliError(f"--alpha must be a finite number > 1 (the base of the log in F), got {alpha}")
    if not (math.isfinite(beta) and beta > 1):
        raise PruneCliError(f"--beta must be a finite number > 1 (the slope divisor of linear F), got {beta}")


def restraint_values(s: torch.Tensor, sigma_max: float, fn: RestraintFn = "log", alpha: float = 1.2,
                     beta: float = 2.0) -> torch.Tensor:
    """F(s) where s > sigma_max, s elsewhere (the paper's formula, no clamping)."""
    if fn == "log":
        f = (torch.log(s) - math.log(sigma_max)) / math.log(alpha) + sigma_max
    else:
        f = s / beta + (beta - 1) / beta * sigma_max
    return torch.where(s > sigma_max, f, s)


# ----------------------------------------------------------------------------------------------- one entry
@dataclass(frozen=True)
class RestraintInfo:
    """What restraining one update did (`smax_ln_alpha` is None for linear F)."""

    sigma_max: float
    rank: int
    n_restrained: int
    top_before: list[float]
    top_after: list[float]
    smax_ln_alpha: float | None
    n_enlarged: int
    clamped: bool

    @property
    def enlarges(self) -> bool:
        """log F enlarges singular values just above sigma_max (sigma_max * ln(alpha) < 1)."""
        return self.smax_ln_alpha is not None and self.smax_ln_alpha < 1

    @property
    def warning(self) -> str | None:
        """The sigma_max * ln(alpha) < 1 warning, saying what was done about it, or None."""
        if not self.enlarges:
            return None
        if self.n_enlarged == 0:
            what = "no singular value of this delta is in that range"
        elif self.clamped:
            what = f"clamped to min(s, F(s)): {self.n_enlarged} value(s) kept unchanged instead"
        else:
            what = (f"applied as in the paper: {self.n_enlarged} singular value(s) of the delta got larger "
                    "(--clamp keeps them unchanged; a larger --alpha avoids it)")
        return (f"sigma_max(W) * ln(alpha) = {self.sigma_max:.4g} * ln(alpha) = {self.smax_ln_alpha:.3g} < 1: "
                f"log F enlarges singular values just above sigma_max; {what}")

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "enlarges": self.enlarges, "warning": self.warning}


def restrain_entry(entry: DeltaEntry, sigma_max: float, fn: RestraintFn = "log", alpha: float = 1.2,
                   beta: float = 2.0, clamp: bool = False,
                   device: str | torch.device | None = None) -> tuple[DeltaEntry, RestraintInfo]:
    """PRUNE on one update, given sigma_max of its base matrix; the result keeps the entry's layout.

    Low-rank entries are never densified: exact SVD on the factors, truncation to numerical rank, F, then
    a' = U diag(s'), b' = V, so rank(D') <= rank(D). Dense entries go through a dense SVD and come back as factors
    when their numerical rank is at most half the smaller side (cheaper and exact), dense otherwise.
    """
    check_params(fn, alpha, beta)
    if not (math.isfinite(sigma_max) and sigma_max > 0):
        raise PruneCliError(f"sigma_max of the base matrix is {sigma_max}; PRUNE needs a positive finite value")
    device = device or "cpu"
    # A dense SVD is big enough for all threads; the factored one is not.
    with single_cpu_thread(device, enabled=entry.is_lowrank):
        svd = entry_svd(entry, device=device)
        rank = numerical_rank(svd.s, entry.shape)  # NumPy matrix_rank's rule with float32 eps, as the reference
        u, s, v = svd.u[:, :rank], svd.s[:rank], svd.v[:, :rank]
        f = restraint_values(s, sigma_max, fn, alpha, beta)
        above = s > sigma_max
        enlarged = above & (f > s)
        new_s = torch.minimum(f, s) if clamp else f
        a = u * new_s
        if entry.is_lowrank or rank <= min(entry.shape) // 2:
            new_entry = DeltaEntry.lowrank(a, v, entry.layout)
        else:
            new_entry = DeltaEntry.from_dense(a @ v.T, entry.layout)
    info = RestraintInfo(sigma_max=sigma_max, rank=rank, n_restrained=int(above.sum()),
                         top_before=s[:N_TOP].tolist(), top_after=new_s[:N_TOP].tolist(),
                         smax_ln_alpha=sigma_max * math.log(alpha) if fn == "log" else None,
                         n_enlarged=int(enlarged.sum()), clamped=clamp)
    return new_entry, info


# ------------------------------------------------------------------------------------------------ whole delta
@dataclass(frozen=True)
class TensorReport:
    """Per-tensor result of `restrain_delta` (kappas are None when not computed)."""

    name: str
    info: RestraintInfo
    kappa_base: float | None = None
    kappa_edited: float | None = None
    kappa_pruned: float | None = None

    def to_json(self) -> dict[str, Any]:
        i = self.info
        return {"name": self.name, "sigma_max_base": i.sigma_max, "n_restrained": i.n_restrained, "rank": i.rank,
                "kappa_base": self.kappa_base, "kappa_edited": self.kappa_edited, "kappa_pruned": self.kappa_pruned,
                "top_before": i.top_before, "top_after": i.top_after, "n_enlarged": i.n_enlarged,
                "warning": i.warning}


def restrain_delta(delta: Delta, base: Checkpoint, fn: RestraintFn = "log", alpha: float = 1.2, beta: float = 2.0,
                   kappa: bool = True, progress: Callable[[str], None] | None = None, *, clamp: bool = False,
                   sigma_cache: dict[str, float] | None = None,
                   device: str | torch.device | None = None) -> tuple[Delta, list[TensorReport]]:
    """Apply PRUNE to every entry of `delta` against the unedited `base`; returns the new delta and reports.

    Base matrices are read one at a time. `kappa=True` also reports kappa(W), kappa(W + D), kappa(W + D') (dense
    float64 Gram spectra: the slow part on big matrices). `progress(name)` is called after each tensor.
    `sigma_cache` (name -> sigma_max of the base tensor) is read and filled, so callers that restrain repeatedly
    against the same base (`edit --prune-every K`) compute each sigma_max once. The caller checks that `delta`
    belongs to `base` (`Delta.check_base`). The returned delta's history ends with
    {"op": "prune", "fn", "alpha", "beta", "clamp", "per_tensor": {name: report}}.
    """
    check_params(fn, alpha, beta)
    cache = {} if sigma_cache is None else sigma_cache
    entries: dict[str, DeltaEntry] = {}
    reports: list[TensorReport] = []
    for name, entry in delta.entries.items():
        stored = base.get(name)
        if name not in cache:
            if not bool(torch.isfinite(stored).all()):
                raise PruneCliError(f"base tensor {name} in {base.path} contains NaN or Inf values")
            cache[name] = base_sigma_max(stored, device=device)  # invariant under transposition: stored layout
        new_entry, info = restrain_entry(entry, cache[name], fn, alpha, beta, clamp, device)
        entries[name] = new_entry
        kappas: dict[str, float] = {}
        if kappa:
            # float64 sums: a float32 W + D would perturb sigma_min by eps32 * |W|, i.e. kappa by eps32 * kappa.
            w = (stored if entry.layout == "out_in" else stored.T).to(device or "cpu", torch.float64)
            kappas = {"kappa_base": _kappa(w),
                      "kappa_edited": _kappa(w + entry.to_dense(torch.float64).to(w.device)),
                      "kappa_pruned": _kappa(w + new_entry.to_dense(torch.float64).to(w.device))}
        reports.append(TensorReport(name, info, **kappas))
        if progress is not None:
            progress(name)
    op = {"op": "prune", "fn": fn, "alpha": alpha, "beta": beta, "clamp": clamp,
          "per_tensor": {r.name: {"sigma_max_base": r.info.sigma_max, "rank": r.info.rank,
                                  "n_restrained": r.info.n_restrained, "n_enlarged": r.info.n_enlarged}
                         for r in reports}}
    return delta.with_entries(entries, op), reports


def _kappa(w: torch.Tensor) -> float:
    """Condition number: float64 Gram fast path, an exact SVD where that path is not accurate enough."""
    kappa = matrix_stats(w).kappa
    return matrix_stats(w, exact=True).kappa if kappa > FAST_KAPPA_LIMIT else kappa
