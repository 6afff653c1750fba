"""NAS (editors/nas.py): the anchor's trimmed mean and the rescale-or-drop rule against hand-made cases, and the
anchor file refusing another model, layer or method."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from prunecli.core.checkpoint import Checkpoint
from prunecli.editors.nas import Anchor, anchored, trimmed_mean
from prunecli.errors import PruneCliError


def test_trimmed_mean_drops_the_largest_twentieth() -> None:
    assert trimmed_mean(torch.tensor([1.0, 2.0, 3.0])) == pytest.approx(2.0)  # n < 20: nothing dropped
    norms = torch.arange(1, 41, dtype=torch.float32)  # 40 values: the 2 largest (39, 40) go
    assert trimmed_mean(norms) == pytest.approx(sum(range(1, 39)) / 38)
    shuffled = norms[torch.randperm(40, generator=torch.Generator().manual_seed(0))]
    assert trimmed_mean(shuffled) == pytest.approx(trimmed_mean(norms))


def test_targets_are_rescaled_to_the_anchor_or_dropped() -> None:
    v0 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    v_star = torch.tensor([[3.0, 4.0], [0.0, 0.5], [30.0, 40.0]])  # norms 5, 0.5, 50
    new, dropped = anchored(v0, v_star, anchor=2.0, drop_at=2.0)  # drop above 4
    assert dropped.tolist() == [True, False, True]
    assert torch.allclose(new[0], v0[0]) and torch.allclose(new[2], v0[2])  # a dropped edit keeps v0: no shift
    assert torch.allclose(new[1], torch.tensor([0.0, 2.0]))  # scaled up to the anchor, same direction
    new, dropped = anchored(v0, v_star, anchor=2.0, drop_at=5.0)  # ROME's bound: drop above 10
    assert dropped.tolist() == [False, False, True]
    assert torch.allclose(new[0].norm(), torch.tensor(2.0)) and torch.allclose(new[0], torch.tensor([1.2, 1.6]))


def test_anchor_file_round_trip_and_refusals(tmp_path: Path, llama_dir: Path, qwen2_dir: Path) -> None:
    base = Checkpoint(llama_dir)
    weight = "model.layers.1.mlp.down_proj.weight"
    anchor = Anchor(torch.tensor([1.0, 2.0, 3.0]), 1, weight, base.fingerprint(weight), "alphaedit",
                    {"count": 3}, base.model_type, str(base.path))
    anchor.save(tmp_path / "a.safetensors")
    back = Anchor.load(tmp_path / "a.safetensors")
    assert back.value == pytest.approx(2.0) and back.layer == 1 and back.method == "alphaedit"
    back.check(base, "alphaedit", 1, "a.safetensors")
    with pytest.raises(PruneCliError, match="measured for alphaedit at layer 1, not memit at layer 1"):
        back.check(base, "memit", 1, "a.safetensors")
    with pytest.raises(PruneCliError, match="not alphaedit at layer 2"):
        back.check(base, "alphaedit", 2, "a.safetensors")
    with pytest.raises(PruneCliError, match="measured on another model"):
        back.check(Checkpoint(qwen2_dir), "alphaedit", 1, "a.safetensors")
