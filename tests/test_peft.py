"""PEFT LoRA interoperability: export is exact for Linear and Conv1D, import reads adapters back as deltas."""

from __future__ import annotations

import json
import logging
import warnings

import pytest
import torch
from typer.testing import CliRunner

from prunecli.cli import app
from prunecli.core.checkpoint import Checkpoint
from prunecli.core.delta import Delta, DeltaEntry
from prunecli.core.peft_io import delta_from_peft, export_lora

peft = pytest.importorskip("peft")


def _delta(ckpt: Checkpoint, names: list[str], ranks: list[int], seed: int = 0) -> Delta:
    g = torch.Generator().manual_seed(seed)
    delta = Delta.for_base(ckpt)
    for name, r in zip(names, ranks):
        rows, cols = ckpt.info(name).shape
        out, inp = (rows, cols) if ckpt.layout(name) == "out_in" else (cols, rows)
        entry = DeltaEntry.lowrank(torch.randn(out, r, generator=g), torch.randn(inp, r, generator=g) * 0.1,
                                   ckpt.layout(name))
        delta.add(name, entry, ckpt)
    return delta


def _targets(family: str) -> list[str]:
    if family == "gpt2":
        return ["transformer.h.1.mlp.c_proj.weight", "transformer.h.2.mlp.c_proj.weight"]
    return ["model.layers.1.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight"]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_export_loads_in_peft_and_merges_to_base_plus_delta(family, request, tmp_path, caplog):
    from transformers import AutoModelForCausalLM

    folder = request.getfixturevalue(f"{family}_dir")
    ckpt = Checkpoint(folder)
    names = _targets(family)
    delta = _delta(ckpt, names, ranks=[2, 3])  # uneven ranks -> rank_pattern
    summary = export_lora(delta, ckpt, tmp_path / "adapter")
    assert summary["fan_in_fan_out"] == (family == "gpt2")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["lora_alpha"] == config["r"] and config["rank_pattern"]

    with caplog.at_level(logging.WARNING), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), tmp_path / "adapter")
    messages = [r.getMessage() for r in caplog.records] + [str(w.message) for w in caught]
    assert not [m for m in messages if "missing adapter keys" in m.lower()]
    merged = model.merge_and_unload().state_dict()
    for name in names:
        expected = ckpt.get(name).float() + delta.entries[name].stored_update()
        assert torch.allclose(merged[name], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_adapter_reads_back_as_the_same_delta(family, request, tmp_path):
    ckpt = Checkpoint(request.getfixturevalue(f"{family}_dir"))
    delta = _delta(ckpt, _targets(family), ranks=[1, 4], seed=1)
    export_lora(delta, ckpt, tmp_path / "adapter")
    back = delta_from_peft(tmp_path / "adapter", ckpt)
    assert set(back.entries) == set(delta.entries)
    for name, entry in delta.entries.items():
        assert back.entries[name].layout == entry.layout
        assert torch.allclose(back.entries[name].to_dense(), entry.to_dense(), atol=1e-5)


def test_export_lora_cli(llama_dir, tmp_path):
    ckpt = Checkpoint(llama_dir)
    _delta(ckpt, _targets("llama"), ranks=[1, 1]).save(tmp_path / "d.safetensors")
    runner = CliRunner()
    res = runner.invoke(app, ["export-lora", str(llama_dir), str(tmp_path / "d.safetensors"), "-o",
                              str(tmp_path / "lora"), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["r"] == 1
    again = runner.invoke(app, ["export-lora", str(llama_dir), str(tmp_path / "d.safetensors"), "-o",
                                str(tmp_path / "lora")])
    assert again.exit_code == 1 and "already exists" in again.stderr


def test_apply_accepts_a_peft_adapter_as_delta(llama_dir, tmp_path):
    """Every command that takes a delta also takes an adapter folder; apply is the end-to-end check."""
    ckpt = Checkpoint(llama_dir)
    delta = _delta(ckpt, _targets("llama"), ranks=[2, 1], seed=3)
    export_lora(delta, ckpt, tmp_path / "adapter")
    res = CliRunner().invoke(app, ["apply", str(llama_dir), str(tmp_path / "adapter"), "-o", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    out = Checkpoint(tmp_path / "out")
    for name, entry in delta.entries.items():
        assert torch.allclose(out.get(name), ckpt.get(name) + entry.stored_update(), atol=1e-5)


def test_inspect_and_prune_take_a_peft_adapter(llama_dir, tmp_path):
    """A LoRA fine-tune can be inspected and restrained against its base like any delta."""
    ckpt = Checkpoint(llama_dir)
    delta = _delta(ckpt, _targets("llama"), ranks=[2, 2], seed=4)
    export_lora(delta, ckpt, tmp_path / "adapter")
    runner = CliRunner()
    res = runner.invoke(app, ["inspect", str(llama_dir), "--delta", str(tmp_path / "adapter"), "--json"])
    assert res.exit_code == 0, res.output
    report = {t["name"]: t for t in json.loads(res.stdout)["tensors"]}
    assert set(report) == set(delta.entries) and all(t["delta"]["rank"] == 2 for t in report.values())
    res = runner.invoke(app, ["prune", str(llama_dir), str(tmp_path / "adapter"), "-o",
                              str(tmp_path / "pruned.safetensors"), "--json"])
    assert res.exit_code == 0, res.output
    pruned = Delta.load(tmp_path / "pruned.safetensors")
    assert set(pruned.entries) == set(delta.entries) and pruned.restraints
