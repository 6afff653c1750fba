"""Evaluation reports: one JSON object per run, and the side-by-side comparison of several runs.

A report carries, next to each metric's value, its case count `n`, its count of NaN/Inf cases `n_nonfinite` and the
protocol group whose text says exactly how it was computed. Comparing reports whose protocol texts differ (another
window, other prompts, another reference model) is flagged instead of silently lining the numbers up.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prunecli.core.atomic import atomic_file
from prunecli.core.textio import read_text
from prunecli.errors import PruneCliError
from prunecli.jsonio import dumps_json  # NaN-safe JSON, the same as --json prints

if TYPE_CHECKING:
    from prunecli.evaluation.base import TaskOutcome

FORMAT = "prunecli-eval-report"
VERSION = 1


def build_report(model: str, deltas: Sequence[str], info: dict[str, Any],
                 outcomes: Sequence[tuple[str, TaskOutcome, float]]) -> dict[str, Any]:
    """The report object from (task name, outcome, seconds) triples; `info` adds run settings (edits, tasks, ...)."""
    protocol: dict[str, str] = {}
    group: dict[str, str] = {}
    n: dict[str, int] = {}
    nonfinite: dict[str, int] = {}
    metrics: dict[str, float] = {}
    timing: dict[str, dict[str, Any]] = {}
    for task, outcome, seconds in outcomes:
        for g in outcome.groups:
            protocol[g.name] = g.protocol
            for name, value in g.metrics.items():
                group[name], metrics[name], n[name], nonfinite[name] = g.name, value.value, value.n, value.n_nonfinite
        timing[task] = {"seconds": round(seconds, 3), "count": outcome.cases, "unit": outcome.unit,
                        "per_second": round(outcome.cases / seconds, 3) if seconds > 0 else None}
    return {"format": FORMAT, "version": VERSION, "model": model, "deltas": list(deltas), **info,
            "protocol": protocol, "metric_group": group, "n": n, "n_nonfinite": nonfinite, "metrics": metrics,
            "timing": timing}


def write_report(report: dict[str, Any], path: Path, force: bool) -> None:
    with atomic_file(path, force) as tmp:
        tmp.write_text(dumps_json(report, indent=2) + "\n", encoding="utf-8")


def load_report(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise PruneCliError(f"report {path} does not exist")
    try:
        report = json.loads(read_text(path, "report"))
    except RecursionError:
        raise PruneCliError(f"report {path} is nested too deeply to be a report") from None
    except json.JSONDecodeError as exc:
        raise PruneCliError(f"report {path} is not JSON: {exc}") from None
    if not isinstance(report, dict) or report.get("format") != FORMAT or not isinstance(report.get("metrics"), dict):
        raise PruneCliError(f"{path} is not a prunecli evaluation report (write one with `prunecli evaluate -o`)")
    if not isinstance(report.get("version"), int) or report["version"] > VERSION:
        raise PruneCliError(f"report {path} has format version {report.get('version')!r}; this prunecli reads "
                            f"<= {VERSION}")
    try:
        # float() also reads back "nan"/"inf", the strings JSON output uses for non-finite numbers.
        report["metrics"] = {k: float(v) for k, v in report["metrics"].items()}
    except (TypeError, ValueError):
        raise PruneCliError(f"report {path} has a non-numeric metric value") from None
    return report


@dataclass(frozen=True)
class Comparison:
    labels: list[str]
    metrics: list[str]  # in first-seen order
    values: dict[str, list[float | None]]  # metric -> one value per report (None: absent)
    n: dict[str, list[int | None]]
    n_nonfinite: dict[str, list[int | None]]
    group: dict[str, str]
    protocol_mismatch: list[str]  # groups whose protocol text differs between reports
    n_mismatch: list[str]  # metrics computed over different case counts


def compare_reports(reports: Sequence[dict[str, Any]], labels: Sequence[str]) -> Comparison:
    metrics: dict[str, None] = {}
    group: dict[str, str] = {}
    for r in reports:
        for m in r["metrics"]:
            metrics.setdefault(m)
            group.setdefault(m, r.get("metric_group", {}).get(m, ""))
    names = list(metrics)
    values = {m: [r["metrics"].get(m) for r in reports] for m in names}
    n = {m: [r.get("n", {}).get(m) for r in reports] for m in names}
    bad = {m: [r.get("n_nonfinite", {}).get(m) for r in reports] for m in names}
    texts: dict[str, set[str]] = {}
    for r in reports:
        for g, text in r.get("protocol", {}).items():
            texts.setdefault(g, set()).add(text)
    mismatch = sorted(g for g, t in texts.items() if len(t) > 1)
    n_mismatch = [m for m in names if len({c for c in n[m] if c is not None}) > 1]
    return Comparison(list(labels), names, values, n, bad, group, mismatch, n_mismatch)


def format_value(value: float | None) -> str:
    if value is None:
        return "-"
    if math.isnan(value) or math.isinf(value):
        return str(value)
    return f"{value:.4g}" if abs(value) >= 100 else f"{value:.4f}"
