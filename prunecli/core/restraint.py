"""PRUNE (arXiv 2405.16821, ICLR 2025): restrain the large singular values of an accumulated edit delta.

Given the base matrix W (never edited) and the accumulated update D = U diag(s) V^T, every s_i above
smax = sigma_max(W) is replaced by F(s_i) and D' = U diag(s') V^T:

    log:    F(s) = log_a(s) - log_a(smax) + smax          (a = alpha > 1)
    linear: F(s) = s / b + (b - 1) / b * smax             (b = beta > 1)
    scale-free (ours): F(s) = smax * (s / smax) ** (1 - t)   (t = strength in [0, 1]; up to 2, see below)

Like the released PRUNE code, D is first truncated to its numerical rank (NumPy `matrix_rank`'s default tolerance).
Unlike it, nothing is densified: the SVD of a factored delta is computed on its factors (`lowrank.entry_svd`), the
result is rebuilt as factors (rank never grows), and smax comes from the spectrum of W where kappa is reported anyway,
from `spectra.largest_singular_value` (Lanczos) otherwise, never from a full SVD of W.

Trap: log F only shrinks s when smax * ln(alpha) >= 1 (d/ds (s - F(s)) = 1 - 1 / (s ln alpha)); below that it
*enlarges* the singular values just above smax. By default the paper's formula is applied as is (so results match the
paper and its code) and the result carries a warning that counts the enlarged values; `clamp=True` uses
min(s, F(s)) instead, which never enlarges anything.

The paper's F is not scale-free: multiplying W and D by c does not multiply F(s) by c, so one alpha restrains
differently on models whose weights have different scales (Gemma-3-270M's smax of 1.5-5.8 is below 5.49, the bound
for alpha = 1.2). The scale-free F depends on s / smax only (W, D -> cW, cD gives D' -> cD'), never enlarges
(s / smax > 1 and 1 - t <= 1, so (s / smax) ** (1 - t) <= s / smax), keeps the order of the values, and runs from no
restraint (t = 0) over cutting every value to smax (t = 1) to removing the delta (t = 2: beyond 1 all values are
multiplied by 2 - t), so any kappa target >= kappa(W) is reachable; docs/RESTRAINT.md has the derivation. `target_kappa`
searches, per matrix, the smallest t with kappa(W + D') <= target (`search_strength`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from prunecli.core.checkpoint import Checkpoint
from prunecli.core.delta import Delta, DeltaEntry
from prunecli.core.history import PruneOp
from prunecli.core.lowrank import entry_svd
from prunecli.core.restraint_functions import MAX_STRENGTH, RestraintSettings, restraint_values
from prunecli.core.spectra import FAST_KAPPA_LIMIT, UpdatedSpectra, largest_singular_value, matrix_stats, numerical_rank
from prunecli.errors import PruneCliError
from prunecli.progress import Progress, no_progress, track

N_TOP = 5
"""How many leading singular values of D and D' the reports show."""


# ----------------------------------------------------------------------------------------------- one entry
@dataclass(frozen=True)
class RestraintInfo:
    """What restraining one update did (`smax_ln_alpha` is None unless F is the paper's log; `strength` is set for
    scale-free F; `target_kappa` and `search_steps`, the kappa evaluations, when the strength was searched)."""

    sigma_max: float
    rank: int
    n_restrained: int
    top_before: list[float]
    top_after: list[float]
    smax_ln_alpha: float | None
    n_enlarged: int
    clamped: bool
    strength: float | None = None
    target_kappa: float | None = None
    search_steps: int | None = None

    @property
    def enlarges(self) -> bool:
        """log F enlarges singular values just above sigma_max (sigma_max * ln(alpha) < 1)."""
        return self.smax_ln_alpha is not None and self.smax_ln_alpha < 1

    @property
    def warning(self) -> str | None:
        """log F's enlargement and its fixes, or None."""
        if not self.enlarges:
            return None
        if self.n_enlarged == 0:
            what = "no singular value of this delta is in that range"
        elif self.clamped:
            what = f"clamped to min(s, F(s)): {self.n_enlarged} value(s) kept unchanged instead"
        else:
            what = (f"applied as in the paper: {self.n_enlarged} singular value(s) of the delta got larger; "
                    "--fn scale-free (never enlarges, same effect at any weight scale) or --target-kappa K "
                    "(the mildest scale-free restraint reaching kappa K) restrains instead, --clamp keeps them")
        return (f"sigma_max(W) * ln(alpha) = {self.sigma_max:.4g} * ln(alpha) = {self.smax_ln_alpha:.3g} < 1: "
                f"log F enlarges singular values just above sigma_max; {what}")

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "enlarges": self.enlarges, "warning": self.warning}


_TARGET_RTOL = 1e-4
"""The search stops once kappa(W + D') is within this fraction below the target (or the bracket is below 1e-7)."""


