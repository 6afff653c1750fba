"""The disk cache of zsRE's locality reference: what it stores and how it is keyed, and that an evaluation reads the
reference from it instead of running the reference model again, with the same metrics."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from helpers import random_delta
from test_evaluate_cli import ZSRE  # the same two zsRE records
from typer.testing import CliRunner

import prunecli.evaluation.runner as runner_module
from prunecli.cli import app
from prunecli.errors import PruneCliWarning
from prunecli.evaluation.reference_cache import ReferenceCache, reference_key
from prunecli.models.scoring import TargetScore

runner = CliRunner()
SETTINGS = {"dtype": "fp32", "device": "cpu", "batch_size": 16}


def test_scores_round_trip_and_stores_merge(tmp_path: Path) -> None:
    first = {("p", "a"): TargetScore([-0.5, float("nan")], [True, False], [7, 3])}
    second = {("q", "b"): TargetScore([-1.25], [False], [11])}
    ReferenceCache("k", tmp_path).store(first)
    ReferenceCache("k", tmp_path).store(second)
    got = ReferenceCache("k", tmp_path).lookup([("p", "a"), ("q", "b"), ("r", "c")])
    assert set(got) == {("p", "a"), ("q", "b")} and got[("q", "b")] == second[("q", "b")]
    restored = got[("p", "a")]
    assert restored.token_logprobs[0] == -0.5 and math.isnan(restored.token_logprobs[1])
    assert (restored.token_correct, restored.token_argmax) == ([True, False], [7, 3])
    assert not restored.finite  # a NaN reference stays NaN, counted as such by the metrics
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_an_unreadable_cache_file_is_set_aside_with_a_warning(tmp_path: Path) -> None:
    cache = ReferenceCache("k", tmp_path)
    cache.path.write_text("{not json")
    with pytest.warns(PruneCliWarning, match="ignoring the unreadable locality reference cache"):
        assert cache.lookup([("p", "a")]) == {}
    with pytest.warns(PruneCliWarning):
        cache.store({("p", "a"): TargetScore([-1.0], [True], [2])})
    assert cache.lookup([("p", "a")]) == {("p", "a"): TargetScore([-1.0], [True], [2])}


def test_the_key_follows_the_weights_the_tokenizer_and_the_settings(llama_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(llama_dir, copy)
    key = reference_key(llama_dir, None, SETTINGS)
    assert reference_key(copy, None, SETTINGS) == key  # the content counts, not where it lives
    assert reference_key(copy, None, {**SETTINGS, "dtype": "bf16"}) != key
    assert reference_key(copy, llama_dir / "tokenizer.json", SETTINGS) != key
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of the last weight
    weights.write_bytes(bytes(data))
    assert reference_key(copy, None, SETTINGS) != key


def _evaluate(*args: str) -> dict:
    result = runner.invoke(app, ["evaluate", *args, "--json"])
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return json.loads(result.stdout)


def test_evaluations_of_one_base_share_the_cached_reference(llama_dir: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRUNECLI_CACHE", str(tmp_path / "cache"))
    requests = tmp_path / "zsre.jsonl"
    requests.write_text("\n".join(json.dumps(r) for r in ZSRE) + "\n")
    one = random_delta(llama_dir, "model.layers.1.mlp.down_proj.weight", tmp_path / "one.safetensors", 7)
    two = random_delta(llama_dir, "model.layers.0.mlp.down_proj.weight", tmp_path / "two.safetensors", 8)
    first = _evaluate(str(llama_dir), "-e", str(requests), "-d", str(one))
    (cache_file,) = (tmp_path / "cache" / "locality-reference").glob("*.json")
    assert len(json.loads(cache_file.read_text())["scores"]) == len(ZSRE)

    def no_scoring(*args: object, **kwargs: object) -> None:
        raise AssertionError("the reference was scored again")

    with monkeypatch.context() as patched:
        patched.setattr(runner_module, "score_pairs", no_scoring)
        again = _evaluate(str(llama_dir), "-e", str(requests), "-d", str(one))
        other = _evaluate(str(llama_dir), "-e", str(requests), "-d", str(two))  # another checkpoint, same base
    assert again["metrics"] == first["metrics"]
    assert other["locality_reference"] == f"{llama_dir} without deltas"
    # the cached scores are what the agreement is measured against: disagreeing ones move the metric
    doc = json.loads(cache_file.read_text())
    for row in doc["scores"]:
        row[4] = [-1 for _ in row[4]]
    cache_file.write_text(json.dumps(doc))
    assert _evaluate(str(llama_dir), "-e", str(requests), "-d", str(one))["metrics"]["zsre_locality_agreement"] == 0.0


def test_a_cached_locality_reference_model_is_not_loaded(llama_dir: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRUNECLI_CACHE", str(tmp_path / "cache"))
    requests = tmp_path / "zsre.jsonl"
    requests.write_text("\n".join(json.dumps(r) for r in ZSRE) + "\n")
    delta = random_delta(llama_dir, "model.layers.1.mlp.down_proj.weight", tmp_path / "d.safetensors", 7)
    applied = tmp_path / "applied"
    assert runner.invoke(app, ["apply", str(llama_dir), str(delta), "-o", str(applied)]).exit_code == 0
    args = (str(applied), "-e", str(requests), "--locality-reference", str(llama_dir))
    first = _evaluate(*args)
    loaded: list[str] = []
    real_load = runner_module._load
    monkeypatch.setattr(runner_module, "_load", lambda ref, *rest: loaded.append(ref) or real_load(ref, *rest))
    assert _evaluate(*args)["metrics"] == first["metrics"]
    assert loaded == [str(applied)]  # the evaluated model only
