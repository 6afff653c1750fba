"""Collect the study's reports into results/summary.json, markdown tables and the paper-style plots.

Reads, under WORK (as laid out by examples/Makefile):
  base/base-N.eval.json           editing metrics of the unedited model on records 0..N-1
  base/base.general.json          its perplexity and general-ability metrics (they do not depend on N)
  VARIANT/KIND-N.eval.json        editing metrics + perplexity, VARIANT one of _VARIANTS (the chains),
  VARIANT/KIND-N.general.json     general-ability metrics (the last N of each chain, or the Makefile's GENERAL_NS),
  VARIANT/KIND-N.inspect.json     spectra of W, W + D and D,  KIND in edited | pruned-F-PARAM (F: log, linear,
                                  scale-free, target-kappa; PARAM: alpha, beta, strength, multiple of kappa(W))
  VARIANT/edited-N.json           the edit command's summary (seconds per edit, losses, restraints)
  VARIANT/pruned-F-PARAM-N.safetensors.json   the prune command's report (values restrained, strength chosen)
  **/*.seconds                    wall time of every make step (examples/timed.sh)
Writes RESULTS/summary.json ({"rows": [...], "timings": {...}}: one row per model x method x restraint x N, with
every metric, the condition numbers and the wall time of the row's own steps), RESULTS/tables.md (the method x
restraint table at the last N, the wall time per kind of step, every row), and RESULTS/{kappa,editing,general}.png
(solid: no restraint, dashed: PRUNE once, dash-dot: restraint during editing, dotted: unedited), one column of panels
per editing method. The plots need matplotlib (`pip install 'prunecli[plot]'`); without it they are skipped with one
line on stderr and the summary and tables are still written, exit status 0 (hours of study should not end in a
traceback over a missing extra).

Row fields: `method` (rome, rome-original = the paper-faithful key, memit, alphaedit; none = unedited), `mode` (the
restraint during editing: once = none, multiple, adaptive, tkappa), `restraint` and `param` (the PRUNE-once F and
its parameter, else the restraint during editing, else none), `N` = `n_edits`. The first study's `multiple` folder
keeps its rows as they were (mode multiple, restraint none: there `restraint` named only PRUNE once); the long study
(`make smollm2`, `make gemma3`) writes `rome-multiple` instead. A report for N above 5000 is refused: records
5000-9999 are reserved.

Usage: python summarize.py WORK RESULTS [--model NAME]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

_NAME = re.compile(r"^(?P<kind>edited|pruned-(?P<fn>log|linear|scale-free|target-kappa)-(?P<param>[0-9.]+)|base)"
                   r"-(?P<n>\d+)$")
RESERVED_FROM = 5000  # CounterFact records 5000-9999 are kept for acceptance measurements: N edits use 0..N-1
# variant folder: (method, mode = restraint during editing, restraint of its unpruned rows)
_VARIANTS = {"rome": ("rome", "once", "none"), "multiple": ("rome", "multiple", "none"),
             "memit": ("memit", "once", "none"), "alphaedit": ("alphaedit", "once", "none"),
             "rome-multiple": ("rome", "multiple", "multiple"), "rome-adaptive": ("rome", "adaptive", "adaptive"),
             "rome-tkappa": ("rome", "tkappa", "tkappa"), "rome-original": ("rome-original", "once", "none"),
             "rome-original-multiple": ("rome-original", "multiple", "multiple"), "base": ("none", "none", "none")}
METHODS = ("rome", "rome-original", "memit", "alphaedit")
METHOD_TEXT = {"rome": "ROME", "rome-original": "ROME, paper-faithful key", "memit": "MEMIT",
               "alphaedit": "AlphaEdit"}
_ORDER = {name: i for i, name in enumerate(("none", *METHODS, "once", "multiple", "adaptive", "tkappa", "log",
                                            "linear", "scale-free", "target-kappa"))}
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
    """The chain step that reached N (seconds per edit, restraints in that step), and the whole chain up to N (its
    edit time and restraints): a restraint during editing costs edit time, which the total shows."""
    summary = _load(variant_dir / f"edited-{n}.json")
    if not summary:
        return {}
    steps = sorted((int(m["n"]), p) for p in variant_dir.glob("edited-*.json")
                   if (m := _NAME.match(p.name[: -len(".json")])) and int(m["n"]) <= n)
    chain = [s for s in (_load(p) for _, p in steps) if s]
    return {"edit_seconds_per_edit": summary.get("seconds_per_edit"), "edit_restraints": len(summary["restraints"]),
            "chain_edit_seconds": round(sum(s["seconds"] for s in chain), 1),
            "chain_restraints": sum(len(s["restraints"]) for s in chain)}


def _prune_report(variant_dir: Path, stem: str) -> dict[str, Any]:
    """What PRUNE once did: singular values restrained, and the strength it chose (scale-free, target-kappa)."""
    report = _load(variant_dir / f"{stem}.safetensors.json")
    if not report:
        return {}
    strengths = [t["strength"] for t in report["tensors"] if t.get("strength") is not None]
    return {"prune_n_restrained": sum(t["n_restrained"] for t in report["tensors"]),
            "prune_strength": max(strengths) if strengths else None}


def _step_seconds(variant_dir: Path, stem: str, edited: bool) -> dict[str, float]:
    """Wall seconds of the row's own make steps (the edit step reaching N, or the prune; inspect, eval, general)."""
    files = {"edit" if edited else "prune": f"{stem}.safetensors", "inspect": f"{stem}.inspect.json",
             "eval": f"{stem}.eval.json", "general": f"{stem}.general.json"}
    return {kind: float(path.read_text()) for kind, name in files.items()
            if (path := variant_dir / f"{name}.seconds").exists()}


