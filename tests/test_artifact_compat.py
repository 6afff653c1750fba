"""Files written by prunecli before the artifact module (main at 4e44346) still load, unchanged.

The old files are the delta of `test_prune_recorded.make_inputs` and a small statistics file, both saved by that
code. No tensor file is committed: `tests/data/compat_{delta,stats}.json` record each old file's safetensors metadata
and the dtype, shape and sha256 of each of its tensors, and `old_file` rebuilds the file in a temporary folder from
tensors made now, after checking they are the recorded bytes. Recording (with the old code on the path only):
`PYTHONPATH=<old tree> python tests/test_artifact_compat.py`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open

from prunecli.core.artifacts import DELTA, STATS
from prunecli.core.delta import Delta
from prunecli.editors.stats import KeyStats

DATA = Path(__file__).parent / "data"
DELTA_RECORD, STATS_RECORD = DATA / "compat_delta.json", DATA / "compat_stats.json"


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}


def _describe(path: Path) -> dict:
    from test_prune_recorded import fingerprint

    with safe_open(str(path), "pt") as fh:
        return {"metadata": fh.metadata(), "tensors": {k: fingerprint(fh.get_tensor(k)) for k in fh.keys()}}


def old_file(record: Path, made_now: Path, out: Path) -> Path:
    """The old code's file: its recorded metadata around tensors `made_now` holds, which must be its bytes."""
    from safetensors.torch import save_file
    from test_prune_recorded import fingerprint

    old = json.loads(record.read_text())
    tensors = _tensors(made_now)
    assert {k: fingerprint(t) for k, t in tensors.items()} == old["tensors"], "the inputs are not the recorded bytes"
    save_file(tensors, str(out), old["metadata"])
    return out


def small_stats() -> KeyStats:
    # Integer-valued keys: keys^T keys is then exact, so its bytes do not depend on the BLAS kernel's summation order
    # (random float64 keys gave other last bits on another CPU, and the recorded hash no longer matched).
    gen = torch.Generator().manual_seed(3)
    keys = torch.randint(-4, 5, (50, 6), generator=gen).to(torch.float64)
    return KeyStats({2: keys.T @ keys}, {2: 50}, {2: {"module": "model.layers.2.mlp.down_proj",
                                                     "weight": "model.layers.2.mlp.down_proj.weight",
                                                     "fingerprint": "sha256:" + "0" * 64}},
                    "recorded corpus", "llama", "/recorded/base", {"seq_len": 64})


def test_old_delta_loads_and_saves_back_the_same(tmp_path: Path) -> None:
    from test_prune_recorded import make_inputs

    _, new_path, _ = make_inputs(tmp_path / "inputs")
    old_path = old_file(DELTA_RECORD, new_path, tmp_path / "old.safetensors")
    old = Delta.load(old_path)
    new = Delta.load(new_path)
    assert old.entries.keys() == new.entries.keys() and old.fingerprints == new.fingerprints
    for name, entry in old.entries.items():
        assert all(torch.equal(a, b) for a, b in zip(entry.tensors(), new.entries[name].tensors())), name
    old.save(tmp_path / "again.safetensors")
    with safe_open(str(old_path), "pt") as a, safe_open(str(tmp_path / "again.safetensors"), "pt") as b:
        assert a.keys() == b.keys()
        assert without_digests(b.metadata(), DELTA.key, b.keys()) == a.metadata()


def test_old_statistics_load(tmp_path: Path) -> None:
    expected = small_stats()
    expected.save(tmp_path / "made-now.safetensors")
    stats_path = old_file(STATS_RECORD, tmp_path / "made-now.safetensors", tmp_path / "old.safetensors")
    old = KeyStats.load(stats_path)
    assert old.counts == expected.counts and old.layers == expected.layers and old.extra == expected.extra
    assert torch.equal(old.sums[2], expected.sums[2]) and old.sums[2].dtype == torch.float64
    expected.save(tmp_path / "s.safetensors")
    with safe_open(str(stats_path), "pt") as a, safe_open(str(tmp_path / "s.safetensors"), "pt") as b:
        assert (json.loads(without_digests(b.metadata(), STATS.key, b.keys())[STATS.key])
                == json.loads(a.metadata()[STATS.key]))


def without_digests(metadata: dict[str, str], key: str, tensors: Iterable[str]) -> dict[str, str]:
    """A new file's metadata without the tensor digests old files lack, checking that it has one per tensor."""
    doc = json.loads(metadata[key])
    assert set(doc.pop("digests")) == set(tensors)
    return {**metadata, key: json.dumps(doc)}


def record() -> None:
    import tempfile

    sys.path.insert(0, str(Path(__file__).parent))
    from test_prune_recorded import make_inputs

    with tempfile.TemporaryDirectory() as tmp:
        _, delta, _ = make_inputs(Path(tmp))
        DELTA_RECORD.write_text(json.dumps(_describe(delta), indent=1, sort_keys=True))
        small_stats().save(Path(tmp) / "stats.safetensors")
        STATS_RECORD.write_text(json.dumps(_describe(Path(tmp) / "stats.safetensors"), indent=1, sort_keys=True))


if __name__ == "__main__":
    record()
