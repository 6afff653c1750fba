"""`prunecli compare`: evaluation reports side by side. Reads JSON only: no torch, no model, starts instantly."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from prunecli.commands._errors import guarded
from prunecli.commands._options import Out


def compare_files(paths: list[Path], out: Out) -> None:
    """Load the reports, warn about protocol and case-count mismatches, print the table (or JSON)."""
    from prunecli.evaluation.report import compare_reports, format_value, load_report

    reports = [load_report(p) for p in paths]
    stems = [Path(p).stem for p in paths]
    labels = stems if len(set(stems)) == len(stems) else [str(p) for p in paths]
    cmp = compare_reports(reports, labels)
    for group in cmp.protocol_mismatch:
        out.warn(f"protocol {group!r} differs between the reports: its numbers are not comparable")
    if cmp.n_mismatch:
        out.warn(f"computed over different case counts (*): {', '.join(cmp.n_mismatch)}")
    summary = {"reports": [str(p) for p in paths], "labels": cmp.labels,
               "metrics": {m: {"values": cmp.values[m], "n": cmp.n[m], "n_nonfinite": cmp.n_nonfinite[m],
                               "group": cmp.group.get(m)} for m in cmp.metrics},
               "protocol_mismatch": cmp.protocol_mismatch, "n_mismatch": cmp.n_mismatch}

    def render() -> None:
        rows = []
        for m in cmp.metrics:
            cells = [Text(format_value(v)) + (Text(f" ({bad} NaN/Inf)", style="red") if bad else Text(""))
                     for v, bad in zip(cmp.values[m], cmp.n_nonfinite[m])]
            name = Text(m) + (Text(" *", style="yellow") if m in cmp.n_mismatch else Text(""))
            rows.append([name, *cells, cmp.group.get(m, "")])
        out.table("evaluation reports side by side", ["metric", *cmp.labels, "protocol"], rows, right=cmp.labels)

    out.result(summary, render)


@guarded
def main(reports: Annotated[list[Path], typer.Argument(metavar="REPORT.json...", help="Report files written by "
                                                       "`prunecli evaluate -o`.")],
         out: Out) -> None:
    """Line evaluation reports up side by side, warning when their protocols or case counts differ.

    Metrics computed under different protocols (another window, other prompts, another reference model) are flagged
    instead of silently compared. `prunecli evaluate --compare` is the same command.

    Example: prunecli compare base.json pruned.json
    """
    compare_files(reports, out)
