"""SPHERE while editing (`edit --sphere`): every update an editor makes is projected before it is added, recorded in
the history, and refused with one clear line when its settings are out of range."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from editing_helpers import RECORDS, TINY_SETS, write_requests
from typer.testing import CliRunner

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


def _spared_share(entry, stored: torch.Tensor) -> float:
    """The largest entry of the update along the principal directions of `stored` (eta 0.5), relative to the update's
    largest entry."""
    u = principal_directions(stored, 0.5)
    update = entry.stored_update(torch.float64)
    return float((update @ u).abs().max()) / float(update.abs().max())


def test_rome_and_memit_updates_are_projected_before_they_are_added(tmp_path: Path, llama_dir: Path,
                                                                     gpt2_dir: Path) -> None:
    """The key/value editors pass each update through the projection (SPHERE's alpha 1: nothing left along the
    spared directions of the weight at the time): ROME's rank-one update on LLaMA's nn.Linear, and MEMIT's per-layer
    updates of one batch on GPT-2's Conv1D, each against the unedited weight its layer had."""
    tiny = [a for s in TINY_SETS for a in ("--set", s)]
    one = write_requests(tmp_path / "one.jsonl", FACTS[:1])
    _edit(llama_dir, one, tmp_path / "rome.safetensors", "--method", "rome", *tiny, "--sphere", "--sphere-alpha", 1)
    rome = Delta.load(tmp_path / "rome.safetensors")
    assert rome.history[0]["sphere"]["alpha"] == 1.0
    (name, entry), = rome.entries.items()
    assert _spared_share(entry, Checkpoint(llama_dir).get(name)) < 1e-5

    text = tmp_path / "corpus.txt"
    text.write_text(" ".join(["The Eiffel Tower is in Paris. Michael Jordan plays basketball."] * 20))
    stats = tmp_path / "s.safetensors"
    result = runner.invoke(app, ["stats", str(gpt2_dir), "--layers", "0,1", "--text", str(text), "-o", str(stats)])
    assert result.exit_code == 0, result.output
    requests = write_requests(tmp_path / "r.jsonl", FACTS)
    _edit(gpt2_dir, requests, tmp_path / "memit.safetensors", "--method", "memit", "--stats", stats,
          "--batch-size", len(FACTS), *tiny, "--set", "layers=[0,1]", "--set", "mom2_update_weight=1",
          "--sphere", "--sphere-alpha", 1)
    memit = Delta.load(tmp_path / "memit.safetensors")
    base = Checkpoint(gpt2_dir)
    assert len(memit.entries) == 2
    for name, entry in memit.entries.items():
        assert _spared_share(entry, base.get(name)) < 1e-5, name
