"""`--select` picks tensors the same way in every command: canonical, stored, and (GPT-2) unprefixed names."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from prunecli.cli import app
from prunecli.core.checkpoint import Checkpoint
from prunecli.core.delta import Delta
from prunecli.core.inspection import checkpoint_candidates
from prunecli.core.selection import select_entries, select_names, tensor_aliases
from prunecli.errors import PruneCliError

GPT2 = ["transformer.h.3.mlp.c_fc.weight", "transformer.h.3.mlp.c_proj.weight", "transformer.h.10.mlp.c_proj.weight",
        "transformer.h.3.attn.c_attn.weight"]
LLAMA = ["model.layers.1.mlp.down_proj.weight", "model.layers.1.self_attn.q_proj.weight",
         "model.layers.12.mlp.down_proj.weight"]


@pytest.mark.parametrize("globs, picked", [
    (["transformer.h.3.mlp.c_proj.weight"], [GPT2[1]]),
    (["h.3.mlp.c_proj.weight"], [GPT2[1]]),  # GPT-2 checkpoints are also saved without the prefix
    (["h.3.mlp.*"], GPT2[:2]),
    (["*.c_proj.*"], [GPT2[1], GPT2[2]]),
    (["transformer.h.3.*", "h.10.*"], GPT2),
    ([], GPT2),
])
def test_gpt2_names(globs: list[str], picked: list[str]) -> None:
    assert select_entries(GPT2, globs, "gpt2") == picked


@pytest.mark.parametrize("globs, picked", [
    (["model.layers.1.*"], LLAMA[:2]),
    (["*.down_proj.*"], [LLAMA[0], LLAMA[2]]),
    (["model.layers.1?.*"], [LLAMA[2]]),
])
def test_llama_names(globs: list[str], picked: list[str]) -> None:
    assert select_entries(LLAMA, globs, "llama") == picked


def test_every_glob_must_match() -> None:
    with pytest.raises(PruneCliError, match="no tensor matches --select 'layers.1.*'"):
        select_entries(LLAMA, ["layers.1.*"], "llama")  # only GPT-2 has an unprefixed alias
    with pytest.raises(PruneCliError, match="not 2-D"):
        select_names([tensor_aliases(n) for n in LLAMA], ["*norm*"], ignored=["model.norm.weight"])


def test_checkpoint_and_delta_select_alike(gpt2_dir: Path) -> None:
    """inspect (checkpoint names) and prune/apply/export-lora (delta entries) pick the same tensors."""
    ckpt = Checkpoint(gpt2_dir)
    names = [c[0] for c in checkpoint_candidates(ckpt)]
    for globs in (["h.1.mlp.c_proj.weight"], ["h.1.*"], ["transformer.h.1.mlp.*"], ["*.c_attn.*"]):
        assert select_names(checkpoint_candidates(ckpt), globs) == select_entries(names, globs, ckpt.model_type)


def test_prune_selects_an_unprefixed_gpt2_name(gpt2_dir: Path, tmp_path: Path) -> None:
    from test_prune_cli import make_delta

    delta = make_delta(gpt2_dir, "gpt2", tmp_path / "d.safetensors")
    out = tmp_path / "p.safetensors"
    result = CliRunner().invoke(app, ["prune", str(gpt2_dir), str(delta), "-o", str(out), "--select",
                                      "h.1.mlp.c_proj.weight", "--json"])
    assert result.exit_code == 0, result.output
    before, after = Delta.load(delta), Delta.load(out)
    changed = [n for n in before.entries if not all(
        (x == y).all() for x, y in zip(before.entries[n].tensors(), after.entries[n].tensors()))]
    assert changed == ["transformer.h.1.mlp.c_proj.weight"]
