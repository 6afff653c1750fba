"""`prunecli inspect`: singular spectra (sigma_max, sigma_min, kappa, norm, stable rank) of weight matrices."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer

from prunecli.commands._common import (AllowPickleOpt, DebugOpt, DeviceOpt, IgnoreBaseMismatchOpt, JsonOpt, cell,
                                       emit_json, guarded, track, warn)

if TYPE_CHECKING:
    from prunecli.core.inspection import DeltaEntryReport, MatrixReport
    from prunecli.plotting import Spectra


class GramPrecision(str, Enum):
    auto = "auto"
    float32 = "float32"
    float64 = "float64"


def main(
    path: Annotated[str, typer.Argument(help="Checkpoint folder, .safetensors file, prunecli delta file, or `smollm2`.",
                                        show_default=False)],
    delta: Annotated[list[str] | None, typer.Option("--delta", "-d", help="Delta file(s) to add to the checkpoint "
                                                    "(composed in order); reports W + D and D for touched matrices.")]
    = None,
    select: Annotated[list[str] | None, typer.Option("--select", "-s", help="Glob(s) on tensor names (canonical or as "
                                                     "stored), e.g. '*.mlp.c_proj.weight'. Default: every 2-D "
                                                     "matrix, or with --delta the matrices it touches.")] = None,
    exact: Annotated[bool, typer.Option("--exact", help="Float64 SVD instead of the fast Gram + eigvalsh path "
                                        "(needed when kappa approaches 1e7).")] = False,
    precision: Annotated[GramPrecision, typer.Option(
        "--precision", help="Gram path: float64, or float32 (about twice as fast; kept only where every singular "
        "value is provably within 1e-3 relative of float64, i.e. small kappa; float64 elsewhere). auto: float32 for "
        "a whole checkpoint (no --select, no --delta), float64 otherwise. See docs/SPECTRA.md.")] = GramPrecision.auto,
    json_out: JsonOpt = False,
    plot: Annotated[Path | None, typer.Option(
        "--plot", help="Write a PNG of the singular spectra (log-log; one panel per edited matrix with W, W + D and "
        "D, sigma_max(W) marked). Needs matplotlib.", dir_okay=False)] = None,
    top: Annotated[int, typer.Option("--top", min=1, help="How many top singular values of each delta to report.")]
    = 5,
    device: DeviceOpt = "auto",
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing --plot file (never an input).")]
    = False,
    ignore_base_mismatch: IgnoreBaseMismatchOpt = False,
    allow_pickle: AllowPickleOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Report the singular spectra of a checkpoint's weight matrices: sigma_max, sigma_min, kappa, norm, stable rank.

    Fast path: eigenvalues of the smaller Gram matrix in float64 (accurate while kappa << 1e7), or in float32 where
    that is provably within 1e-3 (--precision; the default for a whole checkpoint); --exact: float64 SVD.

    With --delta: also W + D, and the rank and top singular values of D (computed from its low-rank factors).

    PATH may be a delta file: then each entry's rank, norm and top singular values are reported.

    Example: prunecli inspect ./gpt2-xl --delta edits.safetensors --select '*.17.mlp.c_proj.weight' --plot s.png
    """

    def body() -> None:
        from prunecli.core.atomic import check_output_path, labelled
        from prunecli.core.artifacts import DELTA, is_artifact
        from prunecli.core.checkpoint import Checkpoint
        from prunecli.core.delta import Delta
        from prunecli.core.inspection import (checkpoint_candidates, checkpoint_reports, default_checkpoint_selection,
                                              delta_reports)
        from prunecli.core.peft_io import load_deltas
        from prunecli.core.selection import select_entries, select_names
        from prunecli.errors import PruneCliError
        from prunecli.models.default_model import resolve_model_path
        from prunecli.models.loading import resolve_device

        target = resolve_model_path(path)
        delta_paths = list(delta or [])
        if plot is not None:
            from prunecli.plotting import require_matplotlib

            check_output_path(plot, force, is_dir=False,
                              inputs=[("inspected file", target), *labelled("delta", delta_paths)])
            require_matplotlib()
        dev = resolve_device(device)
        whole = not select and not delta_paths  # auto: float32 for a whole checkpoint, where speed matters
        gram: Literal["float32", "float64"] = ("float32" if precision is GramPrecision.float32
                                               or (precision is GramPrecision.auto and whole) else "float64")
        reports: list[Any]
        tensors_json: list[dict[str, Any]]
        if is_artifact(target, DELTA):
            if delta_paths:
                raise PruneCliError(f"{target} is a delta file; --delta needs a checkpoint PATH to add deltas to")
            d = Delta.load(target)
            names = select_entries(d.entries, select, d.model_type)
            reports = list(track(delta_reports(d, names, exact=exact, device=dev, top_k=top,
                                               keep_spectra=plot is not None), len(names), "delta spectra"))
            tensors_json = [r.to_json() for r in reports]
            kind = "delta"
        else:
            ckpt = Checkpoint(target, allow_pickle=allow_pickle)
            composed = load_deltas(delta_paths, ckpt)
            if select:
                not_2d = [n for n in ckpt.names() if len(ckpt.info(n).shape) != 2]
                names = select_names(checkpoint_candidates(ckpt), select, ignored=not_2d)
            else:
                names = default_checkpoint_selection(ckpt, composed)
            if not names:
                raise PruneCliError(f"{target} holds no 2-D matrix to inspect")
            reports = list(track(checkpoint_reports(ckpt, names, composed, exact=exact, device=dev, top_k=top,
                                                    keep_spectra=plot is not None,
                                                    ignore_base_mismatch=ignore_base_mismatch, precision=gram),
                                 len(names), "spectra"))
            tensors_json = [r.to_json(with_delta=composed is not None) for r in reports]
            kind = "checkpoint"
            if not exact:
                _warn_ill_conditioned(reports)
        if plot is not None:
            from prunecli.plotting import plot_spectra

            plot_spectra(_plot_items(reports), plot, f"singular spectra of {target.name}", force)
        if json_out:
            emit_json({"path": str(target), "kind": kind, "deltas": delta_paths, "exact": exact,
                       "precision": None if exact or kind == "delta" else gram, "device": str(dev),
                       "tensors": tensors_json})
        elif kind == "delta":
            _print_delta_table(reports)
        else:
            _print_checkpoint_table(reports, bool(delta_paths))

    guarded(debug, body)


