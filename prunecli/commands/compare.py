"""`prunecli compare`: evaluation reports side by side. Reads JSON only: no torch, no model, starts instantly."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.text import Text

from prunecli.commands._errors import guarded
from prunecli.commands._options import Out

if TYPE_CHECKING:
    from prunecli.evaluation.report import Comparison

_TESTS = {"mcnemar-exact": "McNemar exact", "mcnemar-chi2-cc": "McNemar chi2", "paired-bootstrap": "bootstrap"}
"""Short names of the paired tests for the table (McNemar's: with the discordant counts first-only/other-only)."""


def compare_files(paths: list[Path], out: Out) -> None:
    """Load the reports, warn about protocol, case-count and record mismatches, print the tables (or JSON)."""
    from prunecli.evaluation.report import compare_reports, load_report

    reports = [load_report(p) for p in paths]
    stems = [Path(p).stem for p in paths]
    labels = stems if len(set(stems)) == len(stems) else [str(p) for p in paths]
    cmp = compare_reports(reports, labels)
    for group in cmp.protocol_mismatch:
        out.warn(f"protocol {group!r} differs between the reports: its numbers are not comparable")
    if cmp.n_mismatch:
        out.warn(f"computed over different case counts (*): {', '.join(cmp.n_mismatch)}")
    for line in cmp.unpaired:
        out.warn(line)
    if cmp.without_outcomes and len(cmp.labels) > 1:
        out.note(f"no per-record outcomes in {', '.join(cmp.without_outcomes)} (written before report version 2): "
                 "no intervals or paired tests with it")
    summary = {"reports": [str(p) for p in paths], "labels": cmp.labels,
               "metrics": {m: {"values": cmp.values[m], "n": cmp.n[m], "n_nonfinite": cmp.n_nonfinite[m],
                               "interval": [list(b) if b else None for b in cmp.intervals[m]],
                               "group": cmp.group.get(m)} for m in cmp.metrics},
               "protocol_mismatch": cmp.protocol_mismatch, "n_mismatch": cmp.n_mismatch,
               "paired": [p.to_json() for p in cmp.paired], "unpaired": cmp.unpaired}
    out.result(summary, lambda: _render(out, cmp))


def _render(out: Out, cmp: Comparison) -> None:
    from prunecli.evaluation.report import format_interval, format_value

    rows = []
    for m in cmp.metrics:
        cells = []
        for value, bad, bounds in zip(cmp.values[m], cmp.n_nonfinite[m], cmp.intervals[m]):
            shown = Text(format_value(value) + (f" {format_interval(bounds)}" if bounds is not None else ""))
            cells.append(shown + (Text(f" ({bad} NaN/Inf)", style="red") if bad else Text("")))
        name = Text(m) + (Text(" *", style="yellow") if m in cmp.n_mismatch else Text(""))
        rows.append([name, *cells, cmp.group.get(m, "")])
    out.table("evaluation reports side by side (95 % intervals)", ["metric", *cmp.labels, "protocol"], rows,
              right=cmp.labels)
    if not cmp.paired:
        return
    several = len(cmp.labels) > 2
    paired_rows = []
    for row in cmp.paired:
        r = row.result
        difference = ("+" if r.difference >= 0 else "") + format_value(r.difference)
        if r.interval is not None:
            difference += f" {format_interval(r.interval)}"
        test = _TESTS[r.test] + (f" {r.discordant[0]}/{r.discordant[1]}" if r.discordant else "")
        verdict = Text("within noise") if r.within_noise else Text("differs", style="bold")
        paired_rows.append([row.metric, *([row.label] if several else []), difference, test, f"{r.p:.2g}", verdict])
    out.table(f"paired differences against {cmp.labels[0]}, record by record",
              ["metric", *(["report"] if several else []), "difference [95 %]", "test", "p", "verdict"], paired_rows,
              right=["difference [95 %]", "p"])


@guarded
def main(reports: Annotated[list[Path], typer.Argument(metavar="REPORT.json...", help="Report files written by "
                                                       "`prunecli evaluate -o`.")],
         out: Out) -> None:
    """Line evaluation reports up side by side, warning when their protocols or case counts differ.

    Metrics computed under different protocols (another window, other prompts, another reference model) are flagged
    instead of silently compared. Each value shows its 95 % interval; every later report is compared with the first
    record by record when both scored the same records (McNemar for success rates, a paired bootstrap for means),
    and a difference within noise says so. `prunecli evaluate --compare` is the same command.

    Example: prunecli compare base.json pruned.json
    """
    compare_files(reports, out)
