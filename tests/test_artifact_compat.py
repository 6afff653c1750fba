"""Files written by prunecli before the artifact module (main at 4e44346) still load, unchanged.

`tests/data/compat_delta.safetensors` is the delta of `test_prune_recorded.make_inputs`, and
`tests/data/compat_stats.safetensors` a small statistics file, both saved by that code. Recording (with the old code
on the path only): `PYTHONPATH=<old tree> python tests/test_artifact_compat.py`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from prunecli.core.delta import Delta
from prunecli.editors.stats import KeyStats

DATA = Path(__file__).parent / "data"
DELTA_FILE, STATS_FILE = DATA / "compat_delta.safetensors", DATA / "compat_stats.safetensors"


def small_stats() -> KeyStats:
    gen = torch.Generator().manual_seed(3)
    keys = torch.randn(50, 6, generator=gen, dtype=torch.float64)
    return KeyStats({2: keys.T @ keys}, {2: 50}, {2: {"module": "model.layers.2.mlp.down_proj",
                                                     "weight": "model.layers.2.mlp.down_proj.weight",
                                                     "fingerprint": "sha256:" + "0" * 64}},
                    "recorded corpus", "llama", "/recorded/base", {"seq_len": 64})


def test_old_delta_loads_and_saves_back_the_same(tmp_path: Path) -> None:
    from test_prune_recorded import make_inputs

    old = Delta.load(DELTA_FILE)
    _, new_path, _ = make_inputs(tmp_path / "inputs")
    new = Delta.load(new_path)
    assert old.entries.keys() == new.entries.keys() and old.fingerprints == new.fingerprints
    for name, entry in old.entries.items():
        assert all(torch.equal(a, b) for a, b in zip(entry.tensors(), new.entries[name].tensors())), name
    old.save(tmp_path / "again.safetensors")
    with safe_open(str(DELTA_FILE), "pt") as a, safe_open(str(tmp_path / "again.safetensors"), "pt") as b:
        assert a.metadata() == b.metadata() and a.keys() == b.keys()


def test_old_statistics_load(tmp_path: Path) -> None:
    old, expected = KeyStats.load(STATS_FILE), small_stats()
    assert old.counts == expected.counts and old.layers == expected.layers and old.extra == expected.extra
    assert torch.equal(old.sums[2], expected.sums[2]) and old.sums[2].dtype == torch.float64
    expected.save(tmp_path / "s.safetensors")
    with safe_open(str(STATS_FILE), "pt") as a, safe_open(str(tmp_path / "s.safetensors"), "pt") as b:
        assert json.loads(a.metadata()["prunecli.stats"]) == json.loads(b.metadata()["prunecli.stats"])


def record() -> None:
    import shutil
    import tempfile

    sys.path.insert(0, str(Path(__file__).parent))
    from test_prune_recorded import make_inputs

    with tempfile.TemporaryDirectory() as tmp:
        _, delta, _ = make_inputs(Path(tmp))
        shutil.copyfile(delta, DELTA_FILE)
    small_stats().save(STATS_FILE)


if __name__ == "__main__":
    record()