def _warn_ill_conditioned(reports: list[MatrixReport]) -> None:
    """The fast path's sigma_min degrades like eps64 * kappa^2: say so instead of printing a wrong kappa silently."""
    from prunecli.core.spectra import FAST_KAPPA_LIMIT

    bad = [r.name for r in reports
           if r.stats.kappa > FAST_KAPPA_LIMIT or (r.edited is not None and r.edited.kappa > FAST_KAPPA_LIMIT)]
    if bad:
        warn(f"{len(bad)} matri{'x has' if len(bad) == 1 else 'ces have'} kappa > {FAST_KAPPA_LIMIT:.0e} (first: "
             f"{bad[0]}); the fast path's sigma_min is not accurate there: rerun with --exact")


def _plot_items(reports: list[Any]) -> list[Spectra]:
    from prunecli.plotting import Spectra

    if reports and not hasattr(reports[0], "edited_spectrum"):  # a delta file alone: D's spectra
        return [Spectra(r.name, None, delta=r.spectrum) for r in reports]
    return [Spectra(r.name, r.spectrum, r.edited_spectrum, r.delta_spectrum) for r in reports]


def _stdout_console() -> Any:
    """Rich console for tables on stdout; not squeezed to 80 columns when piped to a file or pager."""
    from rich.console import Console

    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, 200)
    return console


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def _print_checkpoint_table(reports: list[MatrixReport], with_delta: bool) -> None:
    from rich.table import Table

    table = Table(title="singular spectra" + (" (W, and W + D where a delta touches it)" if with_delta else ""))
    table.add_column("tensor", overflow="fold")
    for col in ["stored shape", "dtype", "σ_max", "σ_min", "κ", "‖W‖_F", "stable rank"]:
        table.add_column(col, justify="right")
    if with_delta:
        for col in ["κ(W+D)", "σ_max(W+D)", "rank D", "σ_1(D)", "#σ(D)>σ_max(W)"]:
            table.add_column(col, justify="right")
    for r in reports:
        s = r.stats
        row = [cell(r.name), "x".join(map(str, r.shape)), r.dtype, _num(s.sigma_max), _num(s.sigma_min), _num(s.kappa),
               _num(s.fro), _num(s.stable_rank)]
        if with_delta:
            e, d = r.edited, r.delta
            row += [_num(e.kappa if e else None), _num(e.sigma_max if e else None), str(d.rank) if d else "-",
                    _num(d.sigma_max if d else None), str(d.n_above_sigma_max) if d else "-"]
        table.add_row(*row)
    _stdout_console().print(table)


def _print_delta_table(reports: list[DeltaEntryReport]) -> None:
    from rich.table import Table

    table = Table(title="delta entries")
    table.add_column("tensor", overflow="fold")
    for col in ["out x in", "kind", "rank", "σ_max", "‖D‖_F", "top singular values"]:
        table.add_column(col, justify="right")
    for r in reports:
        d = r.spectrum_stats
        table.add_row(cell(r.name), "x".join(map(str, r.shape)), r.kind, str(d.rank), _num(d.sigma_max), _num(d.fro),
                      ", ".join(_num(v) for v in d.top_singular_values))
    _stdout_console().print(table)
