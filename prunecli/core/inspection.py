"""What `prunecli inspect` computes: spectra of checkpoint matrices, of edited matrices W + D, and of delta entries.

Everything is a generator over the selected tensors that reads one tensor at a time, so inspecting a large model
costs about two matrices (plus a Gram matrix) of memory, and callers can show progress: a checkpoint's next tensor is
read (file I/O, 16-bit values widened to float32) in a background thread while the current one is decomposed. A
delta's own spectrum always comes
from its factors (`entry_svd`): a low-rank delta is never densified for it. W + D is formed densely in float64,
because its spectrum is the question and W is dense anyway.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from prunecli.core.checkpoint import Checkpoint
from prunecli.core.delta import Delta, DeltaEntry, check_finite_weight
from prunecli.core.lowrank import entry_svd
from prunecli.core.prefetch import read_ahead
from prunecli.core.safetensors_stream import SAFETENSORS_DTYPES
from prunecli.core.selection import tensor_aliases
from prunecli.core.spectra import Float32Attempts, Precision, SpectrumStats, numerical_rank, singular_values, spectrum
from prunecli.errors import PruneCliError


@dataclass(frozen=True)
class DeltaSpectrum:
    """Spectrum summary of one update D; `n_above_sigma_max` counts singular values of D above sigma_max(W)."""

    rank: int
    sigma_max: float
    fro: float
    top_singular_values: list[float]
    n_above_sigma_max: int | None = None  # None when there is no base matrix to compare with

    @classmethod
    def from_singular_values(cls, s: torch.Tensor, shape: tuple[int, int], top_k: int,
                             base_sigma_max: float | None = None) -> DeltaSpectrum:
        return cls(rank=numerical_rank(s, shape), sigma_max=float(s[0]) if s.numel() else 0.0,
                   fro=float(torch.sqrt((s.double() ** 2).sum())), top_singular_values=s[:top_k].tolist(),
                   n_above_sigma_max=None if base_sigma_max is None else int((s > base_sigma_max).sum()))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rank": self.rank, "sigma_max": self.sigma_max, "fro": self.fro,
                               "top_singular_values": self.top_singular_values}
        if self.n_above_sigma_max is not None:
            out["n_above_sigma_max"] = self.n_above_sigma_max
        return out


@dataclass(frozen=True)
class MatrixReport:
    """Spectrum of one checkpoint matrix W, and of W + D and D when a delta touches it."""

    name: str  # canonical name
    shape: tuple[int, int]  # as stored
    dtype: str  # stored safetensors dtype (F32, BF16, ...)
    layout: str  # out_in | in_out
    stats: SpectrumStats
    path: str  # how W's spectrum was computed (spectra.PATH_*)
    spectrum: torch.Tensor | None = None  # all singular values of W (kept only on request)
    edited: SpectrumStats | None = None
    edited_spectrum: torch.Tensor | None = None
    delta: DeltaSpectrum | None = None
    delta_spectrum: torch.Tensor | None = None  # all singular values of D (kept only on request)

    def to_json(self, with_delta: bool) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype,
                               "layout": self.layout, **self.stats.to_json(), "path": self.path}
        if with_delta:
            out["edited"] = self.edited.to_json() if self.edited else None
            out["delta"] = self.delta.to_json() if self.delta else None
        return out


@dataclass(frozen=True)
class DeltaEntryReport:
    """Spectrum of one entry of a delta file (shape in math orientation [out, in])."""

    name: str
    shape: tuple[int, int]
    layout: str
    kind: str  # lowrank | dense
    spectrum_stats: DeltaSpectrum
    spectrum: torch.Tensor | None = None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "layout": self.layout, "kind": self.kind,
                **self.spectrum_stats.to_json()}


def checkpoint_candidates(ckpt: Checkpoint) -> list[tuple[str, ...]]:
    """`tensor_aliases` of the checkpoint's non-empty 2-D matrices, in file order (for `selection.select_names`)."""
    out = []
    for stored in ckpt.matrices():
        if 0 in ckpt.info(stored).shape:
            continue  # an empty matrix has no spectrum
        out.append(tensor_aliases(ckpt.canonical(stored), stored, ckpt.model_type))
    return out


def default_checkpoint_selection(ckpt: Checkpoint, delta: Delta | None) -> list[str]:
    """All 2-D matrices in file order; with a delta only the ones it touches (the edited matrices are what one
    inspects then). Targets the checkpoint lacks are kept, for `checkpoint_reports`' base check to name them."""
    names = [aliases[0] for aliases in checkpoint_candidates(ckpt)]
    if delta is None:
        return names
    order = {n: i for i, n in enumerate(names)}
    return sorted(delta.entries, key=lambda n: order.get(n, len(order)))


