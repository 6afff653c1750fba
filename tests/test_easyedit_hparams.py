"""EasyEdit's own hyper-parameter files load, select their method, and are refused on another architecture."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from tiny_models import build_tiny_model
from typer.testing import CliRunner

from prunecli.cli import app
from prunecli.editors.hparams import HParams, ModelModules
from prunecli.editors.registry import check_file, file_method, resolve_hparams
from prunecli.errors import PruneCliError

FILES = sorted((Path(__file__).parent / "data" / "easyedit").glob("*.yaml"))
LLAMA_LIKE = ("llama", "mistral", "qwen")


def _modules(family: str, num_layers: int) -> ModelModules:
    """A tiny model's module names, standing in for a real model of `num_layers` layers of the same family."""
    from prunecli.models.adapters import resolve_adapter

    model = build_tiny_model(family)
    adapter = resolve_adapter(model)
    return ModelModules(frozenset(n for n, _ in model.named_modules()), adapter.module_name, num_layers,
                        adapter.model_type)


def test_the_files_are_here() -> None:
    assert len(FILES) >= 12


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_every_file_loads_and_selects_its_method(path: Path) -> None:
    expected = {"ROME": "rome", "R-ROME": "rome", "MEMIT": "memit", "AlphaEdit": "alphaedit"}[path.stem.split("_")[0]]
    assert file_method(path) == expected
    check_file(expected, path)  # bookkeeping keys (fp16, device, model_name, stats_dir, ...) are accepted
    user = yaml.safe_load(path.read_text())
    family = "gpt2" if "gpt2" in path.stem else ("llama" if any(k in path.stem for k in LLAMA_LIKE) else None)
    if family is not None:
        HParams.check_modules(user, str(path), _modules(family, int(user["v_loss_layer"]) + 1))
    hp = resolve_hparams(expected, family or "gptj", int(user["v_loss_layer"]) + 1, path)
    assert list(hp.layers) == list(user["layers"]) and hp.v_lr == float(user["v_lr"])
    assert hp.v_num_grad_steps == int(user["v_num_grad_steps"])


def test_a_gpt2_file_on_a_llama_model_says_so() -> None:
    path = next(p for p in FILES if p.stem == "ROME_gpt2-xl")
    user = yaml.safe_load(path.read_text())
    with pytest.raises(PruneCliError, match="is for another architecture than this llama model: its "
                                            "rewrite_module_tmp 'transformer.h.{}.mlp.c_proj' names no module"):
        HParams.check_modules(user, str(path), _modules("llama", 48))


def test_a_file_for_another_depth_says_so() -> None:
    path = next(p for p in FILES if p.stem == "ROME_llama-7b")
    with pytest.raises(PruneCliError, match="is for a model of 32 layers .*this llama model has 30"):
        HParams.check_modules(yaml.safe_load(path.read_text()), str(path), _modules("llama", 30))


def test_method_mismatch_and_unimplemented_key_handling(tmp_path: Path) -> None:
    memit = next(p for p in FILES if p.stem == "MEMIT_llama-7b")
    with pytest.raises(PruneCliError, match="holds MEMIT hyper-parameters, but the method is rome"):
        check_file("rome", memit)
    original = tmp_path / "original.yaml"
    original.write_text("alg_name: R-ROME\noriginal_implementation: true\n")
    with pytest.raises(PruneCliError, match="original_implementation: True .* does not implement"):
        check_file("rome", original)
    unknown = tmp_path / "u.yaml"
    unknown.write_text(json.dumps({"alg_name": "FT"}))
    with pytest.raises(PruneCliError, match="holds FT hyper-parameters"):
        file_method(unknown)


def test_edit_takes_the_method_from_alg_name_before_loading_the_model(llama_dir: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import prunecli.api.edit as edit_job

    monkeypatch.setattr(edit_job, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    requests = tmp_path / "r.jsonl"
    requests.write_text(json.dumps({"prompt": "{} is in", "subject": "Paris", "target_new": "Rome"}) + "\n")
    memit = next(p for p in FILES if p.stem == "MEMIT_llama-7b")
    runner = CliRunner()
    result = runner.invoke(app, ["edit", str(llama_dir), "--requests", str(requests), "--hparams", str(memit),
                                 "-o", str(tmp_path / "d.safetensors")])
    assert result.exit_code == 1 and "memit needs key statistics" in result.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("alg_name: ROME\nv_lrr: 0.5\n")
    result = runner.invoke(app, ["edit", str(llama_dir), "--requests", str(requests), "--hparams", str(bad),
                                 "-o", str(tmp_path / "d.safetensors")])
    assert result.exit_code == 1 and "unknown hyper-parameter 'v_lrr'" in result.stderr


def test_edit_refuses_a_file_for_another_architecture(gpt2_dir: Path, tmp_path: Path) -> None:
    requests = tmp_path / "r.jsonl"
    requests.write_text(json.dumps({"prompt": "{} is in", "subject": "Paris", "target_new": "Rome"}) + "\n")
    llama_file = tmp_path / "llama.yaml"
    user = yaml.safe_load(next(p for p in FILES if p.stem == "ROME_llama-7b").read_text())
    user.update(layers=[1], v_loss_layer=3)  # a 4-layer model: only the architecture differs
    llama_file.write_text(yaml.safe_dump(user))
    result = CliRunner().invoke(app, ["edit", str(gpt2_dir), "--requests", str(requests), "--hparams",
                                      str(llama_file), "-o", str(tmp_path / "d.safetensors")])
    assert result.exit_code == 1 and "is for another architecture than this gpt2 model" in result.stderr
    assert not (tmp_path / "d.safetensors").exists()
