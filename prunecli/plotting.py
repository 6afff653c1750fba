"""Singular-spectrum plots (matplotlib is optional: `pip install 'prunecli[plot]'`).

What a reader wants from `inspect --plot` is how the top of the spectrum moved: the largest singular values of
W + D against sigma_max(W), and those of D itself. So every edited matrix gets its own panel with W (solid), W + D
(dashed) and D (a wide pale line) in three colours and sigma_max(W) as a horizontal line, on log-log axes (the top
values are
at the left, spread out instead of squeezed against x = 1). Without deltas all matrices share one panel; past
`_MAX_LEGEND` curves a colour scale by matrix order replaces the legend.

matplotlib is imported inside the function with the non-interactive Agg backend, so plotting works without a
display and costs nothing when no plot is asked for. The PNG is written atomically.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from prunecli.core.atomic import atomic_file
from prunecli.errors import PruneCliError

_MAX_LEGEND = 10  # more curves than this in one panel: a colour scale instead of a legend
_MAX_PANELS = 12  # edited matrices drawn one panel each, at most this many
_DPI = 140  # with the figure sizes below: at least 1,260 x 760 pixels
_COLOURS = {"W": "#1f77b4", "W + D": "#d62728", "D": "#2ca02c", "smax": "#555555"}


@dataclass(frozen=True)
class Spectra:
    """The singular values (descending) of one matrix W, and of W + D and D when a delta touches it."""

    name: str
    base: torch.Tensor | None
    edited: torch.Tensor | None = None
    delta: torch.Tensor | None = None
    kappa: float | None = None  # kappa(W), shown in the panel title
    edited_kappa: float | None = None  # kappa(W + D)


def require_matplotlib() -> None:
    """Fail before any heavy work when a plot is asked for but matplotlib is not installed."""
    if importlib.util.find_spec("matplotlib") is None:
        raise PruneCliError("--plot needs matplotlib: pip install 'prunecli[plot]'")


def _positive(values: torch.Tensor) -> tuple[list[int], list[float]]:
    ys = [float(v) for v in values.double().tolist() if v > 0]  # zeros cannot sit on a log axis
    return list(range(1, len(ys) + 1)), ys


def _short(name: str) -> str:
    return name.removesuffix(".weight").removeprefix("model.").removeprefix("transformer.")


def _edited_panel(ax: Any, item: Spectra, restrained: bool) -> None:
    # D under W + D (their tops coincide when D dominates): a wide pale line with the dashed one drawn over it. A
    # restrained delta is D' (PRUNE's name), so an edited and a restrained plot are told apart at a glance.
    d = "D'" if restrained else "D"
    for colour, label, values, style, width, alpha in (
            ("W", "W", item.base, "-", 1.4, 1.0), ("D", d, item.delta, "-", 4.0, 0.45),
            ("W + D", f"W + {d}", item.edited, "--", 1.4, 1.0)):
        if values is not None and values.numel():
            ax.plot(*_positive(values), linestyle=style, color=_COLOURS[colour], linewidth=width, alpha=alpha,
                    label=label)
    if item.base is not None and item.base.numel():
        smax = float(item.base[0])
        ax.axhline(smax, color=_COLOURS["smax"], linewidth=0.8, linestyle="-.",
                   label=rf"$\sigma_{{max}}(W)$ = {smax:.3g}")
    kappas = ([f"κ(W) {item.kappa:.3g}"] if item.kappa is not None else []) + (
        [f"κ(W + {d}) {item.edited_kappa:.3g}"] if item.edited_kappa is not None else [])
    ax.set_title(_short(item.name) + ("\n" + ", ".join(kappas) if kappas else ""), fontsize="medium")
    ax.legend(fontsize="small", loc="lower left")


def _shared_panel(fig: Any, ax: Any, curves: Sequence[tuple[str, torch.Tensor]]) -> None:
    import matplotlib as mpl

    many = len(curves) > _MAX_LEGEND
    cmap = mpl.colormaps["viridis"]
    for i, (label, values) in enumerate(curves):
        colour = cmap(i / max(len(curves) - 1, 1)) if many else None
        ax.plot(*_positive(values), color=colour, linewidth=1.0, label=_short(label))
    if many:
        scale = mpl.cm.ScalarMappable(norm=mpl.colors.Normalize(1, len(curves)), cmap=cmap)
        fig.colorbar(scale, ax=ax, label=f"matrix (1 = {_short(curves[0][0])}, {len(curves)} = "
                                         f"{_short(curves[-1][0])})")
    else:
        ax.legend(fontsize="small")


def plot_spectra(items: Sequence[Spectra], path: Path, title: str, force: bool = False,
                 restrained: bool = False) -> None:
    """Draw the spectra (see the module docstring) and write them as a PNG at `path` (at least 1,200 pixels wide);
    `restrained` labels the delta D' (it went through a restraint)."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not items:
        raise PruneCliError("nothing to plot: no matrix was selected")
    edited = [it for it in items if it.edited is not None or (it.delta is not None and it.base is not None)]
    if edited:
        shown = edited[:_MAX_PANELS]
        cols = min(3, len(shown))
        rows = math.ceil(len(shown) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(max(6.0 * cols, 9.0), 4.6 * rows + 0.8), dpi=_DPI,
                                 squeeze=False)
        for ax, item in zip(axes.flat, shown):
            _edited_panel(ax, item, restrained)
        for ax in list(axes.flat)[len(shown):]:
            ax.set_visible(False)
        if len(edited) > len(shown):
            title += f" (first {len(shown)} of {len(edited)} edited matrices)"
    else:
        fig, ax = plt.subplots(figsize=(10, 6), dpi=_DPI)
        axes = [[ax]]
        curves = [(it.name, it.base if it.base is not None else it.delta) for it in items]
        _shared_panel(fig, ax, [(n, v) for n, v in curves if v is not None])
    try:
        for ax in (a for row in axes for a in row):
            if ax.get_visible():
                ax.set_xscale("log")
                ax.set_yscale("log")
                ax.set_xlabel("index i (log)")
                ax.set_ylabel(r"singular value $\sigma_i$")
                ax.grid(True, which="both", alpha=0.25)
        fig.suptitle(title)
        fig.tight_layout()
        with atomic_file(Path(path), force) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
