"""`prunecli prune`: apply the PRUNE restraint to a delta file against its base checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from prunecli.commands._display import cli_progress
from prunecli.commands._errors import guarded
from prunecli.commands._options import (
    AllowPickle,
    BaseDelta,
    Device,
    Force,
    IgnoreBaseMismatch,
    Out,
    OutputFile,
    Restraint,
    Select,
)
from prunecli.commands._output import number
from prunecli.core.restraint_functions import RestraintSettings


@guarded
def main(base_delta: BaseDelta, output: OutputFile, out: Out, restraint: Restraint, select: Select = None,
         no_kappa: Annotated[bool, typer.Option("--no-kappa", help="Skip the condition numbers of W, W + D, W + D' "
                                                "(one Gram matrix of W per matrix; not with --target-kappa).")] = False,
         device: Device = "auto", force: Force = False, ignore_base_mismatch: IgnoreBaseMismatch = False,
         allow_pickle: AllowPickle = False) -> None:
    """Restrain the large singular values of DELTA (PRUNE, ICLR 2025) and write the restrained delta.

    For each edited matrix W of BASE (never edited) and its update D = U diag(s) V^T, every singular value s above
    smax = sigma_max(W) becomes F(s) (--fn: log, the paper's default, linear, or scale-free; --target-kappa K finds
    per matrix the mildest scale-free F with kappa(W + D') <= K). The paper's log F only shrinks values when
    smax * ln(alpha) >= 1 (smax >= 5.49 for alpha 1.2) and enlarges those just above smax otherwise (a warning says
    so); scale-free F acts the same on any model and never enlarges (docs/RESTRAINT.md). The delta stays low rank.
    Reports, per matrix, how many values were restrained and kappa of W, W + D and W + D'. With --select only the
    matching entries are restrained (the others are kept).

    Example: prunecli prune smollm2 edits.safetensors --fn log --alpha 1.2 -o pruned.safetensors

    Example: prunecli prune smollm2 edits.safetensors --target-kappa 25 -o pruned-k25.safetensors
    """
    from prunecli.api.prune import PruneOptions, run_prune

    if no_kappa and restraint.target_kappa is not None:
        raise typer.BadParameter("--target-kappa needs the condition numbers", param_hint="--no-kappa")
    base, delta = base_delta
    options = PruneOptions(base, delta, output, restraint, tuple(select or ()), not no_kappa, device, force,
                           ignore_base_mismatch, allow_pickle)
    with cli_progress() as progress:
        result = run_prune(options, progress)
    out.result(result.to_json(), lambda: _render(out, result.reports, restraint, output, len(result.reports)))


def _render(out: Out, reports: list, restraint: RestraintSettings, output: Path, n: int) -> None:
    out.table(f"PRUNE ({restraint.fn})", ["tensor", "smax(W)", "restrained/rank", "strength", "kappa(W)",
                                          "kappa(W+D)", "kappa(W+D')", "top s -> F(s)"],
              [[r.name, number(r.info.sigma_max), f"{r.info.n_restrained}/{r.info.rank}", number(r.info.strength),
                number(r.kappa_base), number(r.kappa_edited), number(r.kappa_pruned),
                f"{r.info.top_before[0]:.4g} -> {r.info.top_after[0]:.4g}" if r.info.top_before else "-"]
               for r in reports], right=["smax(W)", "strength", "kappa(W)", "kappa(W+D)", "kappa(W+D')"])
    out.note(f"wrote {output} ({n} tensor(s) restrained with {restraint.fn} F)")