def collect(work: Path, model: str) -> list[dict[str, Any]]:
    base_general = _metrics(_load(work / "base" / "base.general.json"))
    rows = []
    for variant_dir in sorted(p for p in work.iterdir() if p.is_dir() and p.name in _VARIANTS):
        method, mode, unpruned = _VARIANTS[variant_dir.name]
        for eval_file in sorted(variant_dir.glob("*.eval.json")):
            stem = eval_file.name[: -len(".eval.json")]
            m = _NAME.match(stem)
            if not m:
                continue
            n = int(m["n"])
            if n > RESERVED_FROM:
                raise SystemExit(f"{eval_file}: N = {n} uses CounterFact records {RESERVED_FROM}-{n - 1}, which are "
                                 f"reserved (N must be <= {RESERVED_FROM})")
            row: dict[str, Any] = {"model": model, "method": method, "mode": mode,
                                   "restraint": m["fn"] or unpruned, "param": float(m["param"]) if m["param"] else None,
                                   "N": n, "n_edits": n if method != "none" else 0}
            general = base_general if m["kind"] == "base" else _metrics(_load(variant_dir / f"{stem}.general.json"))
            evaluation = _metrics(_load(eval_file))
            row.update({**general, **evaluation,
                        "n_nonfinite": evaluation.get("n_nonfinite", 0) + general.get("n_nonfinite", 0)})
            row.update(_spectra(_load(variant_dir / f"{stem}.inspect.json")))
            if m["kind"] == "edited":
                row.update(_edit_summary(variant_dir, n))
            if m["fn"]:
                row.update(_prune_report(variant_dir, stem))
            row["seconds"] = _step_seconds(variant_dir, stem, m["kind"] == "edited")
            rows.append(row)
    return sorted(rows, key=lambda r: (_ORDER[r["method"]], _ORDER[r["mode"]], _ORDER[r["restraint"]], r["param"] or 0,
                                       r["N"]))


def timings(work: Path) -> dict[str, Any]:
    """Wall seconds of every make step, their totals per kind of step (edit, prune, inspect, eval, ...), and each
    chain's edit time (all its edit steps)."""
    steps = {str(p.relative_to(work))[: -len(".seconds")]: float(p.read_text())
             for p in sorted(work.rglob("*.seconds"))}
    totals: dict[str, float] = {}
    chains: dict[str, float] = {}
    for name, seconds in steps.items():
        pruned = "/pruned-" in name and name.endswith(".safetensors")
        kind = ("stats" if name.startswith("stats-") else "prune" if pruned
                else "edit" if name.endswith(".safetensors") else name.rsplit(".", 2)[-2])
        totals[kind] = round(totals.get(kind, 0.0) + seconds, 1)
        if kind == "edit":
            chain = name.split("/", 1)[0]
            chains[chain] = round(chains.get(chain, 0.0) + seconds, 1)
    return {"steps": steps, "totals": totals, "chains": chains, "total": round(sum(steps.values()), 1)}


def _pruned_once(row: dict[str, Any]) -> bool:
    return row["param"] is not None


def label(row: dict[str, Any]) -> str:
    """Short row name in the all-rows tables: method, mode, and the PRUNE-once F with its parameter."""
    if row["method"] == "none":
        return "base"
    text = f"{row['method']} {row['mode']}"
    if _pruned_once(row):
        text += f" + PRUNE {row['restraint']} ({row['param']:g})"
    return text


