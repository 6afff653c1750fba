"""Collect the study's reports into results/summary.json and draw the paper-style plots.

Reads, under WORK: base/base-N.eval.json, and for each variant (rome, multiple, memit) the files
{edited,pruned-log-A,pruned-linear-B}-N.{eval,inspect}.json plus edited-N.json (the edit summary).
Writes RESULTS/summary.json (one row per model x method x mode x restraint x N, every metric and the condition
numbers) and RESULTS/{kappa,editing,general}.png (solid: edited, dashed: restrained, as in the paper's figures).

Usage: python summarize.py WORK RESULTS [--model NAME]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

_NAME = re.compile(r"^(?P<kind>edited|pruned-(?P<fn>log|linear)-(?P<param>[0-9.]+)|base)-(?P<n>\d+)$")
_VARIANTS = {"rome": ("rome", "once"), "multiple": ("rome", "multiple"), "memit": ("memit", "once"),
             "base": ("none", "none")}
EDIT_METRICS = ("efficacy_score", "paraphrase_score", "neighborhood_score", "efficacy_acc", "paraphrase_acc",
                "neighborhood_acc")


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def _spectra(report: dict[str, Any] | None) -> dict[str, Any]:
    """Worst (largest) condition numbers over the edited matrices, and per-tensor detail."""
    if not report:
        return {}
    touched = [t for t in report["tensors"] if t.get("edited")]
    if not touched:
        return {}
    worst = max(touched, key=lambda t: float(t["edited"]["kappa"]))
    return {
        "kappa_base": float(worst["kappa"]),
        "kappa": float(worst["edited"]["kappa"]),
        "sigma_max": float(worst["edited"]["sigma_max"]),
        "sigma_min": float(worst["edited"]["sigma_min"]),
        "sigma_max_base": float(worst["sigma_max"]),
        "delta_sigma_max": float(worst["delta"]["sigma_max"]),
        "delta_n_above_sigma_max": int(worst["delta"]["n_above_sigma_max"]),
        "tensor": worst["name"],
        "per_tensor": {t["name"]: {"kappa": t["edited"]["kappa"], "delta_sigma_max": t["delta"]["sigma_max"]}
                       for t in touched},
    }


def collect(work: Path, model: str) -> list[dict[str, Any]]:
    rows = []
    for variant_dir in sorted(p for p in work.iterdir() if p.is_dir() and p.name in _VARIANTS):
        method, mode = _VARIANTS[variant_dir.name]
        for eval_file in sorted(variant_dir.glob("*.eval.json")):
            stem = eval_file.name[: -len(".eval.json")]
            m = _NAME.match(stem)
            if not m:
                continue
            n = int(m["n"])
            restraint = m["fn"] or ("none" if m["kind"] in ("edited", "base") else m["kind"])
            evaluation = _load(eval_file) or {}
            row: dict[str, Any] = {"model": model, "method": method, "mode": mode, "restraint": restraint,
                                   "param": float(m["param"]) if m["param"] else None, "N": n,
                                   **evaluation.get("metrics", {}),
                                   "n_nonfinite": sum((evaluation.get("n_nonfinite") or {}).values())}
            row.update(_spectra(_load(variant_dir / f"{stem}.inspect.json")))
            edit_summary = _load(variant_dir / f"edited-{n}.json")
            if edit_summary and m["kind"] == "edited":
                row["edit_summary"] = {k: v for k, v in edit_summary.items() if k != "requests"}
            rows.append(row)
    return sorted(rows, key=lambda r: (r["method"], r["mode"], r["restraint"], r["param"] or 0, r["N"]))


def _series(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        label = r["method"] if r["method"] == "none" else f"{r['method']} {r['mode']}"
        if r["restraint"] != "none":
            label += f" + PRUNE {r['restraint']} ({r['param']:g})"
        elif r["method"] == "none":
            label = "base"
        out.setdefault(label, []).append(r)
    return out


def plot(rows: list[dict[str, Any]], results: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = _series(rows)
    written = []

    def draw(ax: Any, key: str, logy: bool = False) -> None:
        for label, pts in series.items():
            pts = [p for p in pts if p.get(key) is not None]
            if not pts:
                continue
            style = "--" if "PRUNE" in label else (":" if label == "base" else "-")
            ax.plot([p["N"] for p in pts], [p[key] for p in pts], style, marker="o", label=label)
        ax.set_xlabel("number of sequential edits N")
        ax.set_ylabel(key)
        if logy:
            ax.set_yscale("log")

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    draw(axes[0], "kappa", logy=True)
    axes[0].set_title("condition number of the edited matrix (W + D)")
    draw(axes[1], "delta_sigma_max", logy=True)
    axes[1].set_title("largest singular value of the delta")
    axes[1].legend(fontsize=7)
    written.append(results / "kappa.png")
    fig.tight_layout()
    fig.savefig(written[-1], dpi=110)

    metrics = [m for m in EDIT_METRICS if any(m in r for r in rows)]
    fig, axes = plt.subplots(1, max(len(metrics), 1), figsize=(4 * max(len(metrics), 1), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        draw(ax, metric)
        ax.set_title(metric)
    axes[0][-1].legend(fontsize=6)
    written.append(results / "editing.png")
    fig.tight_layout()
    fig.savefig(written[-1], dpi=110)

    general = [k for k in ("perplexity",) if any(k in r for r in rows)]
    if general:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        draw(ax, general[0], logy=True)
        ax.set_title("perplexity on WikiText-2 (general ability)")
        ax.legend(fontsize=7)
        written.append(results / "general.png")
        fig.tight_layout()
        fig.savefig(written[-1], dpi=110)
    plt.close("all")
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work", type=Path)
    parser.add_argument("results", type=Path)
    parser.add_argument("--model", default="smollm2")
    args = parser.parse_args()
    rows = collect(args.work, args.model)
    if not rows:
        raise SystemExit(f"no reports found under {args.work}")
    args.results.mkdir(parents=True, exist_ok=True)
    tmp = args.results / ".summary.json.tmp"
    tmp.write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    tmp.replace(args.results / "summary.json")
    for p in plot(rows, args.results):
        print(f"wrote {p}")
    print(f"wrote {args.results / 'summary.json'} ({len(rows)} rows)")


if __name__ == "__main__":
    main()
