"""The docs/RESULTS.md table of the restraint study (issue 15) from one model's work folder (see study.sh).

    python examples/restraint/table.py WORK N        # prints a Markdown table

Rows: the unedited model, N sequential ROME edits without restraint, PRUNE once with the paper's log F (alpha 1.2),
scale-free F once (strength 0.5), --target-kappa 1.25 x kappa(W) once, and adaptive restraint during editing
(--kappa-trigger 1.25 x kappa(W) --target-kappa 1.1 x kappa(W)). kappa is that of the edited matrix (the worst one if
several), from the prune reports or `prunecli inspect --delta`; the metrics from `prunecli evaluate` (CounterFact
scores on the N edited
records, WikiText perplexity).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROWS = [("base", "unedited"), ("edited", "no restraint"), ("paper", "paper once (log, alpha 1.2)"),
        ("scalefree", "scale-free once (strength 0.5)"), ("target", "--target-kappa 1.25 x kappa(W) once"),
        ("adaptive", "adaptive (trigger 1.25, target 1.1 x kappa(W))")]


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def _kappa(work: Path, kind: str, n: int) -> float | None:
    """kappa of W + D (worst edited matrix) for a row: from the prune reports where one exists (they hold kappa(W),
    kappa(W + D) and kappa(W + D')), otherwise from `inspect --delta`."""
    pruned = [r for r in (_load(work / f"{k}-{n}.json") for k in ("paper", "scalefree", "target")) if r]
    own = _load(work / f"{kind}-{n}.json") if kind in ("paper", "scalefree", "target") else None
    field = {"base": "kappa_base", "edited": "kappa_edited"}.get(kind, "kappa_pruned")
    report = own or (pruned[0] if pruned and kind in ("base", "edited") else None)
    if report is not None:
        return max(float(t[field]) for t in report["tensors"])
    inspect = _load(work / f"{kind}-{n}.inspect.json")
    touched = [t for t in inspect["tensors"] if t.get("edited")] if inspect else []
    return max(float(t["edited"]["kappa"]) for t in touched) if touched else None


def _detail(work: Path, kind: str, n: int) -> str:
    if kind in ("paper", "scalefree", "target"):
        report = _load(work / f"{kind}-{n}.json")
        if report is None:
            return ""
        tensors = report["tensors"]
        parts = [f"{sum(t['n_restrained'] for t in tensors)} values restrained"]
        if kind == "target":
            parts.append("strength " + ", ".join(f"{t['strength']:.3f}" for t in tensors))
        if kind == "paper":
            parts.append(f"{sum(t['n_enlarged'] for t in tensors)} enlarged")
        return "; ".join(parts)
    if kind == "adaptive":
        summary = _load(work / f"adaptive-{n}.json")
        return "" if summary is None else f"{len(summary['restraint_points'])} restraints"
    return ""


def table(work: Path, n: int) -> str:
    lines = ["| | κ(W + D) | efficacy | paraphrase | neighborhood | perplexity | restraint |",
             "|---|---|---|---|---|---|---|"]
    for kind, label in ROWS:
        metrics = (_load(work / f"{kind}-{n}.eval.json") or {}).get("metrics", {})
        kappa = _kappa(work, kind, n)
        cells = [f"{kappa:.1f}" if kappa is not None else "-"]
        cells += [f"{metrics[k]:.3f}" if k in metrics else "-"
                  for k in ("efficacy_score", "paraphrase_score", "neighborhood_score")]
        cells.append(f"{metrics['perplexity']:.2f}" if "perplexity" in metrics else "-")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {_detail(work, kind, n)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(Path(sys.argv[1]), int(sys.argv[2])))