MODE_TEXT = {"once": "no restraint", "multiple": "PRUNE log every K edits (multiple)",
             "adaptive": "adaptive: restrain when κ > trigger", "tkappa": "target κ every K edits"}
PRUNE_TEXT = {"log": "PRUNE once, log α = {:g}", "linear": "PRUNE once, linear β = {:g}",
              "scale-free": "PRUNE once, scale-free t = {:g}", "target-kappa": "PRUNE once, target κ = {:g} κ(W)"}


def describe(row: dict[str, Any]) -> str:
    """What a row's restraint is, in words (plot legends, the method x restraint table)."""
    if row["method"] == "none":
        return "unedited"
    if not _pruned_once(row):
        return MODE_TEXT[row["mode"]]
    once = PRUNE_TEXT[row["restraint"]].format(row["param"])
    return once if row["mode"] == "once" else f"{MODE_TEXT[row['mode']]}, then {once}"


def _style(row: dict[str, Any]) -> dict[str, Any]:
    """Paper-like styles: solid = no restraint, dashed = PRUNE once, dash-dot = restraint during editing, dotted =
    unedited; one colour per restraint so the panels of every method read alike."""
    once = {("log", 1.2): "C1", ("log", None): "C2", ("linear", None): "C3", ("scale-free", None): "C8",
            ("target-kappa", None): "C9"}
    during = {"once": "C0", "multiple": "C4", "adaptive": "C5", "tkappa": "C6"}
    if row["method"] == "none":
        linestyle, colour = ":", "grey"
    elif _pruned_once(row):
        linestyle = "--"
        colour = once.get((row["restraint"], row["param"])) or once.get((row["restraint"], None))
    else:
        linestyle, colour = ("-" if row["mode"] == "once" else "-."), during.get(row["mode"])
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
    from matplotlib.lines import Line2D

    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    written: list[Path] = []
    same_text = "× on a line: the same values as that line"

    def draw(ax: Any, method: str, key: str, entries: dict[str, dict[str, Any]], logy: bool = False) -> None:
        """One panel. Its series go into `entries` (name -> line style) for the figure's one legend, so each
        variant is listed once, with its line, even where it is drawn only as markers."""
        series: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            if r["method"] in (method, "none") and r.get(key) is not None:
                series.setdefault(describe(r), []).append(r)
        drawn: dict[str, list[tuple[int, float]]] = {}
        for name, pts in series.items():
            xy = [(p["N"], p[key]) for p in pts]
            style = entries.setdefault(name, _style(pts[0]))
            if any(_same_line(seen, xy) for seen in drawn.values()):  # on top of a line already drawn: markers
                style = {**style, "linestyle": "none", "marker": "x", "markersize": 7}
                entries.setdefault(same_text, {"linestyle": "none", "marker": "x", "markersize": 7, "color": "black"})
            ax.plot([x for x, _ in xy], [y for _, y in xy], **style)
            drawn.setdefault(name, xy)
        title, ylabel, share = QUANTITIES.get(key, (key, key, False))
        ax.set_title(f"{METHOD_TEXT[method]}: {title}", fontsize=9)
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
            values = [y for xy in drawn.values() for _, y in xy if y > 0]
            if values and max(values) / min(values) > 10:  # over a decade: 1-2-5 ticks, not every minor one
                ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
                ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            else:
                ax.yaxis.set_minor_formatter(plain)
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.grid(True, alpha=0.25)

    def save(fig: Any, name: str, entries: dict[str, dict[str, Any]]) -> None:
        handles: dict[str, Any] = {text: Line2D([], [], **style) for text, style in entries.items()
                                   if text != same_text}
        for ax in fig.axes:  # the reference lines (kappa(W), sigma_max(W))
            for handle, text in zip(*ax.get_legend_handles_labels()):
                handles.setdefault(text, handle)
        if same_text in entries:
            handles[same_text] = Line2D([], [], **entries[same_text])
        ncol = 3
        fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=ncol, fontsize=8, frameon=False)
        rows_of_legend = -(-len(handles) // ncol)
        fig.tight_layout(rect=(0, min(0.3, 0.2 * rows_of_legend / fig.get_figheight()), 1, 1))
        written.append(results / name)
        fig.savefig(written[-1], dpi=110)

    def grid(keys: list[str], logy: tuple[str, ...] = ()) -> tuple[Any, Any, dict[str, dict[str, Any]]]:
        """One row of panels per quantity, one column per editing method."""
        fig, axes = plt.subplots(len(keys), len(methods), figsize=(6.5 * len(methods), 3.8 * len(keys) + 0.8),
                                 squeeze=False)
        entries: dict[str, dict[str, Any]] = {}
        for row, key in enumerate(keys):
            for col, method in enumerate(methods):
                draw(axes[row][col], method, key, entries, logy=key in logy)
        return fig, axes, entries

    fig, axes, entries = grid(["kappa", "delta_sigma_max"], logy=("kappa", "delta_sigma_max"))
    for col, method in enumerate(methods):
        base = [r for r in rows if r["method"] == method and r.get("kappa_base")]
        if base:
            axes[0][col].axhline(base[0]["kappa_base"], color="black", lw=1.0, ls="--", label="κ(W) unedited")
            axes[1][col].axhline(base[0]["sigma_max_base"], color="black", lw=1.0, ls="-.",
                                 label="σ_max(W): PRUNE's threshold")
    save(fig, "kappa.png", entries)

    fig, _, entries = grid([m for m in EDIT_METRICS if any(m in r for r in rows)])
    save(fig, "editing.png", entries)

    general = [k for k in ("perplexity", "glue_sst2_acc") if any(r.get(k) is not None for r in rows)]
    if general:
        fig, _, entries = grid(general)
        save(fig, "general.png", entries)
    plt.close("all")
    return written


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) >= 1000 or abs(value) < 0.01 else f"{value:.3f}".rstrip("0").rstrip(".")
    return str(value)


