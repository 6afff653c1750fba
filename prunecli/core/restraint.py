"""PRUNE (arXiv 2405.16821, ICLR 2025): restrain the large singular values of an accumulated edit delta.

Given the base matrix W (never edited) and the accumulated update D = U diag(s) V^T, every s_i above
smax = sigma_max(W) is replaced by F(s_i) and D' = U diag(s') V^T:

    log:    F(s) = log_a(s) - log_a(smax) + smax          (a = alpha > 1)
    linear: F(s) = s / b + (b - 1) / b * smax             (b = beta > 1)

Like the released PRUNE code, D is first truncated to its numerical rank (NumPy `matrix_rank`'s default tolerance).
Unlike it, nothing is densified: the SVD of a factored delta is computed on its factors (`lowrank.entry_svd`), the
result is rebuilt as factors (rank never grows), and smax comes from a block Krylov method instead of a full SVD of W.

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
from prunecli.core.spectra import FAST_KAPPA_LIMIT, matrix_stats, numerical_rank, singular_values
from prunecli.errors import PruneCliError

RestraintFn = Literal["log", "linear"]
FUNCTIONS: tuple[str, ...] = ("log", "linear")
N_TOP = 5
"""How many leading singular values of D and D' the reports show."""

# ------------------------------------------------------------------------------------------ sigma_max of W
_BLOCK = 16
"""Block size of the Krylov method: on CPU a float32 GEMM with 16 right-hand sides costs about as much as one with 1
and far less than 8 or 12 (measured with torch 2.13 on 2 AMD EPYC cores), and blocks cope with close top values."""
_DENSE_UP_TO = 256
"""Matrices whose smaller side is at most this use the float64 Gram eigenvalues directly (cheap at that size)."""
_CLUSTER = 1e-3
"""Top Gram eigenvalues within this relative distance form one cluster: float32 Lanczos separates values that close
only slowly, float64 Rayleigh-Ritz on the cluster's Ritz vectors does it exactly. Farther values contaminate the
float64 step by at most (eps32 * |W|^2)^2 / gap, below 1e-10 relative."""
_MAX_DIM = 1024
"""Largest Krylov basis tried before falling back to the float64 Gram eigenvalues."""


def base_sigma_max(w: torch.Tensor, tol: float = 1e-10, device: str | torch.device | None = None) -> float:
    """Largest singular value of a base matrix, to about `tol` relative accuracy, without a full SVD.

    A full SVD of a 1600x6400 matrix takes seconds on CPU and a float64 Gram matrix half a second; PRUNE only needs
    sigma_max. Block Lanczos (full reorthogonalisation) on the smaller Gram operator W W^T runs in float32, where
    CPU GEMMs are fast, until a Kato-Temple estimate of the error is below `tol`; the Rayleigh-Ritz step on the top
    Ritz vectors is then redone in float64, so the float32 subspace error enters only squared. Blocks matter: random
    (Gaussian) matrices have top singular values within 0.3 % of each other, where a single-vector power or Lanczos
    iteration converges slowly; top values closer than float32 can separate are resolved by the float64 step on
    their whole cluster. Small matrices, and clusters too big for one block, use the float64 Gram eigenvalues
    (accurate for the largest value). Deterministic (fixed seed). Transposing W gives the same value, so callers
    may pass the tensor in its stored layout.
    """
    x = w.detach().to(device or w.device)
    if x.ndim != 2:
        raise ValueError(f"expected a matrix, got shape {list(x.shape)}")
    if min(x.shape) > _DENSE_UP_TO:
        x = x.contiguous()
        row_side = x.shape[0] <= x.shape[1]  # Krylov vectors live on the smaller side
        top = _krylov_top_subspace(x.float(), row_side, tol)
        if top is not None:
            return float(torch.linalg.matrix_norm(_product_fp64(x, top, row_side), 2))
    return float(singular_values(x)[0])


def _gram_apply(x32: torch.Tensor, q: torch.Tensor, row_side: bool) -> torch.Tensor:
    """(X X^T) q when the vectors live on the row side, (X^T X) q otherwise."""
    return x32 @ (x32.T @ q) if row_side else x32.T @ (x32 @ q)


