"""The declared dependency ranges are the tested ones: pyproject's lower bounds equal scripts/lower-bounds.txt."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_lower_bounds_are_the_tested_versions() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    declared = {}
    for dep in deps:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", dep)
        assert m, f"{dep}: every dependency has exactly a lower bound (no cap below releases that exist)"
        declared[m.group(1).lower()] = m.group(2)
    pins = dict(line.split("==") for line in (ROOT / "scripts" / "lower-bounds.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    assert declared == {k.lower(): v for k, v in pins.items()}
