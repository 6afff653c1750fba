"""`prunecli prune`: apply the PRUNE restraint to a delta file against its base checkpoint."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from prunecli.commands._common import (AllowPickleOpt, DebugOpt, DeviceOpt, ForceOpt, IgnoreBaseMismatchOpt, JsonOpt,
                                       cell, emit_json, guarded, note, progress_bar, warn)

if TYPE_CHECKING:
    from prunecli.core.restraint import TensorReport


class Fn(str, Enum):
    log = "log"
    linear = "linear"


def main(
    delta_path: Annotated[Path, typer.Argument(metavar="DELTA", help="Delta file (.safetensors) to restrain.")],
    base: Annotated[str, typer.Option("--base", help="The unedited checkpoint the delta was made for (folder, "
                                      ".safetensors file, or `smollm2`).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Restrained delta file to write (.safetensors).")],
    fn: Annotated[Fn, typer.Option("--fn", help="Restraint function F: log (paper) or linear (appendix C.3).")]
    = Fn.log,
    alpha: Annotated[float, typer.Option("--alpha", help="Base of the log in F (> 1; paper: 1.2, 1.5, 2 or e).")]
    = 1.2,
    beta: Annotated[float, typer.Option("--beta", help="Divisor of linear F (> 1; paper: 2).")] = 2.0,
    clamp: Annotated[bool, typer.Option("--clamp", help="Never enlarge a singular value: use min(s, F(s)) (log F "
                                        "enlarges values just above sigma_max when sigma_max * ln(alpha) < 1).")]
    = False,
    no_kappa: Annotated[bool, typer.Option("--no-kappa", help="Skip the condition numbers (dense spectra of W, "
                                           "W + D, W + D': the slow part on big matrices).")] = False,
    device: DeviceOpt = "auto",
    json_out: JsonOpt = False,
    force: ForceOpt = False,
    ignore_base_mismatch: IgnoreBaseMismatchOpt = False,
    allow_pickle: AllowPickleOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Restrain the large singular values of DELTA (PRUNE, ICLR 2025) and write the restrained delta.

    For each edited matrix W of BASE (never edited) and its update D = U diag(s) V^T, every singular value s above
    sigma_max(W) becomes F(s): log: log_alpha(s) - log_alpha(sigma_max) + sigma_max; linear: s/beta +
    (beta-1)/beta * sigma_max. The delta stays low rank and is never densified. Reports, per matrix, how many values
    were restrained and the condition numbers kappa of W, W + D and W + D'. DELTA must have been made for BASE
    (--ignore-base-mismatch accepts it anyway, with a warning); --force only replaces an earlier output.

    Example: prunecli prune edits.safetensors --base gpt2-xl/ --fn log --alpha 1.2 -o edits-pruned.safetensors
    """

    def body() -> None:
        from prunecli.core.atomic import check_output_path
        from prunecli.core.checkpoint import Checkpoint
        from prunecli.core.delta import Delta
        from prunecli.core.restraint import check_params, restrain_delta
        from prunecli.models.default_model import resolve_model_path
        from prunecli.models.loading import resolve_device

        check_params(fn.value, alpha, beta)
        base_path = resolve_model_path(base)
        check_output_path(output, force, is_dir=False, inputs=[("delta", delta_path), ("base checkpoint", base_path)])
        dev = resolve_device(device)
        base_ckpt = Checkpoint(base_path, allow_pickle=allow_pickle)
        delta = Delta.load(delta_path, base_ckpt)  # a PEFT adapter folder is read against the base it names
        delta.check_base(base_ckpt, ignore_base_mismatch)
        if delta.restraints:
            warn(f"{delta_path} was already restrained {len(delta.restraints)} time(s) (its history records "
                 f"prune with fn={delta.restraints[-1].get('fn')}); restraining it again")
        with progress_bar() as bar:
            task = bar.add_task("prune", total=len(delta.entries))
            pruned, reports = restrain_delta(delta, base_ckpt, fn.value, alpha, beta, kappa=not no_kappa,
                                             progress=lambda _name: bar.advance(task), clamp=clamp, device=dev)
        for r in reports:
            if r.info.warning:
                warn(f"{r.name}: {r.info.warning}")
        pruned.save(output, force)
        if json_out:
            emit_json({"delta": str(delta_path), "base": str(base_ckpt.path), "fn": fn.value, "alpha": alpha,
                       "beta": beta, "clamp": clamp, "output": str(output),
                       "tensors": [r.to_json() for r in reports]})
        else:
            _print_table(reports, fn.value)
            note(f"wrote {output} ({len(pruned.entries)} tensor(s) restrained with {fn.value} F)")

    guarded(debug, body)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def _print_table(reports: list[TensorReport], fn: str) -> None:
    from rich.console import Console
    from rich.table import Column, Table

    table = Table(Column("tensor", no_wrap=True), "smax(W)", "restrained/rank", "kappa(W)", "kappa(W+D)",
                  "kappa(W+D')", "top s -> F(s)", title=f"PRUNE ({fn})")
    for r in reports:
        i = r.info
        top = f"{i.top_before[0]:.4g} -> {i.top_after[0]:.4g}" if i.top_before else "-"
        table.add_row(cell(r.name), f"{i.sigma_max:.4g}", f"{i.n_restrained}/{i.rank}", _fmt(r.kappa_base),
                      _fmt(r.kappa_edited), _fmt(r.kappa_pruned), top)
    console = Console()
    if not console.is_terminal:  # piped: no need to squeeze the table into 80 columns
        console.width = max(console.width, 160)
    console.print(table)