LAST_N_COLUMNS = ("kappa", "delta_sigma_max", "efficacy_score", "paraphrase_score", "neighborhood_score",
                  "efficacy_acc", "paraphrase_acc", "neighborhood_acc", "perplexity", "glue_sst2_acc",
                  "chain_restraints", "prune_n_restrained", "prune_strength", "n_nonfinite")


def last_n_table(rows: list[dict[str, Any]]) -> str:
    """The method x restraint table at the last N: one line per (method, restraint), the unedited model first."""
    n = max(r["N"] for r in rows)
    shown = [r for r in rows if r["N"] == n]
    columns = [c for c in LAST_N_COLUMNS if any(r.get(c) is not None for r in shown)]
    out = [f"### Method x restraint at N = {n}", "", "| method | restraint | " + " | ".join(columns) + " |",
           "|---|---|" + "---|" * len(columns)]
    out += [f"| {METHOD_TEXT.get(r['method'], 'unedited')} | {describe(r) if r['method'] != 'none' else '–'} | "
            + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in shown]
    return "\n".join(out + [""])


def time_table(timing: dict[str, Any]) -> str:
    """Wall seconds per kind of step and per chain (one job's time each; every step is in summary.json)."""
    out = ["### Wall time (seconds; every step in summary.json `timings.steps`)", "", "| step | seconds |", "|---|---|"]
    out += [f"| all {kind} steps | {seconds:.1f} |" for kind, seconds in timing["totals"].items()]
    out += [f"| edit chain `{chain}` | {seconds:.1f} |" for chain, seconds in timing.get("chains", {}).items()]
    out.append(f"| everything | {timing['total']:.1f} |")
    return "\n".join(out + [""])


def tables(rows: list[dict[str, Any]], timing: dict[str, Any] | None = None) -> str:
    """The method x restraint table at the last N, the wall time (given `timing`), then two tables of every row by
    variant then N: the spectra of the edited matrix (worst edited tensor), and the editing / general metrics."""
    out = [last_n_table(rows)] + ([time_table(timing)] if timing else [])
    for title, wanted in (("Spectra of the edited matrix (the worst of the edited tensors)", SPECTRA_COLUMNS),
                          ("Editing metrics (records 0..N-1, final model) and general abilities", METRIC_COLUMNS)):
        columns = [c for c in wanted if any(r.get(c) is not None for r in rows)]
        shown = [r for r in rows if any(r.get(c) is not None for c in columns)]
        out += [f"### {title}", "", "| variant | N | " + " | ".join(columns) + " |",
                "|---|---|" + "---|" * len(columns)]
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
    timing = timings(args.work)
    _write(args.results / "summary.json", json.dumps({"rows": rows, "timings": timing}, indent=1) + "\n")
    _write(args.results / "tables.md", tables(rows, timing))
    if have_matplotlib():
        for p in plot(rows, args.results):
            print(f"wrote {p}")
    else:
        print(f"matplotlib is not installed: plots skipped ({PLOT_HINT} draws kappa.png, editing.png and general.png)",
              file=sys.stderr)
    print(f"wrote {args.results / 'summary.json'} ({len(rows)} rows) and {args.results / 'tables.md'}")


if __name__ == "__main__":
    main()
