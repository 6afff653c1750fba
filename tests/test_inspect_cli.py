"""`prunecli inspect` end to end on the tiny GPT-2 and LLaMA checkpoints (CliRunner, no subprocess)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from prunecli.cli import app
from prunecli.core.checkpoint import Checkpoint
from prunecli.core.delta import Delta, DeltaEntry

runner = CliRunner()

GPT2_TARGETS = ["transformer.h.1.attn.c_proj.weight", "transformer.h.2.mlp.c_proj.weight"]
STAT_KEYS = {"name", "shape", "dtype", "layout", "sigma_max", "sigma_min", "kappa", "fro", "stable_rank"}


def _invoke(*args: str):
    return runner.invoke(app, ["inspect", *map(str, args)])


def _one_line_error(result, exit_code: int = 1) -> str:
    assert result.exit_code == exit_code, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def gpt2_delta(gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A rank-2 delta on two GPT-2 matrices (one square, one not), written like `prunecli edit` would."""
    ckpt = Checkpoint(gpt2_dir)
    g = torch.Generator().manual_seed(0)
    delta = Delta.for_base(ckpt)
    for name in GPT2_TARGETS:
        inp, out = ckpt.info(name).shape  # Conv1D stores [in, out]
        delta.add(name, DeltaEntry.lowrank(5 * torch.randn(out, 2, generator=g), torch.randn(inp, 2, generator=g),
                                           "in_out"), ckpt)
    path = tmp_path_factory.mktemp("delta") / "edits.safetensors"
    delta.save(path)
    return path


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_table_and_json(family: str, request) -> None:
    folder = request.getfixturevalue(f"{family}_dir")
    table = _invoke(folder)
    assert table.exit_code == 0, table.output
    assert "σ_max" in table.stdout
    result = _invoke(folder, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["kind"] == "checkpoint" and doc["exact"] is False and doc["deltas"] == []
    n_matrices = len(Checkpoint(folder).matrices())
    assert len(doc["tensors"]) == n_matrices
    for t in doc["tensors"]:
        assert STAT_KEYS <= set(t) and "edited" not in t
        assert t["sigma_max"] >= t["sigma_min"] > 0 and t["kappa"] == pytest.approx(t["sigma_max"] / t["sigma_min"])


def test_select_and_exact(gpt2_dir: Path) -> None:
    result = _invoke(gpt2_dir, "--select", "*.h.0.mlp.*", "-s", "h.3.attn.c_attn.weight", "--exact", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["exact"] is True
    assert [t["name"] for t in doc["tensors"]] == ["transformer.h.0.mlp.c_fc.weight",
                                                   "transformer.h.0.mlp.c_proj.weight",
                                                   "transformer.h.3.attn.c_attn.weight"]


def test_precision_float32_for_a_whole_checkpoint_float64_otherwise(llama_dir: Path) -> None:
    whole = json.loads(_invoke(llama_dir, "--json").stdout)
    assert whole["precision"] == "float32"
    assert {t["path"] for t in whole["tensors"]} == {"gram-float32", "gram-float64"}  # the guard decides per matrix
    forced = json.loads(_invoke(llama_dir, "--precision", "float64", "--json").stdout)
    assert forced["precision"] == "float64" and {t["path"] for t in forced["tensors"]} == {"gram-float64"}
    for fast, ref in zip(whole["tensors"], forced["tensors"], strict=True):
        for key in ("sigma_max", "sigma_min", "kappa", "fro", "stable_rank"):
            assert fast[key] == pytest.approx(ref[key], rel=2 * 1e-3)  # kappa and stable rank: two values' errors
    selected = json.loads(_invoke(llama_dir, "-s", "*.mlp.*", "--json").stdout)
    assert selected["precision"] == "float64" and {t["path"] for t in selected["tensors"]} == {"gram-float64"}
    chosen = json.loads(_invoke(llama_dir, "-s", "*.mlp.*", "--precision", "float32", "--json").stdout)
    assert chosen["precision"] == "float32"
    exact = json.loads(_invoke(llama_dir, "--exact", "--json").stdout)
    assert exact["precision"] is None and {t["path"] for t in exact["tensors"]} == {"svd-float64"}
    assert _invoke(llama_dir, "--precision", "float16").exit_code == 2


def test_bad_glob_is_one_line_error(llama_dir: Path) -> None:
    line = _one_line_error(_invoke(llama_dir, "--select", "*.nothing.*"))
    assert "no tensor matches --select '*.nothing.*'" in line
    assert "not 2-D" in _one_line_error(_invoke(llama_dir, "--select", "*layernorm*"))


def test_delta_reports_edited_and_delta_spectra(gpt2_dir: Path, gpt2_delta: Path) -> None:
    result = _invoke(gpt2_dir, "--delta", gpt2_delta, "--top", "3", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["deltas"] == [str(gpt2_delta)]
    assert [t["name"] for t in doc["tensors"]] == GPT2_TARGETS  # default selection: the touched matrices
    for t in doc["tensors"]:
        assert {"sigma_max", "sigma_min", "kappa", "fro", "stable_rank"} <= set(t["edited"])
        assert t["delta"]["rank"] == 2 and len(t["delta"]["top_singular_values"]) == 2
        assert 0 <= t["delta"]["n_above_sigma_max"] <= 2
        assert t["edited"]["sigma_max"] != pytest.approx(t["sigma_max"])
    # untouched matrices, when selected, say so with nulls
    doc = json.loads(_invoke(gpt2_dir, "-d", gpt2_delta, "-s", "*.h.0.mlp.c_fc.weight", "--json").stdout)
    assert doc["tensors"][0]["edited"] is None and doc["tensors"][0]["delta"] is None
    table = _invoke(gpt2_dir, "--delta", gpt2_delta)
    assert table.exit_code == 0 and "κ(W+D)" in table.stdout


def test_delta_on_the_wrong_base_fails(llama_dir: Path, gpt2_delta: Path) -> None:
    assert "does not have" in _one_line_error(_invoke(llama_dir, "--delta", gpt2_delta))


def test_delta_on_a_changed_base_needs_ignore_base_mismatch(gpt2_dir: Path, gpt2_delta: Path, tmp_path: Path) -> None:
    from tiny_models import save_tiny_model

    other = save_tiny_model("gpt2", tmp_path / "other", seed=1)
    assert "another base" in _one_line_error(_invoke(other, "--delta", gpt2_delta))
    assert "another base" in _one_line_error(_invoke(other, "--delta", gpt2_delta, "--force"))
    result = _invoke(other, "--delta", gpt2_delta, "--ignore-base-mismatch", "--json")
    assert result.exit_code == 0 and "warning:" in result.stderr


def test_inspecting_a_delta_file(gpt2_delta: Path) -> None:
    result = _invoke(gpt2_delta, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["kind"] == "delta"
    assert [t["name"] for t in doc["tensors"]] == GPT2_TARGETS
    for t in doc["tensors"]:
        assert t["kind"] == "lowrank" and t["rank"] == 2 and t["layout"] == "in_out"
        assert t["fro"] == pytest.approx(sum(v * v for v in t["top_singular_values"]) ** 0.5)
    table = _invoke(gpt2_delta, "--select", "*attn*")
    assert table.exit_code == 0 and "attn.c_proj" in table.stdout and "mlp.c_proj" not in table.stdout
    assert "--delta needs a checkpoint" in _one_line_error(_invoke(gpt2_delta, "--delta", gpt2_delta))


def test_plot_writes_png_and_respects_existing_files(gpt2_dir: Path, gpt2_delta: Path, tmp_path: Path) -> None:
    png = tmp_path / "spectra.png"
    result = _invoke(gpt2_dir, "--delta", gpt2_delta, "--plot", png)
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "already exists" in _one_line_error(_invoke(gpt2_dir, "--plot", png))
    assert _invoke(gpt2_dir, "-s", "*.h.0.*", "--plot", png, "--force").exit_code == 0
    assert not [p for p in tmp_path.iterdir() if p.name != "spectra.png"]  # no temp files left behind


def test_corrupt_safetensors_is_one_line_error(gpt2_dir: Path, tmp_path: Path) -> None:
    data = (gpt2_dir / "model.safetensors").read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    assert "truncated or corrupt" in _one_line_error(_invoke(truncated))
    folder = tmp_path / "garbage"
    shutil.copytree(gpt2_dir, folder)
    (folder / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    assert "truncated or corrupt" in _one_line_error(_invoke(folder))


def test_ill_conditioned_matrix_warns_on_the_fast_path(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    u, _ = torch.linalg.qr(torch.randn(24, 24, dtype=torch.float64))
    w = ((u * torch.logspace(0, -9, 24, dtype=torch.float64)) @ u.T).float()
    save_file({"w": w.contiguous()}, str(tmp_path / "m.safetensors"))
    result = _invoke(tmp_path / "m.safetensors")
    assert result.exit_code == 0 and "--exact" in result.stderr
    assert "--exact" not in _invoke(tmp_path / "m.safetensors", "--exact").stderr


def test_usage_errors_exit_2(gpt2_dir: Path) -> None:
    assert _invoke(gpt2_dir, "--device", "tpu").exit_code == 2
    assert _invoke(gpt2_dir, "--top", "0").exit_code == 2


def test_sharded_bf16_and_pickle_checkpoints(llama_sharded_bf16_dir: Path, llama_dir: Path, tmp_path: Path) -> None:
    doc = json.loads(_invoke(llama_sharded_bf16_dir, "--json").stdout)
    assert len(doc["tensors"]) == len(Checkpoint(llama_sharded_bf16_dir).matrices())
    assert {t["dtype"] for t in doc["tensors"]} == {"BF16"}
    ckpt = Checkpoint(llama_dir)
    torch.save({n: ckpt.get(n) for n in ckpt.names()}, tmp_path / "pytorch_model.bin")
    assert "--allow-pickle" in _one_line_error(_invoke(tmp_path))
    pickled = json.loads(_invoke(tmp_path, "--allow-pickle", "--json").stdout)
    assert [t["sigma_max"] for t in pickled["tensors"]] == [t["sigma_max"] for t in
                                                           json.loads(_invoke(llama_dir, "--json").stdout)["tensors"]]


@pytest.mark.slow
def test_smollm2_fast_path_agrees_with_exact() -> None:
    args = ["smollm2", "--select", "*layers.0.*", "--select", "model.embed_tokens.weight", "--json"]
    fast, exact = (json.loads(_invoke(*args, *extra).stdout)["tensors"] for extra in ([], ["--exact"]))
    assert len(fast) == 8 and [t["name"] for t in fast] == [t["name"] for t in exact]
    for f, e in zip(fast, exact, strict=True):
        assert f["sigma_max"] == pytest.approx(e["sigma_max"], rel=1e-9)
        assert f["sigma_min"] == pytest.approx(e["sigma_min"], rel=1e-6)  # kappa up to ~5e4 here


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_cuda_without_cuda_is_one_line_error(gpt2_dir: Path) -> None:
    assert "CUDA is not available" in _one_line_error(_invoke(gpt2_dir, "--device", "cuda"))


def test_non_finite_weights_are_named(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"good": torch.randn(4, 6), "bad": torch.tensor([[1.0, float("nan")], [0.0, 1.0]])},
              str(tmp_path / "m.safetensors"))
    assert "tensor bad" in _one_line_error(_invoke(tmp_path / "m.safetensors"))
    assert _invoke(tmp_path / "m.safetensors", "--select", "good").exit_code == 0


def test_layers_are_listed_in_numeric_order(tmp_path: Path) -> None:
    """Layer 10 comes after layer 9, not after layer 1 (text order), in a checkpoint and in a delta file."""
    from helpers import random_delta
    from tiny_models import save_tiny_model

    model = save_tiny_model("llama", tmp_path / "deep", n_layer=11)
    result = _invoke(model, "--select", "*.mlp.down_proj.weight", "--json")
    assert result.exit_code == 0, result.output
    layers = [int(t["name"].split(".")[2]) for t in json.loads(result.stdout)["tensors"]]
    assert layers == list(range(11))
    deltas = [Delta.load(random_delta(model, f"model.layers.{i}.mlp.down_proj.weight", tmp_path / f"{i}.safetensors",
                                      i)) for i in (10, 2)]
    deltas[0].compose(deltas[1]).save(tmp_path / "both.safetensors")
    for args in ([tmp_path / "both.safetensors"], [model, "--delta", tmp_path / "both.safetensors"]):
        shown = json.loads(_invoke(*args, "--json").stdout)["tensors"]
        assert [t["name"].split(".")[2] for t in shown] == ["2", "10"], args


def test_the_plot_says_what_it_shows(gpt2_dir: Path, gpt2_delta: Path, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A restrained delta's plot: "wrote" on stderr, a title naming the delta and "restrained", kappa in the panel
    title, D' in the legend, sigma as mathtext (no literal underscore), and at least 1260 pixels wide."""
    import struct

    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    figures: list[Figure] = []
    savefig = Figure.savefig

    def keep(fig: Figure, *args: object, **kwargs: object) -> object:
        figures.append(fig)
        return savefig(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    pruned = tmp_path / "pruned.safetensors"
    assert runner.invoke(app, ["prune", str(gpt2_dir), str(gpt2_delta), "--fn", "linear", "-o", str(pruned)]
                         ).exit_code == 0
    png = tmp_path / "spectra.png"
    result = _invoke(gpt2_dir, "--delta", pruned, "--plot", png)
    assert result.exit_code == 0, result.output
    assert f"wrote {png}" in result.stderr
    (figure,) = figures
    assert f"+ {pruned.name} (restrained)" in figure._suptitle.get_text()
    panel = figure.axes[0]
    assert "κ(W) " in panel.get_title() and "κ(W + D') " in panel.get_title()
    labels = [t.get_text() for t in panel.get_legend().get_texts()]
    assert {"W", "D'", "W + D'"} <= set(labels) and any(label.startswith(r"$\sigma_{max}(W)$") for label in labels)
    assert panel.get_ylabel() == r"singular value $\sigma_i$"
    width, _ = struct.unpack(">II", png.read_bytes()[16:24])
    assert width >= 1260


def test_values_kept_above_sigma_max_by_the_restraint_are_explained(gpt2_dir: Path, gpt2_delta: Path,
                                                                   tmp_path: Path) -> None:
    """After linear F the count of D' values above sigma_max(W) stays > 0 by design: the table says so."""
    pruned = tmp_path / "pruned.safetensors"
    assert runner.invoke(app, ["prune", str(gpt2_dir), str(gpt2_delta), "--fn", "linear", "-o", str(pruned)]
                         ).exit_code == 0
    shown = json.loads(_invoke(gpt2_dir, "--delta", pruned, "--json").stdout)["tensors"]
    assert any(t["delta"]["n_above_sigma_max"] > 0 for t in shown)
    result = _invoke(gpt2_dir, "--delta", pruned)
    assert "#σ(D')>σ_max(W)" in result.stdout
    assert "log and linear F shrink them but keep them above sigma_max by design" in " ".join(result.stderr.split())
    assert "by design" not in _invoke(gpt2_dir, "--delta", gpt2_delta).stderr  # not restrained: nothing to explain
