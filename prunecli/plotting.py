"""Singular-spectrum plots (matplotlib is optional: `pip install 'prunecli[plot]'`).

matplotlib is imported inside the function with the non-interactive Agg backend, so plotting works without a
display and costs nothing when no plot is asked for. The PNG is written atomically.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from prunecli.core.atomic import atomic_file
from prunecli.errors import PruneCliError

_MAX_LEGEND = 12  # more lines than this make a legend that hides the plot


@dataclass(frozen=True)
class SpectrumLine:
    """One curve: singular values (descending) of matrix `name`; `edited` (W + D) curves are dashed, same colour."""

    name: str
    values: torch.Tensor
    edited: bool = False

    @property
    def label(self) -> str:
        return f"{self.name} (W+D)" if self.edited else self.name


def require_matplotlib() -> None:
    """Fail before any heavy work when a plot is asked for but matplotlib is not installed."""
    if importlib.util.find_spec("matplotlib") is None:
        raise PruneCliError("--plot needs matplotlib: pip install 'prunecli[plot]'")


def plot_spectra(lines: Sequence[SpectrumLine], path: Path, title: str, force: bool = False) -> None:
    """Draw the spectra on a log y axis (index on x) and write them as a PNG at `path`."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not lines:
        raise PruneCliError("nothing to plot: no matrix was selected")
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=110)
    try:
        colours: dict[str, str] = {}
        cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for line in lines:
            colour = colours.setdefault(line.name, cycle[len(colours) % len(cycle)])
            ys = line.values.double().numpy()
            ax.plot(range(1, len(ys) + 1), ys, linestyle="--" if line.edited else "-", color=colour,
                    linewidth=1.2, label=line.label)
        ax.set_yscale("log")  # zero singular values are masked, not drawn
        ax.set_xlabel("index i")
        ax.set_ylabel("singular value sigma_i")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        if len(lines) <= _MAX_LEGEND:
            ax.legend(fontsize="small")
        fig.tight_layout()
        with atomic_file(Path(path), force) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
