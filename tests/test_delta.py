"""The delta file format: round trip, composition, base checks, and validation of bad files (one-line errors)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import one_line_error
from safetensors.torch import load_file, save_file

from prunecli.core.checkpoint import Checkpoint
from prunecli.core.delta import META_KEY, Delta, DeltaEntry
from prunecli.core.delta_files import load_deltas
from prunecli.errors import PruneCliError, PruneCliWarning

C_FC = "transformer.h.0.mlp.c_fc.weight"  # Conv1D, stored [32, 128]: math [out 128, in 32]
C_PROJ = "transformer.h.1.attn.c_proj.weight"  # Conv1D, stored [32, 32]
WTE = "transformer.wte.weight"  # embedding, stored [vocab, 32] like nn.Linear


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def gpt2(gpt2_dir: Path) -> Checkpoint:
    return Checkpoint(gpt2_dir)


def sample_delta(ck: Checkpoint, seed: int = 0) -> Delta:
    delta = Delta.for_base(ck)
    delta.add(C_FC, DeltaEntry.lowrank(rand(128, 2, seed=seed), rand(32, 2, seed=seed + 1), "in_out"), ck)
    vocab = ck.info(WTE).shape[0]
    delta.add(WTE, DeltaEntry.from_dense(rand(vocab, 32, seed=seed + 2), "out_in"), ck)
    delta.history.append({"op": "edit", "method": "test", "requests": [{"subject": f"s{seed}"}]})
    return delta


def test_round_trip(tmp_path: Path, gpt2: Checkpoint) -> None:
    delta = sample_delta(gpt2)
    path = tmp_path / "d.safetensors"
    delta.save(path)
    back = Delta.load(path)
    assert back.entries.keys() == delta.entries.keys()
    for name, entry in delta.entries.items():
        got = back.entries[name]
        assert got.layout == entry.layout and got.is_lowrank == entry.is_lowrank
        assert all(torch.equal(x, y) for x, y in zip(got.tensors(), entry.tensors(), strict=True))
    assert back.fingerprints == delta.fingerprints == {n: gpt2.fingerprint(n) for n in (C_FC, WTE)}
    assert back.history == delta.history and back.requests == [{"subject": "s0"}]
    assert back.model_type == "gpt2" and back.source == str(gpt2.path)
    stored = load_file(path)
    assert sorted(stored) == [f"{C_FC}::A", f"{C_FC}::B", f"{WTE}::D"]
    assert all(t.dtype == torch.float32 for t in stored.values())
    back.check_base(gpt2)  # made on this base: no error


def test_add_checks_layout_and_shape(gpt2: Checkpoint) -> None:
    delta = Delta.for_base(gpt2)
    with pytest.raises(PruneCliError) as e:
        delta.add(C_FC, DeltaEntry.lowrank(rand(128, 1, seed=0), rand(32, 1, seed=1), "out_in"), gpt2)
    one_line_error(e, C_FC, "layout")
    with pytest.raises(PruneCliError) as e:
        delta.add(C_FC, DeltaEntry.lowrank(rand(32, 1, seed=0), rand(128, 1, seed=1), "in_out"), gpt2)
    one_line_error(e, C_FC, "shape")
    # Names without GPT-2's prefix are stored under the canonical name; adding twice sums.
    e1 = DeltaEntry.lowrank(rand(128, 1, seed=0), rand(32, 1, seed=1), "in_out")
    e2 = DeltaEntry.lowrank(rand(128, 1, seed=2), rand(32, 1, seed=3), "in_out")
    delta.add("h.0.mlp.c_fc.weight", e1, gpt2)
    delta.add(C_FC, e2, gpt2)
    assert list(delta.entries) == [C_FC]
    torch.testing.assert_close(delta.entries[C_FC].to_dense(), e1.to_dense() + e2.to_dense())


def test_composition_concatenates_factors(tmp_path: Path, gpt2: Checkpoint) -> None:
    d1, d2 = sample_delta(gpt2, seed=0), sample_delta(gpt2, seed=10)
    d1.save(tmp_path / "1.safetensors")
    d2.save(tmp_path / "2.safetensors")
    both = load_deltas([tmp_path / "1.safetensors", tmp_path / "2.safetensors"])
    assert both is not None and load_deltas([]) is None
    fc = both.entries[C_FC]
    assert fc.is_lowrank and fc.rank == 4
    assert torch.equal(fc.a, torch.cat([d1.entries[C_FC].a, d2.entries[C_FC].a], 1))
    assert torch.equal(fc.b, torch.cat([d1.entries[C_FC].b, d2.entries[C_FC].b], 1))
    for name in (C_FC, WTE):
        expected = d1.entries[name].to_dense(torch.float64) + d2.entries[name].to_dense(torch.float64)
        torch.testing.assert_close(both.entries[name].to_dense(torch.float64), expected)
        torch.testing.assert_close(both.entries[name].stored_update(), expected.T.float() if name == C_FC
                                   else expected.float())
    assert [op["requests"][0]["subject"] for op in both.history] == ["s0", "s10"]


def test_sum_turns_dense_past_half_rank() -> None:
    a = DeltaEntry.lowrank(rand(8, 3, seed=0), rand(6, 3, seed=1), "out_in")
    b = DeltaEntry.lowrank(rand(8, 1, seed=2), rand(6, 1, seed=3), "out_in")
    total = a + b  # rank 4 > min(8, 6) / 2
    assert not total.is_lowrank
    torch.testing.assert_close(total.to_dense(), a.to_dense() + b.to_dense())
    with pytest.raises(PruneCliError):
        a + DeltaEntry.lowrank(rand(6, 1, seed=0), rand(8, 1, seed=1), "out_in")


def test_compose_refuses_other_base(gpt2: Checkpoint) -> None:
    d1, d2 = sample_delta(gpt2), sample_delta(gpt2)
    d2.fingerprints[C_FC] = "sha256:" + "0" * 64
    with pytest.raises(PruneCliError) as e:
        d1.compose(d2)
    one_line_error(e, "different bases", C_FC)


def test_check_base(tmp_path: Path, gpt2: Checkpoint, llama_dir: Path) -> None:
    delta = sample_delta(gpt2)
    delta.fingerprints[C_FC] = "sha256:" + "0" * 64
    with pytest.raises(PruneCliError) as e:
        delta.check_base(gpt2)
    one_line_error(e, "another base", C_FC, "--ignore-base-mismatch")
    with pytest.warns(PruneCliWarning, match=C_FC.replace(".", r"\.")):
        assert delta.check_base(gpt2, ignore_mismatch=True) == [C_FC]
    assert sample_delta(gpt2).check_base(gpt2) == []
    with pytest.raises(PruneCliError) as e:
        sample_delta(gpt2).check_base(Checkpoint(llama_dir), ignore_mismatch=True)
    one_line_error(e, "does not have", f"the delta was made for {gpt2.path} (model_type gpt2)")
    wrong_shape = Delta(entries={C_PROJ: DeltaEntry.from_dense(torch.zeros(32, 16), "in_out")},
                        fingerprints={C_PROJ: gpt2.fingerprint(C_PROJ)}, model_type="gpt2", source="/models/gpt2-xl")
    with pytest.raises(PruneCliError) as e:
        wrong_shape.check_base(gpt2, ignore_mismatch=True)
    one_line_error(e, "shape mismatch", C_PROJ, "the delta was made for /models/gpt2-xl (model_type gpt2)")


def test_refuses_empty_and_non_finite(tmp_path: Path, gpt2: Checkpoint) -> None:
    with pytest.raises(PruneCliError) as e:
        Delta.for_base(gpt2).save(tmp_path / "empty.safetensors")
    one_line_error(e, "empty delta")
    bad = Delta.for_base(gpt2)
    a = rand(128, 1, seed=0)
    a[3, 0] = float("inf")
    bad.add(C_FC, DeltaEntry.lowrank(a, rand(32, 1, seed=1), "in_out"), gpt2)
    with pytest.raises(PruneCliError) as e:
        bad.save(tmp_path / "inf.safetensors")
    one_line_error(e, "NaN or Inf", C_FC)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------- invalid files
def rewrite(src: Path, dest: Path, meta: Any = None, drop: str | None = None,
            change: dict[str, torch.Tensor] | None = None, digests: bool = False) -> Path:
    """A copy of delta `src` with its metadata document, tensors or both tampered with. The tensor digests are
    dropped (as in a file written before they existed, so the structural checks are reached) unless `digests`."""
    tensors = {k: v for k, v in load_file(src).items() if k != drop}
    tensors.update(change or {})
    from safetensors import safe_open

    with safe_open(str(src), framework="pt") as fh:
        doc = json.loads(fh.metadata()[META_KEY])
    if not digests:
        del doc["digests"]
    raw = meta(doc) if callable(meta) else json.dumps(doc)
    save_file(tensors, dest, metadata={"format": "pt", META_KEY: raw})
    return dest


def with_doc(**changes: Any) -> Any:
    return lambda doc: json.dumps({**doc, **changes})


@pytest.mark.parametrize("case, words", [
    ("not_a_delta", ["not a prunecli delta"]),
    ("bad_json", ["not JSON"]),
    ("wrong_format", ["format"]),
    ("future_version", ["version 2", "not supported"]),
    ("missing_tensor", ["missing", f"{C_FC}::B"]),
    ("shape_mismatch", ["do not match", C_FC]),
    ("nan", ["NaN or Inf", WTE]),
    ("extra_tensor", ["not described"]),
    ("no_fingerprint", ["no base fingerprint"]),
    ("bad_layout", ["layout"]),
    ("truncated", ["truncated or corrupt"]),
    ("garbage", ["truncated or corrupt"]),
    ("missing_file", ["does not exist"]),
    ("directory", ["is a directory"]),
    ("altered", ["does not match the digest", f"{C_FC}::A"]),
    ("digest_missing", ["has no recorded digest", f"{C_FC}::A"]),
])
def test_invalid_delta_files(tmp_path: Path, gpt2: Checkpoint, case: str, words: list[str]) -> None:
    good = tmp_path / "good.safetensors"
    sample_delta(gpt2).save(good)
    bad = tmp_path / "bad.safetensors"
    vocab = gpt2.info(WTE).shape[0]
    nan_dense = rand(vocab, 32, seed=0)
    nan_dense[0, 0] = float("nan")
    if case == "not_a_delta":
        save_file({"x": torch.ones(2, 2)}, bad)
    elif case == "bad_json":
        rewrite(good, bad, meta=lambda doc: "{oops")
    elif case == "wrong_format":
        rewrite(good, bad, meta=with_doc(format="something-else"))
    elif case == "future_version":
        rewrite(good, bad, meta=with_doc(version=2))
    elif case == "missing_tensor":
        rewrite(good, bad, drop=f"{C_FC}::B")
    elif case == "shape_mismatch":
        rewrite(good, bad, change={f"{C_FC}::B": torch.zeros(32, 3)})
    elif case == "nan":
        rewrite(good, bad, change={f"{WTE}::D": nan_dense})
    elif case == "extra_tensor":
        rewrite(good, bad, change={"stray": torch.zeros(1)})
    elif case == "no_fingerprint":
        rewrite(good, bad, meta=lambda doc: json.dumps({**doc, "base": {**doc["base"], "fingerprints": {}}}))
    elif case == "bad_layout":
        rewrite(good, bad, meta=lambda doc: json.dumps(
            {**doc, "entries": {**doc["entries"], C_FC: {**doc["entries"][C_FC], "layout": "sideways"}}}))
    elif case == "altered":  # every value of a factor replaced, the metadata (digests included) kept
        rewrite(good, bad, change={f"{C_FC}::A": torch.full_like(load_file(good)[f"{C_FC}::A"], 3e38)}, digests=True)
    elif case == "digest_missing":
        rewrite(good, bad, meta=lambda doc: json.dumps({**doc, "digests": {
            k: v for k, v in doc["digests"].items() if k != f"{C_FC}::A"}}), digests=True)
    elif case == "truncated":
        bad.write_bytes(good.read_bytes()[:-100])
    elif case == "garbage":
        bad.write_bytes(b"\x00" * 7)
    elif case == "directory":
        bad.mkdir()
    with pytest.raises(PruneCliError) as e:
        Delta.load(bad)
    one_line_error(e, *words)
