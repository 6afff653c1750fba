"""The example and benchmark scripts import: every prunecli name they use still exists (the demo runs
examples/completions.py, which once broke when a loader moved and no test noticed)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted([*ROOT.glob("examples/*.py"), *ROOT.glob("benchmarks/*.py")])


def test_there_are_scripts() -> None:
    assert any(p.name == "completions.py" for p in SCRIPTS) and any(p.name == "bench_prune.py" for p in SCRIPTS)


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_script_imports(path: Path) -> None:
    spec = importlib.util.spec_from_file_location(f"script_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    spec.loader.exec_module(importlib.util.module_from_spec(spec))  # top-level code only; main() is not run
