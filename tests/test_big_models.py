"""Big-model loading (accelerate device maps with CPU/disk offload): deltas and edits reach offloaded parameters,
and evaluate gives the same metrics as a plain load.

On this CPU-only machine `--device-map auto --max-memory cpu=...` keeps the first layers in RAM and offloads the rest
to "disk" (accelerate then reads them from the checkpoint's safetensors on every forward pass, the module weights
being `meta` placeholders). A model offloaded with `accelerate.cpu_offload` exercises the in-memory weights map that
GPU runs use for CPU-offloaded modules.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import COUNTERFACT
from typer.testing import CliRunner

from prunecli.cli import app
from prunecli.core.checkpoint import Checkpoint
from prunecli.core.delta import Delta, DeltaEntry
from prunecli.errors import PruneCliError
from prunecli.models.loading import add_delta_to_model, load_model, parse_max_memory, placement_kwargs
from prunecli.models.placement import input_device, read_tensor, write_tensor

runner = CliRunner()
# 160 kB of "CPU memory" for the 250 kB tiny LLaMA: embeddings and layer 0 stay in RAM, layers 1-3 go to disk.
OFFLOAD = {"device_map": "auto", "max_memory": "cpu=160000"}
RESIDENT, ON_DISK = "model.layers.0.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight"


def _delta(model_dir: Path, names: list[str], seed: int = 3) -> Delta:
    ck = Checkpoint(model_dir)
    gen = torch.Generator().manual_seed(seed)
    delta = Delta.for_base(ck)
    for name in names:
        out, inp = ck.info(name).shape
        a, b = torch.randn(out, 2, generator=gen), torch.randn(inp, 2, generator=gen)
        delta.add(name, DeltaEntry.lowrank(a, b, "out_in"), ck)
    return delta


def _logits(model: torch.nn.Module, text: str = "The Eiffel Tower is located in") -> torch.Tensor:
    from tiny_models import tiny_tokenizer

    ids = torch.tensor([tiny_tokenizer()(text)["input_ids"]], device=input_device(model))
    with torch.no_grad():
        return model(input_ids=ids).logits.float().cpu()


def test_device_map_offloads_and_matches_plain_load(llama_dir: Path, tmp_path: Path) -> None:
    plain, _, _ = load_model(llama_dir)
    mapped, _, _ = load_model(llama_dir, offload_folder=tmp_path / "off", **OFFLOAD)
    assert set(mapped.hf_device_map.values()) == {"cpu", "disk"}
    assert mapped.get_parameter(ON_DISK).device.type == "meta"
    assert mapped.get_parameter(RESIDENT).device.type == "cpu"
    assert input_device(mapped) == torch.device("cpu")
    torch.testing.assert_close(read_tensor(mapped, ON_DISK), plain.get_parameter(ON_DISK).detach())
    torch.testing.assert_close(_logits(mapped), _logits(plain))


def _edited(delta: Delta, *args: object, **kwargs: object) -> tuple[object, object, Checkpoint]:
    """load_model, then the delta added (as `evaluate` and `edit` do)."""
    model, tok, base = load_model(*args, **kwargs)
    add_delta_to_model(model, delta)
    return model, tok, base


def test_delta_reaches_disk_offloaded_parameters(llama_dir: Path, tmp_path: Path) -> None:
    """Deltas on a resident and a disk-offloaded matrix change the outputs exactly as on a plain load, and the
    checkpoint the offloaded weights are read from is not written."""
    delta = _delta(llama_dir, [RESIDENT, ON_DISK])
    before = (llama_dir / "model.safetensors").read_bytes()
    plain, _, _ = _edited(delta, llama_dir)
    mapped, _, _ = _edited(delta, llama_dir, offload_folder=tmp_path / "off", **OFFLOAD)
    assert mapped.get_parameter(ON_DISK).device.type == "meta"
    for name in (RESIDENT, ON_DISK):
        torch.testing.assert_close(read_tensor(mapped, name), plain.get_parameter(name).detach())
    unedited, _, _ = load_model(llama_dir)
    assert not torch.allclose(_logits(plain), _logits(unedited), atol=1e-3)
    torch.testing.assert_close(_logits(mapped), _logits(plain), rtol=1e-5, atol=1e-5)
    assert (llama_dir / "model.safetensors").read_bytes() == before


def test_delta_reaches_cpu_offloaded_parameters(llama_dir: Path) -> None:
    """The in-memory weights map (what a GPU run keeps for modules offloaded to the CPU) is updated too."""
    from accelerate import cpu_offload

    delta = _delta(llama_dir, [ON_DISK])
    plain, _, _ = _edited(delta, llama_dir)
    offloaded, _, _ = load_model(llama_dir)
    cpu_offload(offloaded, execution_device=torch.device("cpu"))
    assert offloaded.get_parameter(ON_DISK).device.type == "meta"
    add_delta_to_model(offloaded, delta)
    torch.testing.assert_close(_logits(offloaded), _logits(plain), rtol=1e-5, atol=1e-5)


def test_write_tensor_casts_and_checks_shape(llama_sharded_bf16_dir: Path, tmp_path: Path) -> None:
    model, _, _ = load_model(llama_sharded_bf16_dir, dtype="bf16", device_map="auto", max_memory="cpu=80000",
                             offload_folder=tmp_path / "off")  # half the bytes of fp32: half the budget
    assert model.get_parameter(ON_DISK).device.type == "meta"
    value = torch.full(tuple(model.get_parameter(ON_DISK).shape), 0.5)
    write_tensor(model, ON_DISK, value)
    stored = read_tensor(model, ON_DISK)
    assert stored.dtype == torch.bfloat16 and bool((stored == 0.5).all())
    with pytest.raises(PruneCliError, match="shape"):
        write_tensor(model, ON_DISK, value.T)


def test_placement_options_are_checked() -> None:
    assert parse_max_memory("0=20GiB, cuda:1=10GB,cpu=60GiB,mps=1000") == {0: "20GiB", 1: "10GB", "cpu": "60GiB",
                                                                         "mps": 1000}
    for bad in ("0:20GiB", "tpu=3GB", "cpu=lots", ""):
        with pytest.raises(PruneCliError, match="--max-memory"):
            parse_max_memory(bad)
    assert placement_kwargs(None, None, None) == {}
    with pytest.raises(PruneCliError, match="need --device-map"):
        placement_kwargs(None, "cpu=1GB", None)
    with pytest.raises(PruneCliError, match="--device-map"):
        placement_kwargs("everywhere", None, None)
    assert placement_kwargs("cpu", "cpu=1GB", "off") == {"device_map": "cpu", "max_memory": {"cpu": "1GB"},
                                                          "offload_folder": "off"}


def _evaluate(args: list[str]) -> dict:
    result = runner.invoke(app, ["evaluate", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_evaluate_with_device_map_matches_plain_load(llama_dir: Path, tmp_path: Path) -> None:
    edits = tmp_path / "cf.json"
    edits.write_text(json.dumps(COUNTERFACT[:2]))
    text = tmp_path / "text.txt"
    from tiny_models import CORPUS

    text.write_text(" ".join(CORPUS))
    delta = tmp_path / "d.safetensors"
    _delta(llama_dir, [RESIDENT, ON_DISK], seed=5).save(delta)
    common = [str(llama_dir), "-d", str(delta), "-e", str(edits), "-t", "counterfact,perplexity", "--text", str(text),
              "--window", "16", "--stride", "8"]
    plain = _evaluate([*common, "--device", "cpu"])
    mapped = _evaluate([*common, "--device-map", "auto", "--max-memory", "cpu=160000", "--offload-folder",
                        str(tmp_path / "off")])
    assert "disk" in mapped["settings"]["device_map"].values()
    assert mapped["n"] == plain["n"] and mapped["metrics"].keys() == plain["metrics"].keys()
    for name, value in plain["metrics"].items():
        assert mapped["metrics"][name] == pytest.approx(value, rel=1e-5, abs=1e-7), name


def test_evaluate_rejects_offload_options_without_a_map(llama_dir: Path) -> None:
    result = runner.invoke(app, ["evaluate", str(llama_dir), "--tasks", "perplexity", "--max-memory", "cpu=1GB"])
    assert result.exit_code == 1
    assert "need --device-map" in result.output


def _cli(command: str, *args: object) -> dict:
    result = runner.invoke(app, [command, *[str(a) for a in args], "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_stats_and_edits_with_device_map_match_plain_load(llama_dir: Path, tmp_path: Path) -> None:
    """stats, ROME and MEMIT on a model whose edited layers are partly resident (0) and partly disk-offloaded (2)
    give the statistics and deltas of a plain load; the offloaded weights are edited in memory, never on disk."""
    from editing_helpers import TINY_SETS, write_requests
    from tiny_models import CORPUS

    from prunecli.editors.stats import KeyStats

    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(CORPUS))
    requests = write_requests(tmp_path / "requests.jsonl")
    before = (llama_dir / "model.safetensors").read_bytes()
    mapped = ["--device-map", "auto", "--max-memory", "cpu=160000", "--offload-folder", tmp_path / "off"]
    runs = {}
    for kind, extra in (("plain", []), ("mapped", mapped)):
        stats = tmp_path / f"{kind}.stats.safetensors"
        _cli("stats", llama_dir, "--layers", "0,2", "--text", text, "--tokens", 400, "--seq-len", 32, "-o", stats,
             *extra)
        # Settings under which the edits take (`edit` refuses to write a run in which none did).
        sets = [a for s in [*TINY_SETS, "v_num_grad_steps=20", "mom2_update_weight=1"] for a in ("--set", s)]
        _cli("edit", llama_dir, "--requests", requests, "--limit", 2, "--method", "rome", *sets, "--set", "layers=2",
             "-o", tmp_path / f"{kind}.rome.safetensors", *extra)
        _cli("edit", llama_dir, "--requests", requests, "--method", "memit", "--stats",
             tmp_path / "plain.stats.safetensors",
             "--batch-size", 2, *sets, "--set", "layers=[0,2]", "-o", tmp_path / f"{kind}.memit.safetensors", *extra)
        runs[kind] = (KeyStats.load(stats), Delta.load(tmp_path / f"{kind}.rome.safetensors"),
                      Delta.load(tmp_path / f"{kind}.memit.safetensors"))
    (stats_p, *deltas_p), (stats_m, *deltas_m) = runs["plain"], runs["mapped"]
    assert stats_m.counts == stats_p.counts
    for layer in (0, 2):
        torch.testing.assert_close(stats_m.sums[layer], stats_p.sums[layer], rtol=1e-9, atol=1e-9)
    for plain, offloaded in zip(deltas_p, deltas_m):
        assert set(offloaded.entries) == set(plain.entries) and ON_DISK in plain.entries
        for name, entry in plain.entries.items():
            torch.testing.assert_close(offloaded.entries[name].to_dense(), entry.to_dense(), rtol=1e-4, atol=1e-5)
    assert (llama_dir / "model.safetensors").read_bytes() == before
