"""`diff` and `apply`: library round trips on GPT-2 (Conv1D) and sharded bf16 LLaMA, then the CLI's contract
(exit codes, --json, one-line errors, nothing written on failure)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import assert_clean_failure, with_singular_values
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from prunecli.cli import app
from prunecli.core.applying import apply_deltas
from prunecli.core.checkpoint import Checkpoint
from prunecli.core.delta import META_KEY, Delta
from prunecli.core.diffing import diff_checkpoints
from prunecli.errors import PruneCliError

GPT2_EDITS = {"transformer.h.1.mlp.c_proj.weight": [3.0], "transformer.h.2.attn.c_attn.weight": [4.0, 2.0, 1.0]}
LLAMA_EDITS = {"model.layers.1.mlp.down_proj.weight": [3.0], "model.layers.2.self_attn.q_proj.weight": [4.0, 2.0, 1.0]}


def math_shape(ck: Checkpoint, name: str) -> tuple[int, int]:
    shape = ck.info(name).shape
    return (shape[0], shape[1]) if ck.layout(name) == "out_in" else (shape[1], shape[0])


def make_edited(base_dir: Path, dest: Path, changes: dict[str, torch.Tensor]) -> Path:
    """A copy of `base_dir` with D (math orientation [out, in]) added to each named matrix, saved in its dtype."""
    ck = Checkpoint(base_dir)
    updates = {}
    for name, d in changes.items():
        stored_d = d if ck.layout(name) == "out_in" else d.T
        updates[name] = ck.get(name).double() + stored_d
    ck.write_updated(dest, updates)
    return dest


@pytest.fixture(scope="module")
def gpt2_edit(gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    ck = Checkpoint(gpt2_dir)
    truth = {n: with_singular_values(*math_shape(ck, n), s, seed=i) for i, (n, s) in enumerate(GPT2_EDITS.items())}
    return gpt2_dir, make_edited(gpt2_dir, tmp_path_factory.mktemp("edit") / "gpt2", truth), truth


@pytest.fixture(scope="module")
def llama_edit(llama_sharded_bf16_dir: Path,
               tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    ck = Checkpoint(llama_sharded_bf16_dir)
    truth = {n: with_singular_values(*math_shape(ck, n), s, seed=i) for i, (n, s) in enumerate(LLAMA_EDITS.items())}
    edited = make_edited(llama_sharded_bf16_dir, tmp_path_factory.mktemp("edit") / "llama", truth)
    return llama_sharded_bf16_dir, edited, truth


# ------------------------------------------------------------------------------------------------- library
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_diff_finds_exactly_the_edits(request: pytest.FixtureRequest, family: str) -> None:
    base_dir, edited_dir, truth = request.getfixturevalue(f"{family}_edit")
    base, edited = Checkpoint(base_dir), Checkpoint(edited_dir)
    delta = diff_checkpoints(base, edited)
    assert set(delta.entries) == set(truth)
    op = delta.history[-1]
    assert op["op"] == "diff" and op["edited"] == str(edited_dir) and op["rank"] is None and op["tol"] is None
    edits = GPT2_EDITS if family == "gpt2" else LLAMA_EDITS
    # bf16 storage rounds the edited weights: what diff can recover is D up to that rounding.
    atol = 1e-5 if family == "gpt2" else 0.05
    for name, d in truth.items():
        entry = delta.entries[name]
        assert entry.is_lowrank and entry.rank == len(edits[name]) == op["per_tensor"][name]["rank"]
        assert entry.layout == base.layout(name)
        torch.testing.assert_close(entry.to_dense(torch.float64), d, atol=atol, rtol=0)
        assert 0 <= op["per_tensor"][name]["rel_error"] < (1e-6 if family == "gpt2" else 0.05)
        assert delta.fingerprints[name] == base.fingerprint(name)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_apply_reproduces_the_edited_checkpoint(tmp_path: Path, request: pytest.FixtureRequest, family: str) -> None:
    base_dir, edited_dir, truth = request.getfixturevalue(f"{family}_edit")
    base, edited = Checkpoint(base_dir), Checkpoint(edited_dir)
    apply_deltas(base, diff_checkpoints(base, edited), tmp_path / "out")
    out = Checkpoint(tmp_path / "out")
    assert out.names() == edited.names()
    for name in edited.names():
        got, want = out.get(name), edited.get(name)
        assert got.dtype == want.dtype
        if name in truth:  # one bf16 ulp at most where the rounding of the edit is not in the delta
            torch.testing.assert_close(got.float(), want.float(), atol=1e-5 if family == "gpt2" else 0.02,
                                       rtol=1e-6 if family == "gpt2" else 2**-7)
        else:
            assert torch.equal(got, want), name


def test_rank_and_tolerance(gpt2_edit: tuple[Path, Path, dict[str, torch.Tensor]]) -> None:
    base_dir, edited_dir, truth = gpt2_edit
    base, edited = Checkpoint(base_dir), Checkpoint(edited_dir)
    name = "transformer.h.2.attn.c_attn.weight"  # singular values 4, 2, 1
    one = diff_checkpoints(base, edited, rank=1)
    assert one.entries[name].rank == 1 and one.entries["transformer.h.1.mlp.c_proj.weight"].rank == 1
    assert one.history[-1]["rank"] == 1
    assert one.history[-1]["per_tensor"][name]["rel_error"] == pytest.approx((5 / 21) ** 0.5, rel=1e-5)
    u, s, vh = torch.linalg.svd(truth[name])
    torch.testing.assert_close(one.entries[name].to_dense(torch.float64), s[0] * torch.outer(u[:, 0], vh[0]),
                               atol=1e-5, rtol=0)
    for tol, k in [(0.6, 1), (0.4, 2), (0.1, 3)]:  # errors: rank 1 0.488, rank 2 0.218, rank 3 ~0
        d = diff_checkpoints(base, edited, tol=tol)
        assert d.entries[name].rank == k and d.history[-1]["tol"] == tol
        assert d.history[-1]["per_tensor"][name]["rel_error"] <= tol
    with pytest.raises(PruneCliError):
        diff_checkpoints(base, edited, rank=1, tol=0.1)


def test_dense_fallback(tmp_path: Path, llama_dir: Path) -> None:
    base = Checkpoint(llama_dir)
    name = "model.layers.0.self_attn.o_proj.weight"
    d = torch.randn(32, 32, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 0.1
    edited = Checkpoint(make_edited(llama_dir, tmp_path / "edited", {name: d}))
    delta = diff_checkpoints(base, edited)
    entry = delta.entries[name]
    assert not entry.is_lowrank and delta.history[-1]["per_tensor"][name] == {
        "rank": 32, "rel_error": 0.0, "kind": "dense", "shape": [32, 32]}
    apply_deltas(base, delta, tmp_path / "out")
    torch.testing.assert_close(Checkpoint(tmp_path / "out").get(name), edited.get(name), atol=1e-6, rtol=1e-6)


def test_select_and_names(tmp_path: Path, gpt2_dir: Path,
                          gpt2_edit: tuple[Path, Path, dict[str, torch.Tensor]]) -> None:
    base_dir, edited_dir, _ = gpt2_edit
    base = Checkpoint(base_dir)
    only_mlp = diff_checkpoints(base, Checkpoint(edited_dir), select=["*.mlp.*"])
    assert list(only_mlp.entries) == ["transformer.h.1.mlp.c_proj.weight"]
    with pytest.raises(PruneCliError, match=r"no tensor matches --select 'nope\*'"):
        diff_checkpoints(base, Checkpoint(edited_dir), select=["*.mlp.*", "nope*"])
    # An edited GPT-2 saved without the `transformer.` prefix diffs by canonical names.
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(edited_dir / "config.json", bare)
    save_file({n.removeprefix("transformer."): t for n, t in load_file(edited_dir / "model.safetensors").items()},
              bare / "model.safetensors")
    assert set(diff_checkpoints(base, Checkpoint(bare)).entries) == set(GPT2_EDITS)


def test_changed_vectors_are_skipped_not_dropped_silently(tmp_path: Path, llama_dir: Path) -> None:
    base = Checkpoint(llama_dir)
    norm, matrix = "model.layers.0.input_layernorm.weight", "model.layers.0.mlp.up_proj.weight"
    only_norm = tmp_path / "norm"
    base.write_updated(only_norm, {norm: base.get(norm) + 1})
    with pytest.raises(PruneCliError, match="only tensors that are not 2-D changed"):
        diff_checkpoints(base, Checkpoint(only_norm))
    both = tmp_path / "both"
    base.write_updated(both, {norm: base.get(norm) + 1, matrix: base.get(matrix) + 1})
    delta = diff_checkpoints(base, Checkpoint(both))
    assert list(delta.entries) == [matrix] and delta.entries[matrix].rank == 1
    assert list(delta.history[-1]["skipped"]) == [norm]
    result = run("diff", llama_dir, both, "-o", tmp_path / "d.safetensors", "--json")
    assert result.exit_code == 0 and list(json.loads(result.stdout)["skipped"]) == [norm]
    assert "warning" in result.stderr and norm in result.stderr and "2-D" in result.stderr


def test_mismatched_checkpoints(tmp_path: Path, gpt2_dir: Path, llama_dir: Path) -> None:
    with pytest.raises(PruneCliError, match="hold different tensors"):
        diff_checkpoints(Checkpoint(gpt2_dir), Checkpoint(llama_dir))
    save_file({"w": torch.zeros(4, 4), "v": torch.zeros(3)}, tmp_path / "a.safetensors")
    save_file({"w": torch.zeros(4, 5), "v": torch.zeros(3)}, tmp_path / "b.safetensors")
    with pytest.raises(PruneCliError, match=r"tensor w has shape \[4, 4\] in .* but \[4, 5\]"):
        diff_checkpoints(Checkpoint(tmp_path / "a.safetensors"), Checkpoint(tmp_path / "b.safetensors"))


def test_equal_values_stored_differently_are_not_changes(tmp_path: Path) -> None:
    zeros = torch.zeros(4, 6)
    nan = torch.full((4, 6), float("nan"))
    save_file({"signed": zeros, "nan": nan, "real": zeros.clone(), "half": torch.ones(4, 6, dtype=torch.bfloat16)},
              tmp_path / "a.safetensors")
    changed = zeros.clone()
    changed[1, 2] = 0.5
    save_file({"signed": -zeros, "nan": nan.clone(), "real": changed, "half": torch.ones(4, 6, dtype=torch.bfloat16)},
              tmp_path / "b.safetensors")
    delta = diff_checkpoints(Checkpoint(tmp_path / "a.safetensors"), Checkpoint(tmp_path / "b.safetensors"))
    assert list(delta.entries) == ["real"] and delta.entries["real"].rank == 1
    torch.testing.assert_close(delta.entries["real"].to_dense(), changed)


# ---------------------------------------------------------------------------------------------------- CLI
runner = CliRunner()


def run(*args: object) -> object:
    return runner.invoke(app, [str(a) for a in args])


def test_cli_diff_then_apply(tmp_path: Path, gpt2_edit: tuple[Path, Path, dict[str, torch.Tensor]]) -> None:
    base_dir, edited_dir, _ = gpt2_edit
    delta_path = tmp_path / "d.safetensors"
    result = run("diff", base_dir, edited_dir, "-o", delta_path, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["output"] == str(delta_path) and summary["skipped"] == {}
    assert {n: t["rank"] for n, t in summary["tensors"].items()} == {n: len(s) for n, s in GPT2_EDITS.items()}
    assert {t["kind"] for t in summary["tensors"].values()} == {"lowrank"}
    assert all(t["rel_error"] < 1e-6 for t in summary["tensors"].values())
    out = tmp_path / "out"
    result = run("apply", base_dir, delta_path, "-o", out, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["rewritten_files"] == ["model.safetensors"] and sorted(summary["tensors"]) == sorted(GPT2_EDITS)
    edited = Checkpoint(edited_dir)
    for name in GPT2_EDITS:
        torch.testing.assert_close(Checkpoint(out).get(name), edited.get(name), atol=1e-5, rtol=1e-6)
    with safe_open(str(out / "model.safetensors"), framework="pt") as fh:
        assert json.loads(fh.metadata()["prunecli.applied"]) == [str(delta_path.resolve())]
    # Human output: a table on stdout, the log line on stderr.
    result = run("diff", base_dir, edited_dir, "-o", tmp_path / "d2.safetensors", "--rank", "1")
    assert result.exit_code == 0 and "transformer.h.2.attn.c_attn.weight" in result.stdout
    assert "wrote" in result.stderr and "wrote" not in result.stdout


def test_cli_apply_composes_deltas_in_order(tmp_path: Path,
                                            gpt2_edit: tuple[Path, Path, dict[str, torch.Tensor]]) -> None:
    base_dir, edited_dir, _ = gpt2_edit
    parts = []
    for i, glob in enumerate(["*.mlp.*", "*.attn.*"]):
        parts.append(tmp_path / f"{i}.safetensors")
        assert run("diff", base_dir, edited_dir, "-o", parts[-1], "--select", glob).exit_code == 0
    assert run("apply", base_dir, *parts, "-o", tmp_path / "out").exit_code == 0
    edited, out = Checkpoint(edited_dir), Checkpoint(tmp_path / "out")
    for name in edited.names():
        torch.testing.assert_close(out.get(name), edited.get(name), atol=1e-5, rtol=1e-6)


def test_cli_usage_errors(tmp_path: Path, gpt2_dir: Path) -> None:
    out = tmp_path / "d.safetensors"
    for extra in (["--rank", "2", "--tol", "0.1"], ["--tol", "1.5"], ["--tol", "0"], ["--rank", "0"]):
        result = run("diff", gpt2_dir, gpt2_dir, "-o", out, *extra)
        assert result.exit_code == 2, (extra, result.output)
    assert not out.exists()
    assert run("apply", gpt2_dir, "-o", tmp_path / "o").exit_code == 2  # no delta given


def test_cli_nothing_differs(tmp_path: Path, gpt2_dir: Path) -> None:
    out = tmp_path / "d.safetensors"
    assert_clean_failure(run("diff", gpt2_dir, gpt2_dir, "-o", out), "nothing to write", absent=out)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_cli_corrupt_checkpoint(tmp_path: Path, gpt2_edit: tuple[Path, Path, dict[str, torch.Tensor]],
                                damage: str) -> None:
    base_dir, edited_dir, _ = gpt2_edit
    broken = tmp_path / "broken"
    shutil.copytree(edited_dir, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[:-1000] if damage == "truncated" else b"\x93NUMPY" * 50)
    out = tmp_path / "d.safetensors"
    assert_clean_failure(run("diff", base_dir, broken, "-o", out), "corrupt", absent=out)
    delta = tmp_path / "delta.safetensors"
    assert run("diff", base_dir, edited_dir, "-o", delta).exit_code == 0
    assert_clean_failure(run("apply", broken, delta, "-o", tmp_path / "o"), "corrupt", absent=tmp_path / "o")
    # A damaged delta file too.
    delta.write_bytes(delta.read_bytes()[:-100])
    assert_clean_failure(run("apply", base_dir, delta, "-o", tmp_path / "o"), "corrupt", absent=tmp_path / "o")


def test_cli_apply_to_another_base(tmp_path: Path, gpt2_edit: tuple[Path, Path, dict[str, torch.Tensor]]) -> None:
    base_dir, edited_dir, _ = gpt2_edit
    delta = tmp_path / "d.safetensors"
    assert run("diff", base_dir, edited_dir, "-o", delta).exit_code == 0
    out = tmp_path / "out"
    assert_clean_failure(run("apply", edited_dir, delta, "-o", out), "another base", "--ignore-base-mismatch",
                         absent=out)
    # --force only overwrites outputs: it no longer silences the base check (a re-run must not apply edits twice).
    assert_clean_failure(run("apply", edited_dir, delta, "-o", out, "--force"), "another base", absent=out)
    result = run("apply", edited_dir, delta, "-o", out, "--ignore-base-mismatch")
    assert result.exit_code == 0, result.output
    assert "warning:" in result.stderr and "transformer.h.1.mlp.c_proj.weight" in result.stderr


def test_cli_shape_mismatch(tmp_path: Path) -> None:
    save_file({"w": torch.zeros(4, 4)}, tmp_path / "a.safetensors")
    save_file({"w": torch.ones(4, 5)}, tmp_path / "b.safetensors")
    out = tmp_path / "d.safetensors"
    assert_clean_failure(run("diff", tmp_path / "a.safetensors", tmp_path / "b.safetensors", "-o", out), "shape",
                         absent=out)
    # A delta whose tensor has another shape in the base it is applied to.
    delta = tmp_path / "delta.safetensors"
    save_file({"w": torch.ones(4, 4)}, tmp_path / "a2.safetensors")
    assert run("diff", tmp_path / "a.safetensors", tmp_path / "a2.safetensors", "-o", delta).exit_code == 0
    assert_clean_failure(run("apply", tmp_path / "b.safetensors", delta, "-o", tmp_path / "o.safetensors", "--force"),
                         "shape mismatch", absent=tmp_path / "o.safetensors")


def test_cli_nan_in_delta(tmp_path: Path, gpt2_edit: tuple[Path, Path, dict[str, torch.Tensor]]) -> None:
    base_dir, edited_dir, _ = gpt2_edit
    good = tmp_path / "good.safetensors"
    assert run("diff", base_dir, edited_dir, "-o", good).exit_code == 0
    tensors = load_file(good)
    with safe_open(str(good), framework="pt") as fh:
        meta = fh.metadata()
    key = next(iter(tensors))
    tensors[key][0, 0] = float("nan")
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, bad, metadata=meta)
    assert isinstance(Delta.load(good), Delta) and META_KEY in meta
    assert_clean_failure(run("apply", base_dir, bad, "-o", tmp_path / "out"), "NaN", absent=tmp_path / "out")


def test_cli_unknown_select(tmp_path: Path, gpt2_edit: tuple[Path, Path, dict[str, torch.Tensor]]) -> None:
    base_dir, edited_dir, _ = gpt2_edit
    out = tmp_path / "d.safetensors"
    assert_clean_failure(run("diff", base_dir, edited_dir, "-o", out, "--select", "model.layers.*"),
                         "no tensor matches --select 'model.layers.*'", absent=out)


def test_cli_existing_output(tmp_path: Path, gpt2_edit: tuple[Path, Path, dict[str, torch.Tensor]]) -> None:
    base_dir, edited_dir, _ = gpt2_edit
    existing = tmp_path / "d.safetensors"
    existing.write_bytes(b"keep me")
    assert_clean_failure(run("diff", base_dir, edited_dir, "-o", existing), "already exists", "--force")
    assert existing.read_bytes() == b"keep me"
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "mine.txt").write_text("keep me")
    # Checked before any work: the (bad) delta is not even read.
    assert_clean_failure(run("apply", base_dir, existing, "-o", out_dir), "already exists", "--force")
    assert [p.name for p in out_dir.iterdir()] == ["mine.txt"]
    assert run("diff", base_dir, edited_dir, "-o", existing, "--force").exit_code == 0
    assert isinstance(Delta.load(existing), Delta)
    # A folder prunecli did not write is never replaced, even with --force; one it wrote is.
    assert_clean_failure(run("apply", base_dir, existing, "-o", out_dir, "--force"), "did not write")
    assert [p.name for p in out_dir.iterdir()] == ["mine.txt"]
    ours = tmp_path / "ours"
    assert run("apply", base_dir, existing, "-o", ours).exit_code == 0
    assert run("apply", base_dir, existing, "-o", ours, "--force").exit_code == 0
    assert (ours / "model.safetensors").exists()


def test_cli_unwritable_output(tmp_path: Path, gpt2_edit: tuple[Path, Path, dict[str, torch.Tensor]]) -> None:
    base_dir, edited_dir, _ = gpt2_edit
    a_file = tmp_path / "plain-file"
    a_file.write_text("x")
    for out in (a_file / "d.safetensors", tmp_path / "no" / "such" / "dir" / "d.safetensors"):
        result = run("diff", base_dir, edited_dir, "-o", out)
        assert_clean_failure(result, "cannot write")
    delta = tmp_path / "d.safetensors"
    assert run("diff", base_dir, edited_dir, "-o", delta).exit_code == 0
    assert_clean_failure(run("apply", base_dir, delta, "-o", a_file / "out"), "not a directory")
    # Kinds that do not fit, even with --force: a folder where a delta file goes, a file where a folder goes.
    assert_clean_failure(run("diff", base_dir, edited_dir, "-o", tmp_path, "--force"), "is a directory")
    assert_clean_failure(run("apply", base_dir, delta, "-o", a_file, "--force"), "is not a directory")
    assert a_file.read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.safetensors", "plain-file"]


def test_cli_help_has_examples() -> None:
    for command in ("diff", "apply"):
        result = run(command, "--help")
        assert result.exit_code == 0 and "Example:" in result.stdout


@pytest.mark.slow
def test_real_model_round_trip(tmp_path: Path) -> None:
    """SmolLM2-135M: apply a rank-2 delta (rewrites the single 540 MB shard, streamed), diff finds it back."""
    from prunecli.core.lowrank import compress_dense
    from prunecli.models.builtin import default_model_dir

    if not (default_model_dir() / "config.json").exists():
        pytest.skip("the SmolLM2 folder is not converted on this machine")
    base = Checkpoint(default_model_dir())
    name = "model.layers.7.mlp.down_proj.weight"  # [576, 1536]
    delta = Delta.for_base(base)
    delta.add(name, compress_dense(with_singular_values(576, 1536, [2.0, 1.0], seed=0), "out_in").entry, base)
    apply_deltas(base, delta, tmp_path / "edited")
    back = diff_checkpoints(base, Checkpoint(tmp_path / "edited"))
    assert list(back.entries) == [name] and back.entries[name].rank == 2
    torch.testing.assert_close(back.entries[name].to_dense(), delta.entries[name].to_dense(), atol=1e-5, rtol=0)