def search_strength(u: torch.Tensor, s: torch.Tensor, v: torch.Tensor, sigma_max: float, spectra: UpdatedSpectra,
                    target_kappa: float) -> tuple[float, int]:
    """Bisect the scale-free strength t in [0, 2] for the smallest t with kappa(W + U diag(F_t(s)) V^T) <= target.

    kappa(W + D'_t) is continuous in t (F_t is) and runs from kappa(W + D) at t = 0 to kappa(W) at t = 2 (D' = 0), so
    every target >= kappa(W) is met; it is decreasing in practice. Bisection keeps a bracket [lo, hi] where lo misses
    the target and hi meets it, so the result meets the target and a strength a bracket width weaker misses it.
    Returns (strength, number of kappa evaluations). Each evaluation is one `UpdatedSpectra.stats` call with the same
    Q (X Q computed once): W + D' is never formed. Far below the Gram path's accuracy limit, large trial kappas need
    not be exact to be rejected.
    """
    if target_kappa < (base := spectra.stats().kappa) * (1 - 1e-12):
        raise PruneCliError(f"--target-kappa {target_kappa:.6g} is below kappa(W) = {base:.6g} of the base matrix: "
                            "restraining the delta cannot bring kappa(W + D') below the base's own")
    direction, q = spectra.orient(u, v)  # (u diag(f)) v^T = u (v diag(f))^T: the scaled side is `direction`
    xq = spectra.project(q)
    exact_above = math.inf if target_kappa <= FAST_KAPPA_LIMIT / 4 else FAST_KAPPA_LIMIT
    evaluations = 0

    def kappa_at(t: float) -> float:
        nonlocal evaluations
        evaluations += 1
        f = restraint_values(s, sigma_max, RestraintSettings().with_strength(t)).to(direction)
        return spectra.stats(direction * f, q, xq, exact_above).kappa

    before = kappa_at(0.0)
    if before <= target_kappa:
        return 0.0, evaluations
    lo, hi, k_hi = 0.0, MAX_STRENGTH, base  # at the largest strength D' = 0: kappa(W) <= target
    while hi - lo > 1e-7 and k_hi < target_kappa * (1 - _TARGET_RTOL):
        mid = 0.5 * (lo + hi)
        k = kappa_at(mid)
        if k <= target_kappa:
            hi, k_hi = mid, k
        else:
            lo = mid
    return hi, evaluations


def restrain_entry(entry: DeltaEntry, sigma_max: float, settings: RestraintSettings = RestraintSettings(),
                   device: str | torch.device | None = None,
                   spectra: UpdatedSpectra | None = None) -> tuple[DeltaEntry, RestraintInfo]:
    """PRUNE on one update, given sigma_max of its base matrix; the result keeps the entry's layout.

    Low-rank entries are never densified: exact SVD on the factors, truncation to numerical rank, F, then
    a' = U diag(s'), b' = V, so rank(D') <= rank(D). Dense entries go through a dense SVD and come back as factors
    when their numerical rank is at most half the smaller side (cheaper and exact), dense otherwise. With
    `settings.target_kappa`, F is the scale-free one and its strength is searched (`search_strength`, which needs
    `spectra`, the base matrix's `UpdatedSpectra`); the settings' own fn, strength and clamp are then not used.
    """
    settings.check()
    if not (math.isfinite(sigma_max) and sigma_max > 0):
        raise PruneCliError(f"sigma_max of the base matrix is {sigma_max}; PRUNE needs a positive finite value")
    device = device or "cpu"
    steps: int | None = None
    svd = entry_svd(entry, device=device)
    rank = numerical_rank(svd.s, entry.shape)  # NumPy matrix_rank's rule with float32 eps, as the reference
    u, s, v = svd.u[:, :rank], svd.s[:rank], svd.v[:, :rank]
    if settings.target_kappa is not None:
        if spectra is None:
            raise ValueError("a kappa target needs the base matrix's spectra")
        strength, steps = search_strength(u, s, v, sigma_max, spectra, settings.target_kappa)
        settings = settings.with_strength(strength)
    f = restraint_values(s, sigma_max, settings)
    above = s > sigma_max
    enlarged = above & (f > s)
    new_s = torch.minimum(f, s) if settings.clamp else f
    a = u * new_s
    if entry.is_lowrank or rank <= min(entry.shape) // 2:
        new_entry = DeltaEntry.lowrank(a, v, entry.layout)
    else:
        new_entry = DeltaEntry.from_dense(a @ v.T, entry.layout)
    info = RestraintInfo(sigma_max=sigma_max, rank=rank, n_restrained=int(above.sum()),
                         top_before=s[:N_TOP].tolist(), top_after=new_s[:N_TOP].tolist(),
                         smax_ln_alpha=sigma_max * math.log(settings.alpha) if settings.fn == "log" else None,
                         n_enlarged=int(enlarged.sum()), clamped=settings.clamp,
                         strength=settings.strength if settings.fn == "scale-free" else None,
                         target_kappa=settings.target_kappa, search_steps=steps)
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
                "strength": i.strength, "target_kappa": i.target_kappa, "search_steps": i.search_steps,
                "top_before": i.top_before, "top_after": i.top_after, "n_enlarged": i.n_enlarged,
                "warning": i.warning}


