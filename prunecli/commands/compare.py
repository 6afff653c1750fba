"""`prunecli compare`: evaluation reports side by side. Reads JSON only: no torch, no model, starts instantly."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from rich.markup import escape

from prunecli.commands._common import DebugOpt, JsonOpt, cell, emit_json, guarded, warn

if TYPE_CHECKING:
    from prunecli.evaluation.report import Comparison


def _comparison_table(cmp: Comparison) -> None:
    from rich.console import Console
    from rich.table import Table

    from prunecli.evaluation.report import format_value

    table = Table(title="evaluation reports side by side")
    table.add_column("metric")
    for label in cmp.labels:
        table.add_column(cell(label), justify="right")
    table.add_column("protocol")
    for m in cmp.metrics:
        cells = []
        for value, bad in zip(cmp.values[m], cmp.n_nonfinite[m]):
            cells.append(format_value(value) + (f" [red]({bad} NaN/Inf)[/]" if bad else ""))
        table.add_row(escape(m) + (" [yellow]*[/]" if m in cmp.n_mismatch else ""), *cells,
                      cell(cmp.group.get(m, "")))
    Console().print(table)


def compare_files(paths: list[Path], json_out: bool) -> None:
    """Load the reports, warn about protocol and case-count mismatches, print the table (or JSON)."""
    from prunecli.evaluation.report import compare_reports, load_report

    reports = [load_report(p) for p in paths]
    stems = [Path(p).stem for p in paths]
    labels = stems if len(set(stems)) == len(stems) else [str(p) for p in paths]
    cmp = compare_reports(reports, labels)
    for group in cmp.protocol_mismatch:
        warn(f"protocol {group!r} differs between the reports: its numbers are not comparable")
    if cmp.n_mismatch:
        warn(f"computed over different case counts (*): {', '.join(cmp.n_mismatch)}")
    if json_out:
        emit_json({"reports": [str(p) for p in paths], "labels": cmp.labels,
                   "metrics": {m: {"values": cmp.values[m], "n": cmp.n[m], "n_nonfinite": cmp.n_nonfinite[m],
                                   "group": cmp.group.get(m)} for m in cmp.metrics},
                   "protocol_mismatch": cmp.protocol_mismatch, "n_mismatch": cmp.n_mismatch})
    else:
        _comparison_table(cmp)


def main(
    reports: Annotated[list[Path], typer.Argument(metavar="REPORT.json...", help="Report files written by "
                                                  "`prunecli evaluate -o`.")],
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Line evaluation reports up side by side, warning when their protocols or case counts differ.

    Metrics computed under different protocols (another window, other prompts, another reference model) are flagged
    instead of silently compared. `prunecli evaluate --compare` is the same command.

    Example: prunecli compare base.json edited.json pruned.json
    """
    guarded(debug, lambda: compare_files(reports, json_out))
