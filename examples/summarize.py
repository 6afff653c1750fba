"""Collect the study's reports into results/summary.json, markdown tables and the paper-style plots.

Reads, under WORK (as laid out by examples/Makefile):
  base/base-N.eval.json           editing metrics of the unedited model on records 0..N-1
  base/base.general.json          its perplexity and general-ability metrics (they do not depend on N)
  VARIANT/KIND-N.eval.json        editing metrics + perplexity, VARIANT in rome | multiple | memit | alphaedit,
  VARIANT/KIND-N.general.json     general-ability metrics (the last N of each chain, or the Makefile's GENERAL_NS),
  VARIANT/KIND-N.inspect.json     spectra of W, W + D and D,  KIND in edited | pruned-log-A | pruned-linear-B
  VARIANT/edited-N.json           the edit command's summary (seconds per edit, losses, restraints)
  **/*.seconds                    wall time of every make step (examples/timed.sh)
Writes RESULTS/summary.json ({"rows": [...], "timings": {...}}: one row per model x method x mode x restraint x N
with every metric and the condition numbers), RESULTS/tables.md, and RESULTS/{kappa,editing,general}.png (solid:
edited without restraint, dashed: PRUNE once, dash-dot: PRUNE during editing ("multiple"), dotted: base), one panel
per editing method. The plots need matplotlib (`pip install 'prunecli[plot]'`); without it they are skipped with one
line on stderr and the summary and tables are still written, exit status 0 (hours of study should not end in a
traceback over a missing extra).

Usage: python summarize.py WORK RESULTS [--model NAME]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

_NAME = re.compile(r"^(?P<kind>edited|pruned-(?P<fn>log|linear)-(?P<param>[0-9.]+)|base)-(?P<n>\d+)$")
_VARIANTS = {"rome": ("rome", "once"), "multiple": ("rome", "multiple"), "memit": ("memit", "once"),
             "alphaedit": ("alphaedit", "once"), "base": ("none", "none")}
_ORDER = {name: i for i, name in enumerate(("none", "rome", "memit", "alphaedit", "once", "multiple", "log",
                                            "linear"))}
EDIT_METRICS = ("efficacy_score", "paraphrase_score", "neighborhood_score", "efficacy_acc", "paraphrase_acc",
                "neighborhood_acc")
QUANTITIES: dict[str, tuple[str, str, bool]] = {
    # key: (panel title, y label, whether it is a share in [0, 1])
    "efficacy_score": ("efficacy, P(new) > P(true) on the edit prompt", "share of edits", True),
    "paraphrase_score": ("generalisation, P(new) > P(true) on paraphrases", "share of edits", True),
    "neighborhood_score": ("locality, P(true) > P(new) on neighbour prompts", "share of prompts", True),
    "efficacy_acc": ("efficacy accuracy, argmax = new object", "share of edits", True),
    "paraphrase_acc": ("paraphrase accuracy, argmax = new object", "share of edits", True),
    "neighborhood_acc": ("neighbourhood accuracy, argmax = true object", "share of prompts", True),
    "kappa": ("condition number κ(W + D) of the edited matrix", "κ (log)", False),
    "delta_sigma_max": ("largest singular value σ_max(D) of the delta", "σ_max(D) (log)", False),
    "perplexity": ("WikiText-2 perplexity (lower is better)", "perplexity", False),
    "glue_sst2_acc": ("SST-2 accuracy (label words)", "accuracy", True),
}
SPECTRA_COLUMNS = ("kappa_base", "kappa", "sigma_max", "sigma_min", "delta_sigma_max", "delta_n_above_sigma_max")
METRIC_COLUMNS = ("efficacy_score", "paraphrase_score", "neighborhood_score", "efficacy_acc", "paraphrase_acc",
                  "neighborhood_acc", "perplexity", "glue_sst2_acc", "n_nonfinite")


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def _metrics(report: dict[str, Any] | None) -> dict[str, Any]:
    """A report's metrics, with its count of NaN/Inf cases (never dropped silently) folded in."""
    if not report:
        return {}
    return {**report.get("metrics", {}), "n_nonfinite": sum((report.get("n_nonfinite") or {}).values())}


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
        "sigma_min_base": float(worst["sigma_min"]),
        "delta_sigma_max": float(worst["delta"]["sigma_max"]),
        "delta_n_above_sigma_max": int(worst["delta"]["n_above_sigma_max"]),
        "tensor": worst["name"],
        "per_tensor": {t["name"]: {"kappa": t["edited"]["kappa"], "delta_sigma_max": t["delta"]["sigma_max"]}
                       for t in touched},
    }


def _edit_summary(variant_dir: Path, n: int) -> dict[str, Any]:
    summary = _load(variant_dir / f"edited-{n}.json")
    if not summary:
        return {}
    return {"edit_seconds_per_edit": summary.get("seconds_per_edit"), "edit_restraints": len(summary["restraints"])}


