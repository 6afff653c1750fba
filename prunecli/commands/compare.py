"""`prunecli compare`: evaluation reports side by side. Reads JSON only: no torch, no model, starts instantly."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from rich.markup import escape

from prunecli.commands._common import DebugOpt, JsonOpt, cell, emit_json, guarded, note, warn

if TYPE_CHECKING:
    from rich.table import Table

    from prunecli.evaluation.report import Comparison


def _comparison_table(cmp: Comparison) -> None:
    from rich.console import Console
    from rich.table import Table

    from prunecli.evaluation.report import format_interval, format_value

    table = Table(title="evaluation reports side by side (95 % intervals)")
    table.add_column("metric", no_wrap=True)
    for label in cmp.labels:
        table.add_column(cell(label), justify="right")
    table.add_column("protocol")
    for m in cmp.metrics:
        cells = []
        for value, bad, bounds in zip(cmp.values[m], cmp.n_nonfinite[m], cmp.intervals[m]):
            shown = format_value(value) + (f" {format_interval(bounds)}" if bounds is not None else "")
            cells.append(shown + (f" [red]({bad} NaN/Inf)[/]" if bad else ""))
        table.add_row(escape(m) + (" [yellow]*[/]" if m in cmp.n_mismatch else ""), *cells,
                      cell(cmp.group.get(m, "")))
    console = Console()
    console.print(table)
    if cmp.paired:
        console.print(_paired_table(cmp))


def _paired_table(cmp: Comparison) -> Table:
    """Each later report minus the first, record by record: the difference, its test, and the verdict."""
    from rich.table import Table

    from prunecli.evaluation.report import format_interval, format_value

    several = len(cmp.labels) > 2
    table = Table(title=f"paired differences against {escape(cmp.labels[0])}, record by record")
    for col in ("metric", *(["report"] if several else []), "difference [95 %]", "test", "p", "verdict"):
        table.add_column(col, justify="right" if col in ("difference [95 %]", "p") else "left",
                         no_wrap=col in ("metric", "verdict"))
    for row in cmp.paired:
        r = row.result
        difference = ("+" if r.difference >= 0 else "") + format_value(r.difference)
        if r.interval is not None:
            difference += f" {format_interval(r.interval)}"
        test = _TESTS[r.test] + (f" {r.discordant[0]}/{r.discordant[1]}" if r.discordant else "")
        verdict = "within noise" if r.within_noise else "[bold]differs[/]"
        table.add_row(escape(row.metric), *([cell(row.label)] if several else []), difference, test, f"{r.p:.2g}",
                      verdict)
    return table


_TESTS = {"mcnemar-exact": "McNemar exact", "mcnemar-chi2-cc": "McNemar chi2", "paired-bootstrap": "bootstrap"}
"""Short names of the paired tests for the table (McNemar's: with the discordant counts first-only/other-only)."""


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
    for line in cmp.unpaired:
        warn(line)
    if cmp.without_outcomes and len(cmp.labels) > 1:
        note(f"no per-record outcomes in {', '.join(cmp.without_outcomes)} (written before report version 2): no "
             "intervals or paired tests with it")
    if json_out:
        emit_json({"reports": [str(p) for p in paths], "labels": cmp.labels,
                   "metrics": {m: {"values": cmp.values[m], "n": cmp.n[m], "n_nonfinite": cmp.n_nonfinite[m],
                                   "interval": [list(b) if b else None for b in cmp.intervals[m]],
                                   "group": cmp.group.get(m)} for m in cmp.metrics},
                   "protocol_mismatch": cmp.protocol_mismatch, "n_mismatch": cmp.n_mismatch,
                   "paired": [p.to_json() for p in cmp.paired], "unpaired": cmp.unpaired})
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
    instead of silently compared. Each value shows its 95 % interval; every later report is compared with the first
    record by record when both scored the same records (McNemar for success rates, a paired bootstrap for means),
    and a difference within noise says so. `prunecli evaluate --compare` is the same command.

    Example: prunecli compare base.json edited.json pruned.json
    """
    guarded(debug, lambda: compare_files(reports, json_out))
