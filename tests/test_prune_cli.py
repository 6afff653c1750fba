"""`prunecli prune`: the CLI contract (exit codes, --json, one-line errors, nothing written on failure, base check)
on tiny LLaMA (nn.Linear) and GPT-2 (Conv1D) checkpoints."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import assert_clean_failure
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from prunecli.cli import app
from prunecli.core.checkpoint import Checkpoint
from prunecli.core.delta import META_KEY, Delta, DeltaEntry

runner = CliRunner()
EDITS = {
    "llama": {"model.layers.1.mlp.down_proj.weight": [60.0, 8.0, 1.0],
              "model.layers.2.self_attn.q_proj.weight": [20.0]},
    "gpt2": {"transformer.h.1.mlp.c_proj.weight": [60.0, 8.0, 1.0], "transformer.h.2.attn.c_attn.weight": [20.0]},
}
FIELDS = {"name", "sigma_max_base", "n_restrained", "rank", "kappa_base", "kappa_edited", "kappa_pruned",
          "top_before", "top_after", "warning"}


def run(*args: object) -> object:
    return runner.invoke(app, ["prune", *(str(a) for a in args)])


def make_delta(ckpt_dir: Path, family: str, path: Path) -> Path:
    ckpt = Checkpoint(ckpt_dir)
    delta = Delta.for_base(ckpt)
    gen = torch.Generator().manual_seed(0)
    for name, singular in EDITS[family].items():
        shape = ckpt.info(name).shape
        out, inp = (shape[0], shape[1]) if ckpt.layout(name) == "out_in" else (shape[1], shape[0])
        u, _ = torch.linalg.qr(torch.randn(out, len(singular), generator=gen))
        v, _ = torch.linalg.qr(torch.randn(inp, len(singular), generator=gen))
        delta.add(name, DeltaEntry.lowrank(u * torch.tensor(singular), v, ckpt.layout(name)), ckpt)
    delta.save(path)
    return path


@pytest.fixture(scope="module")
def llama_delta(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_delta(llama_dir, "llama", tmp_path_factory.mktemp("delta") / "llama.safetensors")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_json_output_and_written_delta(request: pytest.FixtureRequest, tmp_path: Path, family: str) -> None:
    base = request.getfixturevalue(f"{family}_dir")
    delta_path = make_delta(base, family, tmp_path / "d.safetensors")
    out = tmp_path / "p.safetensors"
    result = run(base, delta_path, "--fn", "linear", "--beta", "3", "-o", out, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["delta"] == str(delta_path) and summary["output"] == str(out) and summary["fn"] == "linear"
    assert summary["beta"] == 3.0 and summary["alpha"] == 1.2 and summary["clamp"] is False
    assert [t["name"] for t in summary["tensors"]] == list(EDITS[family])
    for t in summary["tensors"]:
        assert FIELDS <= set(t) and t["warning"] is None  # linear F never enlarges
        assert t["n_restrained"] == sum(s > t["sigma_max_base"] for s in EDITS[family][t["name"]]) >= 1
        assert t["kappa_pruned"] < t["kappa_edited"] and t["top_after"][0] < t["top_before"][0]
        smax = t["sigma_max_base"]
        assert t["top_after"][0] == pytest.approx(t["top_before"][0] / 3 + 2 / 3 * smax, rel=1e-5)
    pruned, original = Delta.load(out), Delta.load(delta_path)
    pruned.check_base(Checkpoint(base))
    assert pruned.restraints[-1]["fn"] == "linear" and pruned.history[:-1] == original.history
    assert {n: e.layout for n, e in pruned.entries.items()} == {n: e.layout for n, e in original.entries.items()}
    assert all(pruned.entries[n].rank <= original.entries[n].rank for n in original.entries)


def test_human_output_and_log_warning(llama_dir: Path, llama_delta: Path, tmp_path: Path) -> None:
    out = tmp_path / "p.safetensors"
    result = run(llama_dir, llama_delta, "-o", out)  # log, alpha 1.2: sigma_max ~ 3, 3 ln 1.2 < 1
    assert result.exit_code == 0, result.output
    assert "model.layers.1.mlp.down_proj.weight" in result.stdout and "kappa" in result.stdout
    assert "wrote" in result.stderr and "wrote" not in result.stdout
    assert "log F enlarges" in result.stderr and "enlarges" not in result.stdout
    assert out.exists()


def test_warning_and_clamp_in_json(llama_dir: Path, llama_delta: Path, tmp_path: Path) -> None:
    result = run(llama_dir, llama_delta, "-o", tmp_path / "a.safetensors", "--json", "--no-kappa")
    assert result.exit_code == 0, result.output
    tensors = json.loads(result.stdout)["tensors"]
    assert all("log F enlarges" in t["warning"] for t in tensors)
    assert all(t["kappa_base"] is None and t["kappa_pruned"] is None for t in tensors)
    result = run(llama_dir, llama_delta, "-o", tmp_path / "b.safetensors", "--json", "--clamp")
    summary = json.loads(result.stdout)
    assert result.exit_code == 0 and summary["clamp"] is True
    assert [t["n_enlarged"] for t in summary["tensors"]] == [1, 0]  # F(8) > 8 for sigma_max 3.2; F(20) < 20
    for t in summary["tensors"]:
        assert ("clamped" in t["warning"]) == (t["n_enlarged"] > 0)
        assert all(a <= b * (1 + 1e-6) for a, b in zip(t["top_after"], t["top_before"]))
    result = run(llama_dir, llama_delta, "-o", tmp_path / "c.safetensors", "--json", "--alpha", str(math.e))
    assert all(t["warning"] is None for t in json.loads(result.stdout)["tensors"])  # 3 * ln e >= 1


@pytest.mark.parametrize("option,value,word", [("--alpha", "1", "alpha"), ("--alpha", "0.5", "alpha"),
                                               ("--beta", "1", "beta"), ("--alpha", "nan", "alpha")])
def test_bad_parameters(llama_dir: Path, llama_delta: Path, tmp_path: Path, option: str, value: str,
                        word: str) -> None:
    """Values out of range are usage errors (exit 2, Typer's usage message naming the option), nothing written."""
    out = tmp_path / "p.safetensors"
    result = run(llama_dir, llama_delta, "-o", out, option, value)
    assert result.exit_code == 2 and f"--{word} must be" in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_existing_output_needs_force(llama_dir: Path, llama_delta: Path, tmp_path: Path) -> None:
    out = tmp_path / "p.safetensors"
    out.write_bytes(b"old")
    assert_clean_failure(run(llama_dir, llama_delta, "-o", out), "already exists")
    assert out.read_bytes() == b"old"
    assert run(llama_dir, llama_delta, "-o", out, "--force").exit_code == 0
    assert Delta.load(out).restraints


def test_delta_for_another_base(llama_dir: Path, llama_delta: Path, tmp_path: Path) -> None:
    ckpt = Checkpoint(llama_dir)
    name = next(iter(EDITS["llama"]))
    other = tmp_path / "other"
    ckpt.write_updated(other, {name: ckpt.get(name) * 1.5})
    out = tmp_path / "p.safetensors"
    assert_clean_failure(run(other, llama_delta, "-o", out), "another base", absent=out)
    assert_clean_failure(run(other, llama_delta, "-o", out, "--force"), "another base", absent=out)
    result = run(other, llama_delta, "-o", out, "--ignore-base-mismatch", "--json")
    assert result.exit_code == 0, result.output
    assert "warning:" in result.stderr and name in result.stderr
    smax = json.loads(result.stdout)["tensors"][0]["sigma_max_base"]
    assert smax == pytest.approx(float(torch.linalg.svdvals(ckpt.get(name).double() * 1.5)[0]), rel=1e-9)


def test_nan_delta_file(llama_dir: Path, llama_delta: Path, tmp_path: Path) -> None:
    with safe_open(str(llama_delta), framework="pt") as fh:
        meta = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    key = sorted(tensors)[0]
    tensors[key][0, 0] = float("nan")
    bad = tmp_path / "nan.safetensors"
    save_file(tensors, str(bad), metadata={"format": "pt", META_KEY: meta[META_KEY]})
    out = tmp_path / "p.safetensors"
    assert_clean_failure(run(llama_dir, bad, "-o", out), "NaN", absent=out)


def test_missing_inputs_and_usage_errors(llama_dir: Path, llama_delta: Path, tmp_path: Path) -> None:
    out = tmp_path / "p.safetensors"
    assert_clean_failure(run(llama_dir, tmp_path / "nope.safetensors", "-o", out), "does not exist",
                         absent=out)
    assert run(llama_dir, llama_delta, "-o", out, "--fn", "sqrt").exit_code == 2
    assert run(llama_delta, "-o", out).exit_code == 2  # --base is required
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_device(llama_dir: Path, llama_delta: Path, tmp_path: Path) -> None:
    out = tmp_path / "p.safetensors"
    assert_clean_failure(run(llama_dir, llama_delta, "-o", out, "--device", "cuda"), "CUDA", absent=out)


def test_help_has_an_example() -> None:
    result = runner.invoke(app, ["prune", "--help"])
    assert result.exit_code == 0 and "Example:" in result.stdout and "--alpha" in result.stdout