def collect(work: Path, model: str) -> list[dict[str, Any]]:
    base_general = _metrics(_load(work / "base" / "base.general.json"))
    rows = []
    for variant_dir in sorted(p for p in work.iterdir() if p.is_dir() and p.name in _VARIANTS):
        method, mode = _VARIANTS[variant_dir.name]
        for eval_file in sorted(variant_dir.glob("*.eval.json")):
            stem = eval_file.name[: -len(".eval.json")]
            m = _NAME.match(stem)
            if not m:
                continue
            n = int(m["n"])
            row: dict[str, Any] = {"model": model, "method": method, "mode": mode, "restraint": m["fn"] or "none",
                                   "param": float(m["param"]) if m["param"] else None, "N": n}
            general = base_general if m["kind"] == "base" else _metrics(_load(variant_dir / f"{stem}.general.json"))
            evaluation = _metrics(_load(eval_file))
            row.update({**general, **evaluation,
                        "n_nonfinite": evaluation.get("n_nonfinite", 0) + general.get("n_nonfinite", 0)})
            row.update(_spectra(_load(variant_dir / f"{stem}.inspect.json")))
            if m["kind"] == "edited":
                row.update(_edit_summary(variant_dir, n))
            rows.append(row)
    return sorted(rows, key=lambda r: (_ORDER[r["method"]], _ORDER[r["mode"]], _ORDER[r["restraint"]], r["param"] or 0,
                                       r["N"]))


def timings(work: Path) -> dict[str, Any]:
    """Wall seconds of every make step, and their totals per kind of step (edit, prune, inspect, eval, ...)."""
    steps = {str(p.relative_to(work))[: -len(".seconds")]: float(p.read_text()) for p in sorted(work.rglob("*.seconds"))}
    totals: dict[str, float] = {}
    for name, seconds in steps.items():
        kind = ("stats" if name.startswith("stats-") else "prune" if "/pruned-" in name and name.endswith(".safetensors")
                else "edit" if name.endswith(".safetensors") else name.rsplit(".", 2)[-2])
        totals[kind] = round(totals.get(kind, 0.0) + seconds, 1)
    return {"steps": steps, "totals": totals, "total": round(sum(steps.values()), 1)}


def label(row: dict[str, Any]) -> str:
    if row["method"] == "none":
        return "base"
    text = f"{row['method']} {row['mode']}"
    if row["restraint"] != "none":
        text += f" + PRUNE {row['restraint']} ({row['param']:g})"
    return text


def _variant(row: dict[str, Any]) -> str:
    """The label without the method: what a line in a per-method panel stands for."""
    return label(row).split(" ", 1)[1] if row["method"] != "none" else "base"


def _style(variant: str) -> dict[str, Any]:
    """Paper-like styles: solid = no restraint, dashed = PRUNE once, dash-dot = PRUNE during editing, dotted = base;
    one colour per restraint so ROME and MEMIT panels read alike."""
    linestyle = ":" if variant == "base" else "-." if "multiple" in variant else "--" if "PRUNE" in variant else "-"
    colours = {"base": "grey", "once": "C0", "multiple": "C4", "log (1.2)": "C1", "log (2.71828)": "C2",
               "linear (2)": "C3"}
    colour = next((c for key, c in reversed(colours.items()) if variant.endswith(key) or variant == key), None)
    return {"linestyle": linestyle, "color": colour, "marker": "o", "markersize": 3}


PLOT_HINT = "pip install 'prunecli[plot]'"


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _same_line(a: list[tuple[int, float]], b: list[tuple[int, float]]) -> bool:
    """Two series that would be drawn on top of each other (PRUNE as a no-op gives the unrestrained numbers up to
    the rounding of a rebuilt delta)."""
    return len(a) == len(b) and all(xa == xb and abs(ya - yb) <= 1e-6 * max(abs(ya), abs(yb), 1e-12)
                                    for (xa, ya), (xb, yb) in zip(a, b))