def delta_singular_values(entry: DeltaEntry, exact: bool = False, device: str | torch.device = "cpu") -> torch.Tensor:
    """Singular values of an update, descending, float64 on the CPU: from the factors when low rank (exact, cheap);
    a dense update goes through `singular_values` like any dense matrix."""
    if entry.is_lowrank:
        return entry_svd(entry, torch.float64, device).s.cpu()
    assert entry.dense is not None
    return singular_values(entry.dense, exact, device)


def _add_update(w: torch.Tensor, entry: DeltaEntry) -> torch.Tensor:
    """w (stored layout, float64, a private copy: modified in place) + D; a low-rank D is added as a product of its
    factors on w's device, never densified on its own."""
    if not entry.is_lowrank:
        return w.add_(entry.stored_update(torch.float64).to(w.device))
    assert entry.a is not None and entry.b is not None
    a, b = entry.a.to(w.device, torch.float64), entry.b.to(w.device, torch.float64)
    return w.addmm_(a, b.T) if entry.layout == "out_in" else w.addmm_(b, a.T)


def _read_matrix(ckpt: Checkpoint, name: str) -> tuple[str, torch.Tensor]:
    """(name, the stored matrix, bf16/fp16 widened to float32, which is exact): checked to be a finite 2-D matrix."""
    info = ckpt.info(name)
    if len(info.shape) != 2:
        raise PruneCliError(f"tensor {name} has shape {list(info.shape)}: only 2-D matrices have a spectrum")
    w = ckpt.get(name)
    if w.dtype in (torch.bfloat16, torch.float16):
        w = w.float()
    if not bool(torch.isfinite(w).all()):
        raise PruneCliError(f"tensor {ckpt.canonical(name)} in {ckpt.path} contains NaN or Inf values")
    return name, w


def checkpoint_reports(ckpt: Checkpoint, names: Sequence[str], delta: Delta | None = None, *, exact: bool = False,
                       device: str | torch.device = "cpu", top_k: int = 5, keep_spectra: bool = False,
                       ignore_base_mismatch: bool = False, precision: Precision = "float64",
                       prefetch: bool = True) -> Iterator[MatrixReport]:
    """Spectra of the named matrices of `ckpt`, each tensor read while the previous one is decomposed (`prefetch`;
    False reads them in turn, in this thread).

    `precision` applies to W (`spectra.spectrum`; with "float32", one `Float32Attempts` spans the pass); W + D,
    formed in float64, always takes the float64 path. With
    `delta`, matrices it touches also get the spectrum of W + D and of D. The delta is checked against the base
    first (same tensors, shapes and, unless `ignore_base_mismatch`, bytes), before any spectrum is computed; W + D
    must be finite in the base's dtype.
    """
    if delta is not None:
        delta.check_base(ckpt, ignore_base_mismatch)
    dev = torch.device(device)

    def generate() -> Iterator[MatrixReport]:
        matrices = (_read_matrix(ckpt, name) for name in names)
        attempts = Float32Attempts()
        for name, w in read_ahead(matrices) if prefetch else matrices:
            info, canonical = ckpt.info(name), ckpt.canonical(name)
            s, path = spectrum(w, exact, dev, precision, attempts)
            stats = SpectrumStats.from_singular_values(s)
            entry = delta.entries.get(canonical) if delta is not None else None
            edited = edited_s = dspec = delta_s = None
            if entry is not None:
                edited_w = _add_update(w.to(dev, torch.float64, copy=True), entry)
                stored = w.to(SAFETENSORS_DTYPES[info.dtype])  # W as stored (widening was exact)
                check_finite_weight(canonical, edited_w.to(stored.dtype), stored)
                edited_s = singular_values(edited_w, exact, dev)
                del edited_w
                edited = SpectrumStats.from_singular_values(edited_s)
                delta_s = delta_singular_values(entry, exact, dev)
                dspec = DeltaSpectrum.from_singular_values(delta_s, entry.shape, top_k, stats.sigma_max)
            del w
            kept = (s, edited_s, delta_s) if keep_spectra else (None, None, None)
            yield MatrixReport(canonical, (info.shape[0], info.shape[1]), info.dtype, ckpt.layout(name),
                               stats, path, kept[0], edited, kept[1], dspec, kept[2])

    return generate()


def delta_reports(delta: Delta, names: Sequence[str], *, exact: bool = False, device: str | torch.device = "cpu",
                  top_k: int = 5, keep_spectra: bool = False) -> Iterator[DeltaEntryReport]:
    """Spectra of the named entries of a delta (no base needed)."""
    for name in names:
        entry = delta.entries[name]
        s = delta_singular_values(entry, exact, device)
        yield DeltaEntryReport(name, entry.shape, entry.layout, "lowrank" if entry.is_lowrank else "dense",
                               DeltaSpectrum.from_singular_values(s, entry.shape, top_k), s if keep_spectra else None)
