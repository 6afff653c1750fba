"""The study's last step without the [plot] extra (issue 19): examples/summarize.py writes the summary and tables,
skips the plots with one line saying how to get them and exits 0; the Makefile says so before the study starts.
And the long-horizon study's rows (issue 17): every chain and restraint of `make smollm2` read from synthetic
reports laid out as the Makefile writes them, one row per (model, method, restraint, N), reserved records refused.

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


# --- the long-horizon study (issue 17) ---------------------------------------------------------------------------
LONG_NS = (10, 25)
# chain folder -> (method, mode, restraint of its unpruned rows); rome and rome-original are also pruned once.
LONG_CHAINS = {"rome": ("rome", "once", "none"), "rome-multiple": ("rome", "multiple", "multiple"),
               "rome-adaptive": ("rome", "adaptive", "adaptive"), "rome-tkappa": ("rome", "tkappa", "tkappa"),
               "rome-original": ("rome-original", "once", "none"),
               "rome-original-multiple": ("rome-original", "multiple", "multiple"),
               "memit": ("memit", "once", "none"), "alphaedit": ("alphaedit", "once", "none")}
ONCE = {"pruned-log-1.2": ("log", 1.2), "pruned-scale-free-0.5": ("scale-free", 0.5),
        "pruned-target-kappa-1.25": ("target-kappa", 1.25)}
KAPPA_W = 20.75
# made-up growth of kappa, sigma_max(D) and perplexity with N, per chain and per PRUNE-once kind (restraints smaller)
GROWTH = {"rome": 1.0, "rome-multiple": 0.4, "rome-adaptive": 0.6, "rome-tkappa": 0.5, "rome-original": 1.5,
          "rome-original-multiple": 0.45, "memit": 0.2, "alphaedit": 0.15, "edited": 1.0, "pruned-log-1.2": 0.45,
          "pruned-scale-free-0.5": 0.55, "pruned-target-kappa-1.25": 0.35}


def _write(path: Path, payload: dict | str) -> None:
    path.write_text(payload if isinstance(payload, str) else json.dumps(payload))


def _long_study(root: Path, ns: tuple[int, ...] = LONG_NS) -> Path:
    """Every report `make smollm2` writes, with made-up but distinct numbers: kappa and perplexity grow with N and
    with the chain's index, restraints pull them down; each step's wall time is its own number."""
    (root / "base").mkdir(parents=True)
    _write(root / "base" / "base.general.json", _report({"perplexity": 27.0, "glue_sst2_acc": 0.685}))
    for n in ns:
        _write(root / "base" / f"base-{n}.eval.json", _report({"efficacy_score": 0.3, "neighborhood_score": 0.7}))
        _write(root / "base" / f"base-{n}.eval.json.seconds", "50.0\n")
    for chain in LONG_CHAINS:
        folder = root / chain
        folder.mkdir()
        kinds = ["edited", *(ONCE if chain in ("rome", "rome-original") else ())]
        for n in ns:
            _write(folder / f"edited-{n}.json", {"seconds": 4.0 * n, "seconds_per_edit": 4.0,
                                                  "restraints": [[{}]] * (n // 10 if "multiple" in chain else 0)})
            for kind in kinds:
                stem = f"{kind}-{n}"
                growth = GROWTH[chain] * GROWTH[kind] * n
                _write(folder / f"{stem}.eval.json", _report({"efficacy_score": 1.0 - n / 1000, "paraphrase_score": 0.9,
                                                              "neighborhood_score": 0.6 + growth / 5000,
                                                              "efficacy_acc": 0.9 - growth / 1000,
                                                              "perplexity": 27.0 + growth / 10}))
                tensor = {"name": "model.layers.6.mlp.down_proj.weight", "kappa": KAPPA_W, "sigma_max": 22.4,
                          "sigma_min": 1.08, "edited": {"kappa": KAPPA_W + growth, "sigma_max": 22.4 + growth,
                                                        "sigma_min": 1.08},
                          "delta": {"sigma_max": growth, "n_above_sigma_max": n // 10}}
                _write(folder / f"{stem}.inspect.json", {"tensors": [tensor]})
                _write(folder / f"{stem}.safetensors.seconds", f"{4.0 * n if kind == 'edited' else 5.0}\n")
                _write(folder / f"{stem}.eval.json.seconds", "60.0\n")
                _write(folder / f"{stem}.inspect.json.seconds", "4.0\n")
                if n == ns[-1]:
                    _write(folder / f"{stem}.general.json", _report({"glue_sst2_acc": 0.55}))
                    _write(folder / f"{stem}.general.json.seconds", "40.0\n")
                if kind != "edited":
                    _write(folder / f"{stem}.safetensors.json", {"tensors": [
                        {"name": tensor["name"], "n_restrained": n // 10, "strength": 0.3 if "kappa" in kind else
                         0.5 if "scale" in kind else None}]})
    return root


def _long_rows(tmp_path: Path) -> tuple[list[dict], str]:
    results = tmp_path / "results"
    result = subprocess.run([sys.executable, str(EXAMPLES / "summarize.py"), str(_long_study(tmp_path / "work")),
                             str(results), "--model", "smollm2"], env=_without_matplotlib(tmp_path),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads((results / "summary.json").read_text())["rows"], (results / "tables.md").read_text()


def test_long_study_has_one_row_per_method_restraint_and_n(tmp_path: Path) -> None:
    rows, tables = _long_rows(tmp_path)
    expected = {("none", "none", None)}
    for chain, (method, _mode, restraint) in LONG_CHAINS.items():
        expected.add((method, restraint, None))
        if chain in ("rome", "rome-original"):
            expected |= {(method, fn, param) for fn, param in ONCE.values()}
    for n in LONG_NS:
        found = [(r["method"], r["restraint"], r["param"]) for r in rows if r["N"] == n]
        assert sorted(found, key=str) == sorted(expected, key=str)  # every variant once: (method, restraint) is a key
    by_key = {(r["method"], r["restraint"], r["param"], r["N"]): r for r in rows}
    for r in rows:
        assert r["model"] == "smollm2" and r["n_edits"] == (0 if r["method"] == "none" else r["N"])
    for chain, (method, mode, restraint) in LONG_CHAINS.items():
        r = by_key[(method, restraint, None, 25)]
        assert r["mode"] == mode
        assert r["kappa_base"] == KAPPA_W and r["efficacy_score"] == 0.975 and r["glue_sst2_acc"] == 0.55
        assert r["seconds"] == {"edit": 100.0, "inspect": 4.0, "eval": 60.0, "general": 40.0}
        assert r["chain_edit_seconds"] == 4.0 * (10 + 25)  # the whole chain up to N, not only its last step
        assert r["chain_restraints"] == (1 + 2 if "multiple" in chain else 0)
        assert "glue_sst2_acc" not in by_key[(method, restraint, None, 10)]  # SST-2 at the last N only
    target = by_key[("rome-original", "target-kappa", 1.25, 10)]
    assert target["mode"] == "once" and target["prune_n_restrained"] == 1 and target["prune_strength"] == 0.3
    assert target["seconds"] == {"prune": 5.0, "inspect": 4.0, "eval": 60.0}
    assert by_key[("rome", "log", 1.2, 25)]["prune_strength"] is None  # log F has no strength
    base = by_key[("none", "none", None, 25)]
    assert base["perplexity"] == 27.0 and base["seconds"] == {"eval": 50.0}

    # the method x restraint table at the last N, in words, then the wall time, then every row
    assert "### Method x restraint at N = 25" in tables
    for line in ("| ROME | no restraint | ", "| ROME | adaptive: restrain when κ > trigger | ",
                 "| ROME | target κ every K edits | ",
                 "| ROME, paper-faithful key | PRUNE log every K edits (multiple) | ",
                 "| ROME, paper-faithful key | PRUNE once, target κ = 1.25 κ(W) | ",
                 "| ROME | PRUNE once, scale-free t = 0.5 | ", "| AlphaEdit | no restraint | ", "| unedited | – | ",
                 "| edit chain `rome-tkappa` | 140.0 |", "| rome adaptive | 10 |",
                 "| rome-original once + PRUNE target-kappa (1.25) | 25 |"):
        assert line in tables, line
    last = [line for line in tables.split("### Wall time")[0].splitlines() if line.startswith("|")]
    assert len(last) == 2 + len(expected)  # header, rule, one line per (method, restraint) at N = 25 only


def test_long_study_plots_draw_every_method(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    results = tmp_path / "results"
    result = _summarize(_long_study(tmp_path / "work"), results, dict(os.environ))
    assert result.returncode == 0, result.stderr
    assert all((results / p).stat().st_size > 0 for p in PLOTS)


def test_summarize_refuses_reserved_records(tmp_path: Path) -> None:
    work = _long_study(tmp_path / "work", ns=(10,))
    _write(work / "memit" / "edited-5010.eval.json", _report({"efficacy_score": 1.0}))
    result = _summarize(work, tmp_path / "results", _without_matplotlib(tmp_path))
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        f"{work / 'memit' / 'edited-5010.eval.json'}: N = 5010 uses CounterFact records 5000-5009, which are reserved "
        f"(N must be <= 5000)"]
    assert not (tmp_path / "results" / "summary.json").exists()