def plot(rows: list[dict[str, Any]], results: Path) -> list[Path]:
    """kappa.png (condition number and delta's top singular value vs N), editing.png (the six CounterFact metrics)
    and general.png (perplexity, SST-2): one column of panels per editing method, the base rows in each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in ("rome", "memit", "alphaedit") if any(r["method"] == m for r in rows)]
    written: list[Path] = []

    def draw(ax: Any, method: str, key: str, logy: bool = False) -> None:
        series: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            if r["method"] in (method, "none") and r.get(key) is not None:
                series.setdefault(_variant(r), []).append(r)
        drawn: dict[str, list[tuple[int, float]]] = {}
        for name, pts in series.items():
            xy = [(p["N"], p[key]) for p in pts]
            same = next((other for other, seen in drawn.items() if _same_line(seen, xy)), None)
            style = _style(name)
            if same is not None:  # exactly on top of a line already drawn: show it as markers, say so in the legend
                style.update(linestyle="none", marker="x", markersize=7)
                name = f"{name} (= {same})"
            ax.plot([x for x, _ in xy], [y for _, y in xy], label=name, **style)
            drawn.setdefault(name, xy)
        title, ylabel, share = QUANTITIES.get(key, (key, key, False))
        ax.set_title(f"{method.upper()}: {title}", fontsize=9)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.set_xlabel("sequential edits N")
        ax.set_xscale("log")
        ns = sorted({x for xy in drawn.values() for x, _ in xy})
        ax.set_xticks(ns, [str(n) for n in ns])  # the Ns that were run, not only 10^1 and 10^2
        if share:
            ax.set_ylim(-0.02, 1.02)  # shares on one scale: a 0.60-0.70 wiggle must not look dramatic
        if logy:
            ax.set_yscale("log")
            plain = matplotlib.ticker.FuncFormatter(lambda v, _pos: f"{v:g}")  # 20, not 2 x 10^1
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(plain)
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.grid(True, alpha=0.25)

    def save(fig: Any, name: str) -> None:
        handles: dict[str, Any] = {}
        for ax in fig.axes:
            for handle, text in zip(*ax.get_legend_handles_labels()):
                handles.setdefault(text, handle)
        ncol = 3
        fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=ncol, fontsize=8, frameon=False)
        rows_of_legend = -(-len(handles) // ncol)
        fig.tight_layout(rect=(0, min(0.3, 0.2 * rows_of_legend / fig.get_figheight()), 1, 1))
        written.append(results / name)
        fig.savefig(written[-1], dpi=110)

    def grid(keys: list[str], logy: tuple[str, ...] = ()) -> tuple[Any, Any]:
        """One row of panels per quantity, one column per editing method."""
        fig, axes = plt.subplots(len(keys), len(methods), figsize=(6.5 * len(methods), 3.8 * len(keys) + 0.8),
                                 squeeze=False)
        for row, key in enumerate(keys):
            for col, method in enumerate(methods):
                draw(axes[row][col], method, key, logy=key in logy)
        return fig, axes

    fig, axes = grid(["kappa", "delta_sigma_max"], logy=("kappa", "delta_sigma_max"))
    for col, method in enumerate(methods):
        base = [r for r in rows if r["method"] == method and r.get("kappa_base")]
        if base:
            axes[0][col].axhline(base[0]["kappa_base"], color="black", lw=1.0, ls="--", label="κ(W) unedited")
            axes[1][col].axhline(base[0]["sigma_max_base"], color="black", lw=1.0, ls="-.",
                                 label="σ_max(W): PRUNE's threshold")
    save(fig, "kappa.png")

    fig, _ = grid([m for m in EDIT_METRICS if any(m in r for r in rows)])
    save(fig, "editing.png")

    general = [k for k in ("perplexity", "glue_sst2_acc") if any(r.get(k) is not None for r in rows)]
    if general:
        fig, _ = grid(general)
        save(fig, "general.png")
    plt.close("all")
    return written


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) >= 1000 or abs(value) < 0.01 else f"{value:.3f}".rstrip("0").rstrip(".")
    return str(value)


def tables(rows: list[dict[str, Any]]) -> str:
    """Two markdown tables, rows by variant then N: the spectra of the edited matrix (worst edited tensor), and the
    editing / general-ability metrics."""
    out = []
    for title, wanted in (("Spectra of the edited matrix (the worst of the edited tensors)", SPECTRA_COLUMNS),
                          ("Editing metrics (records 0..N-1, final model) and general abilities", METRIC_COLUMNS)):
        columns = [c for c in wanted if any(r.get(c) is not None for r in rows)]
        shown = [r for r in rows if any(r.get(c) is not None for c in columns)]
        out += [f"### {title}", "", "| variant | N | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
        out += [f"| {label(r)} | {r['N']} | " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in shown]
        out.append("")
    return "\n".join(out)


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


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
    _write(args.results / "summary.json", json.dumps({"rows": rows, "timings": timings(args.work)}, indent=1) + "\n")
    _write(args.results / "tables.md", tables(rows))
    if have_matplotlib():
        for p in plot(rows, args.results):
            print(f"wrote {p}")
    else:
        print(f"matplotlib is not installed: plots skipped ({PLOT_HINT} draws kappa.png, editing.png and general.png)",
              file=sys.stderr)
    print(f"wrote {args.results / 'summary.json'} ({len(rows)} rows) and {args.results / 'tables.md'}")


if __name__ == "__main__":
    main()
