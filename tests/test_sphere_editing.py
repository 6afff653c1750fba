"""SPHERE while editing (`edit --sphere`): every update an editor makes is projected before it is added, recorded in
the history, and refused with one clear line when its settings are out of range."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from editing_helpers import RECORDS, write_requests
from prunecli.cli import app
from prunecli.core.checkpoint import Checkpoint
from prunecli.core.delta import Delta
from prunecli.core.sphere import principal_directions, project_update

runner = CliRunner()
# CounterFact-style: an edit takes when P(new) > P(true), and a tiny model gives "Paris" ~1e-3 after these prompts.
FACTS = [{**r, "ground_truth": "Paris"} for r in RECORDS]
ULTRA = ["--method", "ultraedit", "--batch-size", "4", "--set", "lr=1e-2", "--set", "layers=[1,2]"]


def _edit(model: Path, requests: Path, out: Path, *extra: object) -> dict:
    result = runner.invoke(app, ["edit", str(model), "--requests", str(requests), *map(str, extra), "-o", str(out),
                                 "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.parametrize("fixture", ["llama_dir", "gpt2_dir"])
@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_one_step_equals_the_projection_of_the_unprojected_update(tmp_path: Path, request: pytest.FixtureRequest,
                                                                  fixture: str, alpha: float) -> None:
    """UltraEdit computes every shift of a step before adding any, so a one-step run with SPHERE (basis: the weight
    at the time, here the base) gives exactly the projection of the plain run's update: on the input side of an
    nn.Linear, the output side of GPT-2's Conv1D (stored layout, as the official code)."""
    model = request.getfixturevalue(fixture)
    requests = write_requests(tmp_path / "r.jsonl", FACTS)
    plain = Delta.load(_edit_path(model, requests, tmp_path / "plain.safetensors"))
    summary = _edit(model, requests, tmp_path / "sphere.safetensors", *ULTRA, "--sphere", "--sphere-alpha", alpha)
    sphere = Delta.load(tmp_path / "sphere.safetensors")
    assert summary["hparams"]["method"] == "ultraedit"
    assert sphere.history[0]["sphere"] == {"eta": 0.5, "alpha": alpha, "basis": "current"}
    base = Checkpoint(model)
    assert set(sphere.entries) == set(plain.entries) and sphere.entries
    for name, entry in plain.entries.items():
        stored = base.get(name)
        u = principal_directions(stored, 0.5)
        a, b = project_update(entry.a, entry.b, entry.layout, u, alpha)
        got = sphere.entries[name]
        assert torch.allclose(got.a @ got.b.T, a @ b.T, atol=1e-5), name
        if alpha == 1.0:  # nothing left along the spared directions, in the stored layout
            along = got.stored_update(torch.float64) @ u
            assert float(along.abs().max()) < 1e-5 * float(got.stored_update(torch.float64).abs().max()), name


def _edit_path(model: Path, requests: Path, out: Path) -> Path:
    _edit(model, requests, out, *ULTRA)
    return out


def test_pretrained_basis_and_defaults_per_method(tmp_path: Path, llama_dir: Path) -> None:
    requests = write_requests(tmp_path / "r.jsonl", FACTS)
    _edit(llama_dir, requests, tmp_path / "u.safetensors", *ULTRA, "--sphere", "--sphere-basis", "pretrained")
    op = Delta.load(tmp_path / "u.safetensors").history[0]
    assert op["sphere"] == {"eta": 0.5, "alpha": 0.8, "basis": "pretrained"}  # MEMIT's and the others' alpha


@pytest.mark.parametrize("args, words", [(["--sphere-alpha", "0.5"], "--sphere"),
                                         (["--sphere", "--sphere-eta", "1"], "--sphere-eta"),
                                         (["--sphere", "--sphere-alpha", "2"], "--sphere-alpha"),
                                         (["--sphere", "--sphere-basis", "initial"], "--sphere-basis")])
def test_bad_settings_are_usage_errors_before_any_work(tmp_path: Path, llama_dir: Path, args: list[str],
                                                       words: str) -> None:
    requests = write_requests(tmp_path / "r.jsonl", FACTS)
    out = tmp_path / "d.safetensors"
    result = runner.invoke(app, ["edit", str(llama_dir), "--requests", str(requests), *ULTRA,
                                 *args, "-o", str(out)])
    assert result.exit_code == 2 and words in result.output and not out.exists()
