"""Checkpoint reading (folders, shards, single files, GPT-2 names, tied lm_head, pickles, corrupt files) and
`write_updated` (dtype, untouched shards, index, loadability, same model as the in-memory edit)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from helpers import one_line_error
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from prunecli.core.applying import APPLIED_KEY, apply_deltas
from prunecli.core.atomic import MARKER
from prunecli.core.checkpoint import Checkpoint
from prunecli.core.delta import Delta, DeltaEntry
from prunecli.errors import PruneCliError
from prunecli.models.loading import add_delta_to_model


def all_stored(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


# ------------------------------------------------------------------------------------------------------- reading
def test_single_folder_gpt2(gpt2_dir: Path) -> None:
    ck = Checkpoint(gpt2_dir)
    stored = all_stored(gpt2_dir)
    assert sorted(ck.names()) == sorted(stored)
    assert set(ck.matrices()) == {n for n, t in stored.items() if t.ndim == 2}
    name = "transformer.h.0.mlp.c_fc.weight"
    info = ck.info(name)
    assert info.shape == (32, 128) and info.dtype == "F32" and info.file == "model.safetensors"
    assert torch.equal(ck.get(name), stored[name])
    assert ck.layout(name) == "in_out"  # Conv1D stores [in, out]
    assert ck.layout("transformer.wte.weight") == "out_in"
    assert ck.model_type == "gpt2"


def test_sharded_bf16_folder(llama_sharded_bf16_dir: Path) -> None:
    ck = Checkpoint(llama_sharded_bf16_dir)
    stored = all_stored(llama_sharded_bf16_dir)
    index = json.loads((llama_sharded_bf16_dir / "model.safetensors.index.json").read_text())
    assert sorted(ck.names()) == sorted(stored) == sorted(index["weight_map"])
    for name, file in index["weight_map"].items():
        assert ck.info(name).file == file
        assert ck.info(name).dtype == "BF16"
    name = "model.layers.1.mlp.down_proj.weight"
    got = ck.get(name)
    assert got.dtype == torch.bfloat16 and torch.equal(got, stored[name])
    assert ck.layout(name) == "out_in"


def test_single_safetensors_file(tmp_path: Path, gpt2_dir: Path) -> None:
    # Inside a model folder, the folder's config still applies (Conv1D layout).
    inside = Checkpoint(gpt2_dir / "model.safetensors")
    assert not inside.is_folder and inside.layout("transformer.h.0.mlp.c_fc.weight") == "in_out"
    # A lone file: no config, plain names.
    lone = tmp_path / "weights.safetensors"
    save_file({"w": torch.arange(6.0).reshape(2, 3), "v": torch.ones(4, dtype=torch.float16)}, lone)
    ck = Checkpoint(lone)
    assert ck.names() == ["v", "w"] and ck.matrices() == ["w"] and ck.model_type is None
    assert ck.info("v").dtype == "F16" and torch.equal(ck.get("w"), torch.arange(6.0).reshape(2, 3))
    with pytest.raises(PruneCliError) as e:
        ck.get("nope")
    one_line_error(e, "nope")


def unprefixed_gpt2(gpt2_dir: Path, dest: Path) -> Path:
    """A GPT-2 folder saved the old way: no `transformer.` prefix on the weight names."""
    dest.mkdir()
    shutil.copy(gpt2_dir / "config.json", dest / "config.json")
    stored = load_file(gpt2_dir / "model.safetensors")
    save_file({n.removeprefix("transformer."): t for n, t in stored.items()}, dest / "model.safetensors",
              metadata={"format": "pt"})
    return dest


def test_gpt2_names_with_and_without_prefix(tmp_path: Path, gpt2_dir: Path) -> None:
    with_prefix = Checkpoint(gpt2_dir)
    without = Checkpoint(unprefixed_gpt2(gpt2_dir, tmp_path / "old-gpt2"))
    assert "h.0.attn.c_attn.weight" in without.names()
    for ck in (with_prefix, without):
        for name in ("transformer.h.0.attn.c_attn.weight", "h.0.attn.c_attn.weight"):
            assert ck.canonical(name) == "transformer.h.0.attn.c_attn.weight"
            assert ck.layout(name) == "in_out"
            assert torch.equal(ck.get(name), with_prefix.get("transformer.h.0.attn.c_attn.weight"))
        assert ck.canonical("lm_head.weight") == "transformer.wte.weight"
    assert without.resolve("transformer.h.0.attn.c_attn.weight") == "h.0.attn.c_attn.weight"
    assert without.fingerprint("h.0.mlp.c_fc.weight") == with_prefix.fingerprint("transformer.h.0.mlp.c_fc.weight")


def test_tied_lm_head_resolves(tmp_path: Path, llama_dir: Path) -> None:
    ck = Checkpoint(llama_dir)
    assert "lm_head.weight" not in ck.names()
    assert ck.resolve("lm_head.weight") == "model.embed_tokens.weight"
    assert torch.equal(ck.get("lm_head.weight"), ck.get("model.embed_tokens.weight"))
    # Untied config with no lm_head stored: a clear error, not the embedding.
    untied = tmp_path / "untied"
    shutil.copytree(llama_dir, untied)
    config = json.loads((untied / "config.json").read_text())
    (untied / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    with pytest.raises(PruneCliError) as e:
        Checkpoint(untied).resolve("lm_head.weight")
    one_line_error(e, "lm_head.weight", "not found")


def test_pickle_refused_unless_allowed(tmp_path: Path, llama_dir: Path) -> None:
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(llama_dir / "config.json", folder / "config.json")
    state = load_file(llama_dir / "model.safetensors")
    torch.save(state, folder / "pytorch_model.bin")
    for path in (folder, folder / "pytorch_model.bin"):
        with pytest.raises(PruneCliError) as e:
            Checkpoint(path)
        one_line_error(e, "pickle", "--allow-pickle")
    ck = Checkpoint(folder, allow_pickle=True)
    assert ck.pickled and sorted(ck.names()) == sorted(state)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(ck.get(name), state[name])
    # Writing from a pickle gives safetensors only.
    new = state[name] + 1.0
    assert ck.write_updated(tmp_path / "out", {name: new}) == ["model.safetensors"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [MARKER, "config.json", "model.safetensors"]
    assert torch.equal(load_file(tmp_path / "out" / "model.safetensors")[name], new)


def test_pickle_that_is_not_a_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save([torch.ones(2)], path)
    with pytest.raises(PruneCliError) as e:
        Checkpoint(path, allow_pickle=True)
    one_line_error(e, "state dict")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_files_fail_with_one_line(tmp_path: Path, gpt2_dir: Path, damage: str) -> None:
    folder = tmp_path / "bad"
    shutil.copytree(gpt2_dir, folder)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"not a safetensors file " * 20,
                         "empty": b""}[damage])
    for path in (folder, weights):
        with pytest.raises(PruneCliError) as e:
            Checkpoint(path)
        one_line_error(e, "model.safetensors", "corrupt")


def test_bad_folders(tmp_path: Path, llama_sharded_bf16_dir: Path) -> None:
    with pytest.raises(PruneCliError) as e:
        Checkpoint(tmp_path / "missing")
    one_line_error(e, "does not exist")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PruneCliError) as e:
        Checkpoint(tmp_path / "empty")
    one_line_error(e, "holds no weights")
    broken = tmp_path / "broken"
    shutil.copytree(llama_sharded_bf16_dir, broken)
    (broken / "model-00003-of-00007.safetensors").unlink()
    with pytest.raises(PruneCliError) as e:
        Checkpoint(broken)
    one_line_error(e, "missing", "model-00003-of-00007.safetensors")
    (broken / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(PruneCliError) as e:
        Checkpoint(broken)
    one_line_error(e, "model.safetensors.index.json")


# ------------------------------------------------------------------------------------------------------- writing
def test_write_updated_sharded_bf16(tmp_path: Path, llama_sharded_bf16_dir: Path) -> None:
    base_dir = llama_sharded_bf16_dir
    ck = Checkpoint(base_dir)
    name = "model.layers.1.mlp.down_proj.weight"
    new = ck.get(name).float() * 2.0 + 0.01
    out = tmp_path / "out"
    rewritten = ck.write_updated(out, {name: new}, metadata={"prunecli.test": "yes"})
    touched = ck.info(name).file
    assert rewritten == [touched]
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, *(p.name for p in base_dir.iterdir())])
    for f in base_dir.iterdir():
        if f.name.endswith(".safetensors") and f.name != touched:
            assert os.stat(f).st_ino == os.stat(out / f.name).st_ino  # hard-linked, not rewritten
        elif f.name != touched:
            assert (out / f.name).read_bytes() == f.read_bytes()  # config, tokenizer, index copied
    assert os.stat(base_dir / touched).st_ino != os.stat(out / touched).st_ino
    result = Checkpoint(out)
    assert result.info(name).dtype == "BF16"
    assert torch.equal(result.get(name), new.to(torch.bfloat16))
    for other in ck.names():
        if other != name:
            assert torch.equal(result.get(other), ck.get(other))
    with safe_open(str(out / touched), framework="pt") as fh:
        meta = fh.metadata()
    assert meta["format"] == "pt" and meta["prunecli.test"] == "yes"


def test_write_updated_refusals_leave_nothing(tmp_path: Path, llama_dir: Path) -> None:
    ck = Checkpoint(llama_dir)
    name = "model.layers.0.mlp.up_proj.weight"
    with pytest.raises(PruneCliError) as e:
        ck.write_updated(llama_dir, {name: ck.get(name)}, force=True)
    one_line_error(e, "in place")
    with pytest.raises(PruneCliError) as e:
        ck.write_updated(llama_dir.parent, {name: ck.get(name)}, force=True)
    one_line_error(e, "contains the base")
    existing = tmp_path / "exists"
    existing.mkdir()
    with pytest.raises(PruneCliError) as e:
        ck.write_updated(existing, {name: ck.get(name)})
    one_line_error(e, "already exists", "--force")
    # A failure while writing (wrong shape, found only when the tensor is produced) leaves no output, no temp files.
    with pytest.raises(PruneCliError) as e:
        ck.write_updated(tmp_path / "out", {name: torch.zeros(3, 3)})
    one_line_error(e, name, "shape")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"]


def test_write_updated_single_file(tmp_path: Path, gpt2_dir: Path) -> None:
    ck = Checkpoint(unprefixed_gpt2(gpt2_dir, tmp_path / "old") / "model.safetensors")
    new = torch.zeros(ck.info("h.0.mlp.c_fc.weight").shape)
    out = tmp_path / "edited.safetensors"
    assert ck.write_updated(out, {"transformer.h.0.mlp.c_fc.weight": new}) == ["edited.safetensors"]
    stored = load_file(out)
    assert torch.equal(stored["h.0.mlp.c_fc.weight"], new)  # written under the stored (unprefixed) name
    assert oct(os.stat(out).st_mode & 0o777) != oct(0o600)  # not the private mode of a temp file


def lowrank_delta(ck: Checkpoint, names: list[str], rank: int, seed: int) -> Delta:
    gen = torch.Generator().manual_seed(seed)
    delta = Delta.for_base(ck)
    for name in names:
        info = ck.info(name)
        out_dim, in_dim = info.shape if ck.layout(name) == "out_in" else info.shape[::-1]
        a = torch.randn(out_dim, rank, generator=gen) * 0.3
        b = torch.randn(in_dim, rank, generator=gen) * 0.3
        delta.add(name, DeltaEntry.lowrank(a, b, ck.layout(name)), ck)
    return delta


@pytest.mark.parametrize("fixture, names", [
    ("llama_sharded_bf16_dir", ["model.layers.1.mlp.down_proj.weight", "model.layers.2.self_attn.q_proj.weight"]),
    ("gpt2_dir", ["transformer.h.1.mlp.c_proj.weight", "transformer.h.2.attn.c_attn.weight"]),
])
def test_applied_checkpoint_equals_in_memory_edit(tmp_path: Path, request: pytest.FixtureRequest, fixture: str,
                                                  names: list[str]) -> None:
    from transformers import AutoModelForCausalLM

    base_dir: Path = request.getfixturevalue(fixture)
    ck = Checkpoint(base_dir)
    delta = lowrank_delta(ck, names, rank=2, seed=3)
    out = tmp_path / "applied"
    apply_deltas(ck, delta, out, provenance=["/deltas/one.safetensors"])
    dtype = torch.bfloat16 if fixture == "llama_sharded_bf16_dir" else torch.float32
    applied = AutoModelForCausalLM.from_pretrained(out, dtype=dtype).eval()
    in_memory = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype).eval()
    add_delta_to_model(in_memory, delta)
    for name, param in in_memory.named_parameters():
        assert torch.equal(param, applied.get_parameter(name)), name
    tokens = torch.randint(0, applied.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(applied(tokens).logits, in_memory(tokens).logits)
        base_logits = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype).eval()(tokens).logits
    assert not torch.allclose(base_logits, applied(tokens).logits)  # the edit did change the model
    for file in {ck.info(n).file for n in names}:
        with safe_open(str(out / file), framework="pt") as fh:
            assert json.loads(fh.metadata()[APPLIED_KEY]) == ["/deltas/one.safetensors"]


def test_delta_orientation_matches_module_math(tmp_path: Path, gpt2_dir: Path) -> None:
    """For a Conv1D layer (stored [in, out]) the applied update must act as y += D x with D = a b^T [out, in]."""
    from transformers import AutoModelForCausalLM

    ck = Checkpoint(gpt2_dir)
    name = "transformer.h.0.mlp.c_fc.weight"  # in 32, out 128
    delta = lowrank_delta(ck, [name], rank=1, seed=5)
    apply_deltas(ck, delta, tmp_path / "applied")
    base = AutoModelForCausalLM.from_pretrained(gpt2_dir, dtype=torch.float32)
    applied = AutoModelForCausalLM.from_pretrained(tmp_path / "applied", dtype=torch.float32)
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(1))
    entry = delta.entries[name]
    expected = x @ (entry.a @ entry.b.T).T
    with torch.no_grad():
        got = applied.transformer.h[0].mlp.c_fc(x) - base.transformer.h[0].mlp.c_fc(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
