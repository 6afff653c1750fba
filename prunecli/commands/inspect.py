"""`prunecli inspect`: singular spectra (sigma_max, sigma_min, kappa, norm, stable rank) of weight matrices."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from prunecli.commands._display import cli_progress
from prunecli.commands._errors import guarded
from prunecli.commands._options import AllowPickle, Deltas, Device, IgnoreBaseMismatch, Out, Select
from prunecli.commands._output import number

if TYPE_CHECKING:
    from prunecli.api.inspect import InspectResult

Precision = Enum("Precision", {p: p for p in ("auto", "float32", "float64")}, type=str)  # type: ignore[misc]


@guarded
def main(path: Annotated[str, typer.Argument(metavar="PATH", help="Checkpoint folder, .safetensors file, prunecli "
                                             "delta file, or a built-in model name (smollm2).")],
         out: Out, deltas: Deltas = None, select: Select = None,
         exact: Annotated[bool, typer.Option("--exact", help="Float64 SVD instead of the fast Gram + eigvalsh path "
                                             "(needed when kappa approaches 1e7).")] = False,
         precision: Annotated[Precision, typer.Option(  # type: ignore[valid-type]
             "--precision", help="Gram path: float64, or float32 (kept only where every singular value is provably "
             "within 1e-3 "
             "relative of float64, i.e. small kappa; float64 elsewhere). auto: float32 for a whole checkpoint (no "
             "--select, no --delta), float64 otherwise. See docs/SPECTRA.md.")] = Precision("auto"),
         plot: Annotated[Path | None, typer.Option(
             "--plot", dir_okay=False, help="Write a PNG of the singular spectra (log-log; one panel per edited matrix "
             "with W, W + D and D, sigma_max(W) marked). Needs matplotlib.")] = None,
         top: Annotated[int, typer.Option("--top", min=1, help="How many top singular values of each delta to "
                                          "report.")] = 5,
         device: Device = "auto",
         force: Annotated[bool, typer.Option("--force", help="Replace an existing --plot file (never an input).")]
         = False,
         ignore_base_mismatch: IgnoreBaseMismatch = False, allow_pickle: AllowPickle = False) -> None:
    """Report the singular spectra of a checkpoint's weight matrices: sigma_max, sigma_min, kappa, norm, stable rank.

    Fast path: eigenvalues of the smaller Gram matrix in float64 (accurate while kappa << 1e7), or in float32 where
    that is provably within 1e-3 (--precision; the default for a whole checkpoint); --exact: float64 SVD.
    With --delta: also W + D, and the rank and top singular values of D (computed from its low-rank factors). PATH
    may be a delta file: then each entry's rank, norm and top singular values are reported.

    Example: prunecli inspect smollm2 --select '*.layers.6.mlp.down_proj.weight'

    Example: prunecli inspect smollm2 --delta edits.safetensors --plot spectra.png

    Example: prunecli inspect pruned.safetensors --top 8
    """
    from prunecli.api.inspect import InspectOptions, run_inspect

    options = InspectOptions(path, tuple(deltas or ()), tuple(select or ()), exact, precision.value, top, plot, device,
                             force,
                             ignore_base_mismatch, allow_pickle)
    with cli_progress() as progress:
        result = run_inspect(options, progress)
    out.result(result.to_json(), lambda: _render(out, result))


def _render(out: Out, result: InspectResult) -> None:
    d = "D'" if result.restrained else "D"
    if result.kind == "delta":
        out.table(f"{d}: entries of {result.path.name}", ["tensor", "out x in", "kind", "rank", "σ_max", "‖D‖_F",
                                                          "top singular values"],
                  [[r.name, "x".join(map(str, r.shape)), r.kind, str(r.spectrum_stats.rank),
                    number(r.spectrum_stats.sigma_max), number(r.spectrum_stats.fro),
                    ", ".join(number(v) for v in r.spectrum_stats.top_singular_values)] for r in result.reports],
                  right=["rank", "σ_max", "‖D‖_F"])
    else:
        with_delta = bool(result.options.deltas)
        columns = ["tensor", "stored shape", "dtype", "σ_max", "σ_min", "κ", "‖W‖_F", "stable rank"]
        if with_delta:
            columns += [f"κ(W+{d})", f"σ_max(W+{d})", f"rank {d}", f"σ_1({d})", f"#σ({d})>σ_max(W)"]
        rows = []
        for r in result.reports:
            s = r.stats
            row = [r.name, "x".join(map(str, r.shape)), r.dtype, number(s.sigma_max), number(s.sigma_min),
                   number(s.kappa), number(s.fro), number(s.stable_rank)]
            if with_delta:
                e, dd = r.edited, r.delta
                row += [number(e.kappa if e else None), number(e.sigma_max if e else None),
                        str(dd.rank) if dd else "-", number(dd.sigma_max if dd else None),
                        str(dd.n_above_sigma_max) if dd else "-"]
            rows.append(row)
        title = "singular spectra" + (f" (W, and W + {d} where a delta touches it)" if with_delta else "")
        out.table(title, columns, rows, right=columns[3:])
        if with_delta and result.restrained and any(r.delta and r.delta.n_above_sigma_max for r in result.reports):
            out.note(f"#σ({d})>σ_max(W) counts values above sigma_max(W) after the restraint: log and linear F shrink "
                     "them but keep them above sigma_max by design (scale-free strength 1 cuts them to it)")
    if result.options.plot is not None:
        out.note(f"wrote {result.options.plot}")
