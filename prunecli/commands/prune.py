"""`prunecli prune`: apply the PRUNE restraint to a delta file against its base checkpoint."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from prunecli.commands._common import (AllowPickleOpt, BaseDeltaArgs, BaseOldOpt, DebugOpt, DeviceOpt, ForceOpt,
                                       IgnoreBaseMismatchOpt, JsonOpt, SelectOpt, base_and_delta, cell, emit_json,
                                       guarded, note, cli_progress, warn)
from prunecli.commands._restraint import (AlphaOpt, BetaOpt, ClampOpt, FnOpt, StrengthOpt, TargetKappaOpt,
                                          restraint_settings)

if TYPE_CHECKING:
    from prunecli.core.restraint import TensorReport


def main(
    paths: BaseDeltaArgs,
    output: Annotated[Path, typer.Option("-o", "--output", help="Restrained delta file to write (.safetensors).")],
    select: SelectOpt = None,
    base_old: BaseOldOpt = None,
    fn: FnOpt = None,
    alpha: AlphaOpt = 1.2,
    beta: BetaOpt = 2.0,
    strength: StrengthOpt = 0.5,
    clamp: ClampOpt = False,
    target_kappa: TargetKappaOpt = None,
    no_kappa: Annotated[bool, typer.Option("--no-kappa", help="Skip the condition numbers of W, W + D, W + D' "
                                           "(one Gram matrix of W per matrix; not with --target-kappa).")] = False,
    device: DeviceOpt = "auto",
    json_out: JsonOpt = False,
    force: ForceOpt = False,
    ignore_base_mismatch: IgnoreBaseMismatchOpt = False,
    allow_pickle: AllowPickleOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Restrain the large singular values of DELTA (PRUNE, ICLR 2025) and write the restrained delta.

    For each edited matrix W of BASE (never edited) and its update D = U diag(s) V^T, every singular value s above
    smax = sigma_max(W) becomes F(s):

    \b
      log (paper, default)  F(s) = log_alpha(s) - log_alpha(smax) + smax      alpha > 1
      linear (paper)        F(s) = s/beta + (beta-1)/beta * smax             beta > 1
      scale-free            F(s) = smax * (s/smax)^(1 - t)                   t = --strength in [0, 1]

    The paper's log F depends on the scale of W: it only shrinks values when smax * ln(alpha) >= 1 (smax >= 5.49 for
    alpha 1.2) and enlarges those just above smax otherwise (a warning says so). Scale-free F depends only on s/smax,
    so it acts the same on any model, and never enlarges: s/smax > 1 and 1 - t <= 1 give (s/smax)^(1-t) <= s/smax
    (docs/RESTRAINT.md). --target-kappa K finds per matrix the mildest t with kappa(W + D') <= K. The delta stays low
    rank and is never densified. Reports, per matrix, how many values were restrained and kappa of W, W + D and
    W + D'. DELTA must have been made for BASE (--ignore-base-mismatch accepts it anyway, with a warning); --force
    only replaces an earlier output. With --select only the matching entries are restrained (the others are kept).

    Example: prunecli prune gpt2-xl/ edits.safetensors --fn log --alpha 1.2 -o edits-pruned.safetensors

    Example (any model): prunecli prune gemma3-270m edits.safetensors --target-kappa 30 -o edits-pruned.safetensors
    """
    base, delta_path = base_and_delta(paths, base_old)

    def body() -> None:
        from prunecli.core.atomic import check_output_path
        from prunecli.core.checkpoint import Checkpoint
        from prunecli.core.peft_io import load_delta
        from prunecli.core.restraint import restrain_delta
        from prunecli.core.selection import select_entries
        from prunecli.models.default_model import resolve_model_path
        from prunecli.models.loading import resolve_device

        settings = restraint_settings(fn, alpha, beta, strength, clamp, target_kappa)
        if no_kappa and target_kappa is not None:
            raise typer.BadParameter("--target-kappa needs the condition numbers", param_hint="--no-kappa")
        base_path = resolve_model_path(base)
        check_output_path(output, force, is_dir=False, inputs=[("delta", delta_path), ("base checkpoint", base_path)])
        dev = resolve_device(device)
        base_ckpt = Checkpoint(base_path, allow_pickle=allow_pickle)
        delta = load_delta(delta_path, base_ckpt)  # a PEFT adapter folder is read against the base it names
        delta.check_base(base_ckpt, ignore_base_mismatch)
        if delta.restraints:
            warn(f"{delta_path} was already restrained {len(delta.restraints)} time(s) (its history records "
                 f"prune with fn={delta.restraints[-1].get('fn')}); restraining it again")
        chosen = select_entries(delta.entries, select, delta.model_type)
        with cli_progress() as progress:
            pruned, reports = restrain_delta(replace(delta, entries={n: delta.entries[n] for n in chosen}), base_ckpt,
                                             **settings.kwargs(), kappa=not no_kappa, progress=progress, device=dev,
                                             record={"select": list(select)} if select else None)
        if select:  # the entries not selected are kept as they were
            pruned = replace(pruned, entries={n: pruned.entries.get(n, e) for n, e in delta.entries.items()})
        for r in reports:
            if r.info.warning:
                warn(f"{r.name}: {r.info.warning}")
        pruned.save(output, force)
        if json_out:
            emit_json({"delta": str(delta_path), "base": str(base_ckpt.path), **settings.kwargs(),
                       "output": str(output), "tensors": [r.to_json() for r in reports]})
        else:
            _print_table(reports, settings.fn)
            note(f"wrote {output} ({len(chosen)} tensor(s) restrained with {settings.fn} F)")

    guarded(debug, body)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def _print_table(reports: list[TensorReport], fn: str) -> None:
    from rich.console import Console
    from rich.table import Column, Table

    table = Table(Column("tensor", no_wrap=True), "smax(W)", "restrained/rank", "strength", "kappa(W)",
                  "kappa(W+D)", "kappa(W+D')", "top s -> F(s)", title=f"PRUNE ({fn})")
    for r in reports:
        i = r.info
        top = f"{i.top_before[0]:.4g} -> {i.top_after[0]:.4g}" if i.top_before else "-"
        table.add_row(cell(r.name), f"{i.sigma_max:.4g}", f"{i.n_restrained}/{i.rank}", _fmt(i.strength),
                      _fmt(r.kappa_base), _fmt(r.kappa_edited), _fmt(r.kappa_pruned), top)
    console = Console()
    if not console.is_terminal:  # piped: no need to squeeze the table into 80 columns
        console.width = max(console.width, 160)
    console.print(table)
