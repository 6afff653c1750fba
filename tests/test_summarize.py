"""The study's last step without the [plot] extra (issue 19): examples/summarize.py writes the summary and tables,
skips the plots with one line saying how to get them and exits 0; the Makefile says so before the study starts.

matplotlib is made unimportable by a `sitecustomize` module on PYTHONPATH (None in sys.modules blocks an import), so
the test needs no second environment.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
HINT = "pip install 'prunecli[plot]'"
PLOTS = ("kappa.png", "editing.png", "general.png")


def _report(metrics: dict[str, float]) -> dict:
    return {"metrics": metrics, "n_nonfinite": {name: 0 for name in metrics}}


@pytest.fixture()
def work(tmp_path: Path) -> Path:
    """A two-step study as examples/Makefile lays it out: the base and one ROME chain at N = 2, 4."""
    root = tmp_path / "work"
    (root / "base").mkdir(parents=True)
    (root / "rome").mkdir()
    (root / "base" / "base.general.json").write_text(json.dumps(_report({"perplexity": 20.0})))
    for n in (2, 4):
        (root / "base" / f"base-{n}.eval.json").write_text(json.dumps(_report({"efficacy_score": 0.25})))
        (root / "rome" / f"edited-{n}.eval.json").write_text(
            json.dumps(_report({"efficacy_score": 1.0, "perplexity": 20.0 + n})))
        tensor = {"name": "model.layers.4.mlp.down_proj.weight", "kappa": 40.0, "sigma_max": 20.0, "sigma_min": 0.5,
                  "edited": {"kappa": 40.0 + n, "sigma_max": 20.0 + n, "sigma_min": 0.5},
                  "delta": {"sigma_max": float(n), "n_above_sigma_max": 0}}
        (root / "rome" / f"edited-{n}.inspect.json").write_text(json.dumps({"tensors": [tensor]}))
    return root


def _without_matplotlib(tmp_path: Path) -> dict[str, str]:
    block = tmp_path / "no-matplotlib"
    block.mkdir()
    (block / "sitecustomize.py").write_text("import sys\nsys.modules['matplotlib'] = None\n")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(block), os.environ.get("PYTHONPATH", "")])}


def _summarize(work: Path, results: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(EXAMPLES / "summarize.py"), str(work), str(results)], env=env,
                          capture_output=True, text=True, timeout=300)


def test_summarize_without_matplotlib_skips_the_plots_in_one_line(work: Path, tmp_path: Path) -> None:
    env = _without_matplotlib(tmp_path)
    blocked = subprocess.run([sys.executable, "-c", "import matplotlib"], env=env, capture_output=True, text=True)
    assert blocked.returncode != 0  # the block works, so the run below really lacks matplotlib
    results = tmp_path / "results"
    result = _summarize(work, results, env)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"matplotlib is not installed: plots skipped ({HINT} draws kappa.png, editing.png and general.png)"]
    rows = json.loads((results / "summary.json").read_text())["rows"]
    assert {(r["method"], r["N"]) for r in rows} == {("none", 2), ("none", 4), ("rome", 2), ("rome", 4)}
    assert "| rome once | 4 |" in (results / "tables.md").read_text()
    assert not any((results / p).exists() for p in PLOTS)


def test_summarize_with_matplotlib_draws_the_plots(work: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    results = tmp_path / "results"
    result = _summarize(work, results, dict(os.environ))
    assert result.returncode == 0, result.stderr
    assert all((results / p).stat().st_size > 0 for p in PLOTS)


def test_makefile_says_so_before_the_study(tmp_path: Path) -> None:
    if shutil.which("make") is None:
        pytest.skip("GNU make is not installed")
    run = [shutil.which("make"), "-s", "-C", str(EXAMPLES), "check-plot", f"PYTHON={sys.executable}"]
    missing = subprocess.run(run, env=_without_matplotlib(tmp_path), capture_output=True, text=True)
    assert missing.returncode == 0 and missing.stderr.strip().splitlines() == [
        f"note: matplotlib is not installed: the study will run but draw no plots ({HINT})"]
    if importlib.util.find_spec("matplotlib") is not None:
        present = subprocess.run(run, capture_output=True, text=True)
        assert present.returncode == 0 and present.stderr == ""
