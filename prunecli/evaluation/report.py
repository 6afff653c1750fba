"""Evaluation reports: one JSON object per run, and the side-by-side comparison of several runs.

A report carries, next to each metric's value, its case count `n`, its count of NaN/Inf cases `n_nonfinite` and the
protocol group whose text says exactly how it was computed. Comparing reports whose protocol texts differ (another
window, other prompts, another reference model) is flagged instead of silently lining the numbers up.

Version 2 adds, per metric, a 95 % `interval` (`interval_method`: wilson or bootstrap) and its per-record `outcomes`
(aligned with its group's `records`: ids and a content digest), and per generation protocol the decoded texts
(`generations`). Two reports that scored the same records (same ids, same digest, same protocol) are compared record
by record (`evaluation.uncertainty`: McNemar for proportions, a paired bootstrap otherwise); version 1 reports load
and compare side by side as before, without intervals.
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
from prunecli.evaluation.uncertainty import LEVEL, RESAMPLES, SEED, Outcomes, PairedDifference, paired_difference
from prunecli.jsonio import dumps_json  # NaN-safe JSON, the same as --json prints

if TYPE_CHECKING:
    from prunecli.evaluation.base import TaskOutcome

FORMAT = "prunecli-eval-report"
VERSION = 2


def build_report(model: str, deltas: Sequence[str], info: dict[str, Any],
                 outcomes: Sequence[tuple[str, TaskOutcome, float]]) -> dict[str, Any]:
    """The report object from (task name, outcome, seconds) triples; `info` adds run settings (edits, tasks, ...)."""
    protocol: dict[str, str] = {}
    group: dict[str, str] = {}
    n: dict[str, int] = {}
    nonfinite: dict[str, int] = {}
    metrics: dict[str, float] = {}
    interval: dict[str, list[float]] = {}
    method: dict[str, str] = {}
    timing: dict[str, dict[str, Any]] = {}
    records: dict[str, Any] = {}
    per_record: dict[str, Any] = {}
    generations: dict[str, Any] = {}
    for task, outcome, seconds in outcomes:
        for g in outcome.groups:
            protocol[g.name] = g.protocol
            if g.records is not None:
                records[g.name] = g.records.to_json()
            if g.generations is not None:
                generations[g.name] = g.generations
            for name, value in g.metrics.items():
                group[name], metrics[name], n[name], nonfinite[name] = g.name, value.value, value.n, value.n_nonfinite
                if value.outcomes is None or g.records is None:
                    continue
                per_record[name] = value.outcomes.to_json()
                bounds = value.outcomes.interval()
                if bounds is not None:
                    interval[name], method[name] = list(bounds), value.outcomes.method
        timing[task] = {"seconds": round(seconds, 3), "count": outcome.cases, "unit": outcome.unit,
                        "per_second": round(outcome.cases / seconds, 3) if seconds > 0 else None}
    return {"format": FORMAT, "version": VERSION, "model": model, "deltas": list(deltas), **info,
            "protocol": protocol, "metric_group": group, "n": n, "n_nonfinite": nonfinite, "metrics": metrics,
            "interval": interval, "interval_method": method,
            "interval_settings": {"level": LEVEL, "bootstrap_resamples": RESAMPLES, "bootstrap_seed": SEED},
            "timing": timing, "records": records, "outcomes": per_record, "generations": generations}


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
    try:
        report["interval"] = {k: (float(lo), float(hi)) for k, (lo, hi) in report.get("interval", {}).items()}
        report["outcomes"] = {k: Outcomes.from_json(v) for k, v in report.get("outcomes", {}).items()}
        report["records"] = {g: (list(r["ids"]), str(r["digest"])) for g, r in report.get("records", {}).items()}
    except (AttributeError, KeyError, TypeError, ValueError):
        raise PruneCliError(f"report {path} has malformed intervals, records or per-record outcomes") from None
    return report


@dataclass(frozen=True)
class Paired:
    """One metric of report `label` against the first report, record by record."""

    metric: str
    label: str
    result: PairedDifference

    def to_json(self) -> dict[str, Any]:
        return {"metric": self.metric, "report": self.label, **self.result.to_json()}


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
    intervals: dict[str, list[tuple[float, float] | None]]  # metric -> one 95 % interval per report (None: none)
    paired: list[Paired]  # every later report against the first, where both scored the same records
    unpaired: list[str]  # one line per later report whose records differ from the first's
    without_outcomes: list[str]  # reports that kept no per-record outcomes (version 1): no paired tests


def compare_reports(reports: Sequence[dict[str, Any]], labels: Sequence[str]) -> Comparison:
    """Reports (as `load_report` reads them) side by side, and every later one paired with the first."""
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
    intervals = {m: [r.get("interval", {}).get(m) for r in reports] for m in names}
    paired: list[Paired] = []
    unpaired: list[str] = []
    for label, report in zip(labels[1:], reports[1:]):
        found, different = _paired(reports[0], report, label, [m for m in names if group[m] not in mismatch])
        paired += found
        if different:
            unpaired.append(f"no paired test of {label} against {labels[0]}: they scored different records "
                            f"({', '.join(different)}); side by side only")
    without = [label for label, r in zip(labels, reports) if not r.get("outcomes")]
    return Comparison(list(labels), names, values, n, bad, group, mismatch, n_mismatch, intervals, paired, unpaired,
                      without)


def _paired(first: dict[str, Any], other: dict[str, Any], label: str, metrics: Sequence[str]
            ) -> tuple[list[Paired], list[str]]:
    """Paired differences of `metrics` (other minus first) where both reports kept per-record outcomes of the same
    records, and the groups whose records differ."""
    found, different = [], []
    for m in metrics:
        a, b = first.get("outcomes", {}).get(m), other.get("outcomes", {}).get(m)
        g = first.get("metric_group", {}).get(m)
        if a is None or b is None or g != other.get("metric_group", {}).get(m):
            continue
        if first.get("records", {}).get(g) != other.get("records", {}).get(g):
            different.append(g)
            continue
        result = paired_difference(a, b)
        if result is not None:
            found.append(Paired(m, label, result))
    return found, list(dict.fromkeys(different))


def format_value(value: float | None) -> str:
    if value is None:
        return "-"
    if math.isnan(value) or math.isinf(value):
        return str(value)
    return f"{value:.4g}" if abs(value) >= 100 else f"{value:.4f}"


def format_interval(bounds: Sequence[float] | None) -> str:
    """A 95 % interval as [lo, hi], or "-" when none was recorded (version 1 reports, non-finite metrics)."""
    return "-" if bounds is None else f"[{format_value(bounds[0])}, {format_value(bounds[1])}]"
