"""Extra tensors of delta files (method state such as AlphaEdit's edited keys): written, read back, validated,
concatenated on composition, and absent from the metadata of deltas that have none."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from prunecli.core.checkpoint import Checkpoint
from prunecli.core.delta import EXTRA_PREFIX, META_KEY, Delta, DeltaEntry
from prunecli.errors import PruneCliError

WEIGHT = "model.layers.1.mlp.down_proj.weight"


def _delta(llama_dir, extras: dict[str, torch.Tensor]) -> Delta:
    base = Checkpoint(llama_dir)
    out, inp = base.info(WEIGHT).shape
    g = torch.Generator().manual_seed(0)
    delta = Delta.for_base(base)
    delta.add(WEIGHT, DeltaEntry.lowrank(torch.randn(out, 2, generator=g), torch.randn(inp, 2, generator=g),
                                         "out_in"), base)
    delta.extras = extras
    return delta


def test_round_trip_and_metadata(tmp_path, llama_dir):
    keys = torch.randn(3, 96)
    _delta(llama_dir, {"alphaedit.keys::" + WEIGHT: keys}).save(tmp_path / "d.safetensors")
    loaded = Delta.load(tmp_path / "d.safetensors")
    assert torch.equal(loaded.extras["alphaedit.keys::" + WEIGHT], keys)
    with safe_open(str(tmp_path / "d.safetensors"), framework="pt") as fh:
        meta = json.loads(fh.metadata()[META_KEY])
        assert EXTRA_PREFIX + "alphaedit.keys::" + WEIGHT in fh.keys()
    assert meta["extras"] == {"alphaedit.keys::" + WEIGHT: {"shape": [3, 96]}}
    _delta(llama_dir, {}).save(tmp_path / "plain.safetensors")
    with safe_open(str(tmp_path / "plain.safetensors"), framework="pt") as fh:
        assert "extras" not in json.loads(fh.metadata()[META_KEY])  # deltas without extras are as before
    assert Delta.load(tmp_path / "plain.safetensors").extras == {}


def test_compose_stacks_rows_in_order(llama_dir):
    a, b = torch.ones(2, 4), torch.zeros(1, 4)
    first, then = _delta(llama_dir, {"k": a, "only_first": a}), _delta(llama_dir, {"k": b})
    both = first.compose(then)
    assert torch.equal(both.extras["k"], torch.cat([a, b])) and torch.equal(both.extras["only_first"], a)
    with pytest.raises(PruneCliError, match="extra tensor k has rows"):
        first.compose(_delta(llama_dir, {"k": torch.zeros(1, 5)}))


def _rewrite(src, dst, tensors=None, extras_meta=None) -> None:
    with safe_open(str(src), framework="pt") as fh:
        meta = json.loads(fh.metadata()[META_KEY])
    t = load_file(str(src))
    if tensors is not None:
        t = tensors(t)
    if extras_meta is not None:
        meta["extras"] = extras_meta
    del meta["digests"]  # as a file written before digests existed: the structural checks are what is tested
    save_file(t, str(dst), metadata={"format": "pt", META_KEY: json.dumps(meta)})


def test_invalid_extras_are_one_clear_error(tmp_path, llama_dir):
    name = "alphaedit.keys::" + WEIGHT
    good = tmp_path / "d.safetensors"
    _delta(llama_dir, {name: torch.randn(3, 96)}).save(good)
    cases = {
        "missing": (lambda t: {k: v for k, v in t.items() if not k.startswith(EXTRA_PREFIX)}, None),
        "shape": (None, {name: {"shape": [4, 96]}}),
        "not JSON object": (None, ["x"]),
        "NaN": (lambda t: {**t, EXTRA_PREFIX + name: torch.full((3, 96), float("nan"))}, None),
        "undescribed": (None, {}),
    }
    expected = {"missing": "extra tensor .* missing", "shape": "does not match the metadata",
                "not JSON object": "extras is not a JSON object", "NaN": "contains NaN or Inf",
                "undescribed": "not described by the metadata"}
    for case, (tensors, extras_meta) in cases.items():
        bad = tmp_path / f"{case}.safetensors"
        _rewrite(good, bad, tensors, extras_meta)
        with pytest.raises(PruneCliError, match=expected[case]):
            Delta.load(bad)
    with pytest.raises(PruneCliError, match="refusing to write: extra tensor"):
        _delta(llama_dir, {name: torch.full((1, 96), float("inf"))}).save(tmp_path / "inf.safetensors")
