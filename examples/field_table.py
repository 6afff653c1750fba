"""The table of `field.mk`: one row per method configuration of one model, from its edit summary (`edit --json`) and
its evaluation report (`evaluate -o`).

Usage: python field_table.py WORK CONFIG... > WORK/table.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

METRICS = ("efficacy_score", "paraphrase_score", "neighborhood_score")


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _score(report: dict[str, Any], name: str) -> str:
    value = report["metrics"].get(name)
    if value is None:
        return "-"
    low_high = report.get("interval", {}).get(name)
    return f"{value:.3f}" + (f" [{low_high[0]:.2f}, {low_high[1]:.2f}]" if low_high else "")


def row(label: str, report: dict[str, Any], edit: dict[str, Any] | None) -> list[str]:
    scores = [_score(report, m) for m in METRICS]
    perplexity = f"{report['metrics']['perplexity']:.2f}"
    if edit is None:
        return [label, *scores, perplexity, "-", "-", "-"]
    took = f"{edit['edits'] - edit['failed_edits']}/{edit['edits']}"
    dropped = str(len(edit.get("nas_dropped_records", []))) if "nas" in label else "-"
    return [label, *scores, perplexity, f"{edit['seconds_per_edit']:.2f}", took, dropped]


def main(work: Path, configs: list[str]) -> None:
    header = ["method", "efficacy", "paraphrase", "neighborhood", "perplexity", "s/fact", "took", "NAS dropped"]
    rows = [row("unedited", _read(work / "unedited.eval.json"), None)]
    rows += [row(c, _read(work / f"{c}.eval.json"), _read(work / f"{c}.edit.json")) for c in configs]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