def _krylov_top_subspace(x32: torch.Tensor, row_side: bool, tol: float) -> torch.Tensor | None:
    """Orthonormal float64 basis [m, c] of the Ritz vectors of the top eigenvalue cluster of the Gram operator
    (c = 1 unless the top values are within `_CLUSTER` of each other); None when float32 cannot reach `tol`."""
    m = x32.shape[0] if row_side else x32.shape[1]
    p, dev = _BLOCK, x32.device
    max_dim = min(_MAX_DIM, m - p)
    gen = torch.Generator(device=dev).manual_seed(0)
    basis = torch.empty(m, max_dim + p, dtype=torch.float32, device=dev)
    basis[:, :p] = torch.linalg.qr(torch.randn(m, p, generator=gen, device=dev))[0]
    t = torch.zeros(max_dim, max_dim, dtype=torch.float64, device=dev)
    floor = 4 * torch.finfo(torch.float32).eps
    k, next_check, last = p, 3, None
    while k <= max_dim:
        q = basis[:, :k]
        y = _gram_apply(x32, basis[:, k - p:k], row_side)
        coef = q.T @ y
        y -= q @ coef
        again = q.T @ y  # second Gram-Schmidt pass: one loses orthogonality in float32
        y -= q @ again
        coef = (coef + again).double()
        t[:k, k - p:k] = coef
        t[k - p:k, :k] = coef.T
        new_block, r = torch.linalg.qr(y)
        blocks = k // p
        if blocks >= next_check or k + p > max_dim:
            theta, vecs = torch.linalg.eigh(t[:k, :k])
            top = float(theta[-1])
            if top <= 0.0:  # W = 0
                return torch.eye(m, 1, dtype=torch.float64, device=dev)
            n_cluster = min(p, int((theta >= top * (1 - _CLUSTER)).sum()))
            cluster = vecs[:, k - n_cluster:]
            # Kato-Temple: eigenvalue error ~ residual^2 / gap, the gap taken to the first Ritz value outside the
            # cluster (float64 Rayleigh-Ritz resolves the cluster itself). The Lanczos residual is r @ last rows.
            resid = float(torch.linalg.matrix_norm(r.double() @ cluster[k - p:]))
            gap = top - float(theta[k - n_cluster - 1]) if n_cluster < k else top
            est = 0.5 * resid**2 / (gap * top)
            if est <= tol:
                return torch.linalg.qr(q.double() @ cluster)[0]
            if resid <= floor * top:
                return None
            # An eigendecomposition per block would cost as much as the GEMMs: extrapolate the (accelerating)
            # geometric decay of the estimate to the next check, at most half the blocks done so far ahead.
            step = 2
            if last is not None and est < last[1]:
                rate = (est / last[1]) ** (1 / (blocks - last[0]))
                step = math.ceil(math.log(tol / est) / math.log(rate))
            next_check = blocks + max(1, min(step, max(2, blocks // 2)))
            last = (blocks, est)
        # A third pass, on the normalised block: after cancellation (W of low rank) the QR alone is not orthogonal.
        new_block -= q @ (q.T @ new_block)
        basis[:, k:k + p] = torch.linalg.qr(new_block)[0]
        k += p
    return None


def _product_fp64(x: torch.Tensor, v: torch.Tensor, row_side: bool, chunk: int = 64) -> torch.Tensor:
    """X^T v (row side) or X v in float64, converting X a few rows at a time (cache-sized, no float64 copy)."""
    if row_side:
        out = torch.zeros(x.shape[1], v.shape[1], dtype=torch.float64, device=x.device)
        for i in range(0, x.shape[0], chunk):
            out.addmm_(x[i:i + chunk].T.double(), v[i:i + chunk])
        return out
    return torch.cat([x[i:i + chunk].double() @ v for i in range(0, x.shape[0], chunk)])


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
    svd = entry_svd(entry, device=device or "cpu")
    rank = numerical_rank(svd.s, entry.shape)  # NumPy matrix_rank's rule with float32 eps, as the reference code
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
            cache[name] = base_sigma_max(stored, device=device)  # invariant under transposition: stored layout
        if not math.isfinite(cache[name]):
            raise PruneCliError(f"base tensor {name} contains NaN or Inf values")
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
