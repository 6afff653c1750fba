"""The study's smoke run: `make -C examples quick` end to end (statistics, ROME once/multiple, MEMIT, prune
log/linear, inspect, evaluate, summarize), then the summary must hold every variant at every N it ran.

What it proves is plumbing (every step's flags, chaining on the previous N's delta, the reports summarize.py reads),
so it runs on a tiny random LLaMA rather than SmolLM2: the cost is then the ~50 prunecli processes' start-up."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import build_tiny_model, tiny_tokenizer

pytestmark = pytest.mark.slow
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NS = (2, 4)
# (method, mode, restraint) of every row the quick study must produce at each N.
VARIANTS = {("none", "none", "none"), ("rome", "once", "none"), ("rome", "once", "log"), ("rome", "once", "linear"),
            ("rome", "multiple", "none"), ("memit", "once", "none"), ("memit", "once", "log"),
            ("memit", "once", "linear")}


def _study_model(path: Path) -> Path:
    """A tiny LLaMA whose MLP output matrices have sigma_max > 5.49, so log F with alpha 1.2 shrinks every singular
    value above sigma_max (as on SmolLM2, sigma_max ~22), with room for the perplexity windows."""
    import torch

    model = build_tiny_model("llama")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.mul_(3.0)
        smax = min(float(torch.linalg.matrix_norm(layer.mlp.down_proj.weight, 2)) for layer in model.model.layers)
    assert smax > 5.49
    model.config.max_position_embeddings = 1024
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_make_quick_summary_has_every_variant(shared_data: Path, tmp_path: Path) -> None:
    if shutil.which("make") is None:
        pytest.skip("GNU make is not installed")
    model = _study_model(tmp_path / "tiny-llama")
    bindir = Path(sys.executable).parent
    result = subprocess.run(
        ["make", "-C", str(EXAMPLES), "-j2", "quick", "THREADS=1", f"MODEL={model}", f"QUICK_WORK={tmp_path / 'work'}",
         f"QUICK_RESULTS={tmp_path / 'results'}", f"DATA={shared_data}", f"PRUNECLI={bindir / 'prunecli'}",
         f"PYTHON={sys.executable}"],
        capture_output=True, text=True, env={**os.environ, "PRUNECLI_NO_PROGRESS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]

    summary = json.loads((tmp_path / "results" / "summary.json").read_text())
    rows = summary["rows"]
    for n in NS:
        found = {(r["method"], r["mode"], r["restraint"]) for r in rows if r["N"] == n}
        assert found == VARIANTS, f"N={n}: {sorted(found)}"
    for r in rows:
        assert r["n_nonfinite"] == 0
        assert 0.0 <= r["efficacy_score"] <= 1.0 and r["perplexity"] > 1.0
        if r["method"] != "none":
            assert r["kappa"] > 1.0 and r["delta_sigma_max"] > 0.0
        if r["N"] == NS[-1] or r["method"] == "none":  # general abilities at the last N (and the base's once)
            assert 0.0 <= r["glue_sst2_acc"] <= 1.0
    # F(s) < s for every s > sigma_max(W) (log: sigma_max(W) * ln(1.2) >= 1 here; linear: always), so a pruned
    # delta's top singular value never exceeds the unrestrained one's.
    by_key = {(r["method"], r["mode"], r["restraint"], r["N"]): r for r in rows}
    for (method, mode, restraint, n), r in by_key.items():
        if restraint != "none":
            assert r["delta_sigma_max"] <= by_key[(method, mode, "none", n)]["delta_sigma_max"] * (1 + 1e-6)
    assert summary["timings"]["totals"]["edit"] > 0
    assert all((tmp_path / "results" / f"{name}.png").stat().st_size > 0 for name in ("kappa", "editing", "general"))
    assert "| rome once + PRUNE log (1.2) | 4 |" in (tmp_path / "results" / "tables.md").read_text()