class BaseSpectra:
    """What restraining against one base checkpoint needs per matrix, computed once and kept: sigma_max and, for
    kappas, the matrix's `UpdatedSpectra` (its float64 Gram matrix, whose spectrum then also gives sigma_max).
    Callers that restrain or measure repeatedly against the same base (`edit --prune-every`, `--kappa-trigger`)
    share one instance."""

    def __init__(self, base: Checkpoint, device: str | torch.device | None = None) -> None:
        self.base, self.device = base, device
        self.sigma: dict[str, float] = {}
        self._spectra: dict[str, UpdatedSpectra] = {}

    def _stored(self, name: str) -> torch.Tensor:
        stored = self.base.get(name)
        if not bool(torch.isfinite(stored).all()):
            raise PruneCliError(f"base tensor {name} in {self.base.path} contains NaN or Inf values")
        return stored

    def sigma_max(self, name: str, spectra: UpdatedSpectra | None = None) -> float:
        """sigma_max(W): from W's spectrum when the caller has its `spectra` (kappas are computed anyway), else by
        Lanczos (`largest_singular_value`, invariant under transposition)."""
        if name not in self.sigma:
            self.sigma[name] = (spectra.stats().sigma_max if spectra is not None
                                else largest_singular_value(self._stored(name), device=self.device))
        return self.sigma[name]

    def spectra(self, name: str, entry: DeltaEntry) -> UpdatedSpectra:
        if name not in self._spectra:
            stored = self._stored(name)
            self._spectra[name] = UpdatedSpectra(stored if entry.layout == "out_in" else stored.T, self.device or "cpu")
        return self._spectra[name]

    def kappa(self, name: str, entry: DeltaEntry, updated: bool = True) -> float:
        """kappa(W + D) for the update `entry`; kappa(W) alone, oriented like the entry, with `updated=False`."""
        spectra = self.spectra(name, entry)
        if not updated:
            return spectra.stats().kappa
        if entry.is_lowrank:
            assert entry.a is not None and entry.b is not None
            return spectra.stats(*spectra.orient(entry.a, entry.b)).kappa
        d = entry.to_dense(torch.float64).to(spectra.x.device)
        return _kappa(spectra.x + (d.T if spectra.transposed else d))


def restrain_delta(delta: Delta, base: Checkpoint, settings: RestraintSettings = RestraintSettings(),
                   kappa: bool = True, progress: Progress = no_progress, *, spectra: BaseSpectra | None = None,
                   record: dict[str, Any] | None = None,
                   device: str | torch.device | None = None) -> tuple[Delta, list[TensorReport]]:
    """Apply PRUNE to every entry of `delta` against the unedited `base`; returns the new delta and reports.

    Base matrices are read one at a time. `kappa=True` also reports kappa(W), kappa(W + D), kappa(W + D') (float64
    Gram spectra of W formed once per matrix, low-rank updates added on the Gram matrix; `UpdatedSpectra`).
    `settings.target_kappa` searches, per matrix, the mildest scale-free strength with kappa(W + D') <= target
    (kappas are then always reported). `progress` gets one task, advanced per tensor. `spectra` (a `BaseSpectra` of
    `base`) is read and filled, so repeated restraints against the same base compute each base quantity once. The
    caller checks that `delta` belongs to `base` (`Delta.check_base`). The returned delta's history ends with
    {"op": "prune", **settings, **record, "per_tensor": {name: report}} (`history.PruneOp`).
    """
    settings.check()
    target_kappa = settings.target_kappa
    if target_kappa is not None:
        settings = replace(settings, fn="scale-free")
    cache = spectra or BaseSpectra(base, device)
    entries: dict[str, DeltaEntry] = {}
    reports: list[TensorReport] = []
    for name, entry in track(progress, delta.entries.items(), "prune"):
        matrix = cache.spectra(name, entry) if (kappa or target_kappa is not None) else None
        smax = cache.sigma_max(name, matrix)
        new_entry, info = restrain_entry(entry, smax, settings, device, spectra=matrix)
        entries[name] = new_entry
        kappas: dict[str, float] = {}
        if matrix is not None:
            kappas = {"kappa_base": cache.kappa(name, entry, updated=False), "kappa_edited": cache.kappa(name, entry),
                      "kappa_pruned": cache.kappa(name, new_entry)}
        reports.append(TensorReport(name, info, **kappas))
    op = PruneOp(settings.to_json(),
                 {r.name: {"sigma_max_base": r.info.sigma_max, "rank": r.info.rank,
                           "n_restrained": r.info.n_restrained, "n_enlarged": r.info.n_enlarged,
                           "strength": r.info.strength, "kappa_base": r.kappa_base,
                           "kappa_before": r.kappa_edited, "kappa_after": r.kappa_pruned} for r in reports},
                 record or {})
    return delta.with_entries(entries, op), reports


def _kappa(w: torch.Tensor) -> float:
    """Condition number: float64 Gram fast path, an exact SVD where that path is not accurate enough."""
    kappa = matrix_stats(w).kappa
    return matrix_stats(w, exact=True).kappa if kappa > FAST_KAPPA_LIMIT else kappa
