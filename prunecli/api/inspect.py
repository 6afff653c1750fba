"""`prunecli inspect` as a function: singular spectra of a checkpoint's matrices (with deltas added), or of a delta."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from prunecli.core.artifacts import DELTA, is_artifact
from prunecli.core.atomic import check_output_path, labelled
from prunecli.core.checkpoint import Checkpoint
from prunecli.core.delta import Delta
from prunecli.core.delta_files import load_deltas
from prunecli.core.inspection import (
    DeltaEntryReport,
    MatrixReport,
    checkpoint_candidates,
    checkpoint_reports,
    default_checkpoint_selection,
    delta_reports,
)
from prunecli.core.selection import numeric_order, select_entries, select_names
from prunecli.core.spectra import FAST_KAPPA_LIMIT
from prunecli.errors import PruneCliError, PruneCliWarning
from prunecli.models.builtin import resolve_model_path
from prunecli.models.loading import resolve_device
from prunecli.progress import Progress, no_progress, track


@dataclass(frozen=True)
class InspectOptions:
    """What `prunecli inspect` takes: PATH (a checkpoint, or a delta file), deltas to add, what to report."""

    path: str | Path
    deltas: tuple[str | Path, ...] = ()
    select: tuple[str, ...] = ()
    exact: bool = False  # float64 SVD instead of the Gram path
    precision: str = "auto"  # the Gram path's: float32 (where provably within 1e-3), float64, auto (see `gram`)
    top: int = 5  # top singular values of each delta to report
    plot: Path | None = None  # a PNG of the spectra
    device: str = "auto"
    force: bool = False  # replace an existing plot file
    ignore_base_mismatch: bool = False
    allow_pickle: bool = False

    @property
    def gram(self) -> Literal["float32", "float64"]:
        """The Gram path's precision: `auto` is float32 for a whole checkpoint (no --select, no --delta), where speed
        matters, and float64 otherwise."""
        if self.precision not in ("auto", "float32", "float64"):
            raise PruneCliError(f"precision must be auto, float32 or float64, got {self.precision!r}")
        whole = not self.select and not self.deltas
        return "float32" if self.precision == "float32" or (self.precision == "auto" and whole) else "float64"


@dataclass(frozen=True)
class InspectResult:
    options: InspectOptions
    path: Path
    kind: str  # "checkpoint" | "delta"
    reports: list[Any]  # MatrixReport (checkpoint) or DeltaEntryReport (delta file)
    device: str
    restrained: bool  # the deltas carry a restraint (their D is D')

    def to_json(self) -> dict[str, Any]:
        o = self.options
        with_delta = bool(o.deltas)
        tensors = [r.to_json() if self.kind == "delta" else r.to_json(with_delta=with_delta) for r in self.reports]
        return {"path": str(self.path), "kind": self.kind, "deltas": [str(d) for d in o.deltas], "exact": o.exact,
                "precision": None if o.exact or self.kind == "delta" else o.gram, "device": self.device,
                "tensors": tensors}


def run_inspect(options: InspectOptions, progress: Progress = no_progress) -> InspectResult:
    """Compute the spectra (one tensor in memory at a time), draw the plot if asked, return the reports."""
    o = options
    target = resolve_model_path(str(o.path))
    if o.plot is not None:
        from prunecli.plotting import require_matplotlib

        check_output_path(o.plot, o.force, is_dir=False,
                          inputs=[("inspected file", target), *labelled("delta", o.deltas)])
        require_matplotlib()
    device = resolve_device(o.device)
    keep = o.plot is not None
    restrained = False
    reports: list[Any]
    if is_artifact(target, DELTA):
        if o.deltas:
            raise PruneCliError(f"{target} is a delta file; --delta needs a checkpoint PATH to add deltas to")
        delta = Delta.load(target)
        restrained = bool(delta.restraints)
        names = sorted(select_entries(delta.entries, o.select, delta.model_type), key=numeric_order)
        reports = list(track(progress, delta_reports(delta, names, exact=o.exact, device=device, top_k=o.top,
                                                     keep_spectra=keep), "delta spectra", len(names)))
        kind = "delta"
    else:
        ckpt = Checkpoint(target, allow_pickle=o.allow_pickle)
        composed = load_deltas(o.deltas, ckpt)
        restrained = composed is not None and bool(composed.restraints)
        if o.select:
            not_2d = [n for n in ckpt.names() if len(ckpt.info(n).shape) != 2]
            names = select_names(checkpoint_candidates(ckpt), o.select, ignored=not_2d)
        else:
            names = default_checkpoint_selection(ckpt, composed)
        if not names:
            raise PruneCliError(f"{target} holds no 2-D matrix to inspect")
        names = sorted(names, key=numeric_order)
        reports = list(track(progress, checkpoint_reports(ckpt, names, composed, exact=o.exact, device=device,
                                                          top_k=o.top, keep_spectra=keep,
                                                          ignore_base_mismatch=o.ignore_base_mismatch,
                                                          precision=o.gram),
                             "spectra", len(names)))
        kind = "checkpoint"
        if not o.exact:
            _warn_ill_conditioned(reports)
    result = InspectResult(o, target, kind, reports, str(device), restrained)
    if o.plot is not None:
        from prunecli.plotting import plot_spectra

        plot_spectra(_plot_items(result), o.plot, _plot_title(result), o.force, restrained=restrained)
    return result


def _warn_ill_conditioned(reports: list[MatrixReport]) -> None:
    """The fast path's sigma_min degrades like eps64 * kappa^2: say so instead of printing a wrong kappa silently."""
    bad = [r.name for r in reports
           if r.stats.kappa > FAST_KAPPA_LIMIT or (r.edited is not None and r.edited.kappa > FAST_KAPPA_LIMIT)]
    if bad:
        warnings.warn(PruneCliWarning(
            f"{len(bad)} matri{'x has' if len(bad) == 1 else 'ces have'} kappa > {FAST_KAPPA_LIMIT:.0e} (first: "
            f"{bad[0]}); the fast path's sigma_min is not accurate there: rerun with --exact"), stacklevel=3)


def _plot_items(result: InspectResult) -> list[Any]:
    from prunecli.plotting import Spectra

    if result.kind == "delta":
        return [Spectra(r.name, None, delta=r.spectrum) for r in result.reports]
    return [Spectra(r.name, r.spectrum, r.edited_spectrum, r.delta_spectrum,
                    kappa=r.stats.kappa, edited_kappa=r.edited.kappa if r.edited is not None else None)
            for r in result.reports]


def _plot_title(result: InspectResult) -> str:
    """What the figure shows, so an edited and a restrained plot never look alike: the model, the deltas (marked
    restrained when their history holds a restraint)."""
    if result.kind == "delta":
        return f"singular spectra of delta {result.path.name}" + (" (restrained)" if result.restrained else "")
    title = f"singular spectra of {result.path.name}"
    if result.options.deltas:
        names = ", ".join(Path(d).name for d in result.options.deltas)
        title += f" + {names}" + (" (restrained)" if result.restrained else "")
    return title


__all__ = ["InspectOptions", "InspectResult", "run_inspect", "DeltaEntryReport", "MatrixReport"]
