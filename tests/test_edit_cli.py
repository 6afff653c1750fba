"""`prunecli edit` end to end: JSON summary, delta contents, chaining with --delta, --prune-every, bad input."""

from __future__ import annotations

import json
import re

import pytest
import torch
from editing_helpers import RECORDS, TINY_SETS, write_requests
from typer.testing import CliRunner

from prunecli.cli import app
from prunecli.core.checkpoint import Checkpoint
from prunecli.core.delta import Delta
from prunecli.core.lowrank import entry_svd
from prunecli.core.restraint import RestraintSettings, restrain_delta

runner = CliRunner()
# Two short context prefixes, so the seeded prefix generation is part of what chaining must reproduce.
SETS = [a for s in [*TINY_SETS, "layers=1", "context_template_length_params=[[3, 2]]"] for a in ("--set", s)]
WEIGHT = "model.layers.1.mlp.down_proj.weight"


def edit(*args):
    result = runner.invoke(app, ["edit", *[str(a) for a in args]])
    return result


def ok(*args) -> dict:
    result = edit(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture()
def requests_file(tmp_path):
    return write_requests(tmp_path / "requests.jsonl")


def test_rome_json_summary_and_delta(tmp_path, llama_dir, requests_file):
    out = tmp_path / "d.safetensors"
    summary = ok(llama_dir, "--requests", requests_file, "--method", "rome", *SETS, "-o", out)
    assert summary["edits"] == 3 and summary["layers"] == [1] and summary["hparams"]["layers"] == [1]
    # One speed figure: the edits' own time (what the progress line divides), the run's total beside it.
    assert summary["seconds_per_edit"] == summary["edit_seconds"] / 3 and summary["seconds"] > summary["edit_seconds"]
    for rep, rec in zip(summary["requests"], RECORDS):
        assert rep["target_new"] == rec["target_new"] and rep["prob_after"] > rep["prob_before"]
        assert rep["loss"] < rep["initial_loss"] and rep["seconds"] > 0
    delta = Delta.load(out)
    entry = delta.entries[WEIGHT]
    assert entry.rank == 3 and entry.layout == "out_in"  # one rank-1 factor per edit
    assert [r["target_new"] for r in delta.requests] == [r["target_new"] for r in RECORDS]
    assert delta.history[0]["method"] == "rome" and delta.history[0]["hparams"]["v_num_grad_steps"] == 60
    assert delta.fingerprints[WEIGHT] == Checkpoint(llama_dir).fingerprint(WEIGHT)


def test_bf16_sharded_checkpoint(tmp_path, llama_sharded_bf16_dir, requests_file):
    """The model runs in bf16, the edit is computed in fp32 and tied to the bf16 base tensors' fingerprints."""
    out = tmp_path / "d.safetensors"
    summary = ok(llama_sharded_bf16_dir, "--requests", requests_file, "--limit", 1, "--dtype", "bf16", *SETS,
                 "-o", out)
    assert summary["requests"][0]["prob_after"] > summary["requests"][0]["prob_before"]
    delta = Delta.load(out)
    assert delta.entries[WEIGHT].a.dtype == torch.float32
    delta.check_base(Checkpoint(llama_sharded_bf16_dir))


def _factors_close(x: Delta, y: Delta) -> None:
    assert set(x.entries) == set(y.entries)
    for name in x.entries:
        torch.testing.assert_close(x.entries[name].a, y.entries[name].a, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(x.entries[name].b, y.entries[name].b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("fixture", ["gpt2_dir", "llama_dir"])
def test_chained_runs_equal_one_run(request, tmp_path, fixture, requests_file):
    model = request.getfixturevalue(fixture)
    common = [model, "--requests", requests_file, "--method", "rome", *SETS]
    ok(*common, "-o", tmp_path / "all.safetensors")
    ok(*common, "--limit", 2, "-o", tmp_path / "a.safetensors")
    ok(*common, "--start", 2, "--delta", tmp_path / "a.safetensors", "-o", tmp_path / "b.safetensors")
    chained, single = Delta.load(tmp_path / "b.safetensors"), Delta.load(tmp_path / "all.safetensors")
    _factors_close(chained, single)
    assert chained.requests == single.requests and len(chained.history) == 2


def test_memit_batches_with_stats(tmp_path, gpt2_dir, requests_file):
    text = tmp_path / "corpus.txt"
    text.write_text(" ".join(["The Eiffel Tower is in Paris. Michael Jordan plays basketball."] * 20))
    stats = tmp_path / "s.safetensors"
    r = runner.invoke(app, ["stats", str(gpt2_dir), "--layers", "0,1", "--text", str(text), "-o", str(stats)])
    assert r.exit_code == 0, r.output
    sets = [a for s in [*TINY_SETS, "layers=[0,1]", "mom2_update_weight=1"] for a in ("--set", s)]
    out = tmp_path / "m.safetensors"
    summary = ok(gpt2_dir, "--requests", requests_file, "--method", "memit", "--stats", stats, "--batch-size", 2,
                 *sets, "-o", out)
    assert summary["edits"] == 3
    delta = Delta.load(out)
    for layer in (0, 1):
        entry = delta.entries[f"transformer.h.{layer}.mlp.c_proj.weight"]
        assert entry.layout == "in_out" and entry.rank == 3  # a batch of 2, then a batch of 1
    assert delta.history[0]["stats"]["path"] == str(stats)


def test_prune_every_restrains_the_accumulated_delta(tmp_path, llama_dir, requests_file):
    """After 2 edits the delta is restrained; the third edit is computed on base + restrained delta."""
    common = [llama_dir, "--requests", requests_file, "--method", "rome", *SETS]
    pruning = ["--prune-every", 2, "--fn", "linear", "--beta", 2]
    summary = ok(*common, *pruning, "-o", tmp_path / "p.safetensors")
    pruned = Delta.load(tmp_path / "p.safetensors")
    assert [op["op"] for op in pruned.history] == ["edit", "prune", "edit"]
    assert [len(op.get("requests", [])) for op in pruned.history] == [2, 0, 1]
    assert len(summary["restraints"]) == 1 and summary["restraints"][0][0]["n_restrained"] > 0

    # Reference: two edits, PRUNE by the library, then the third edit chained on the restrained delta.
    ok(*common, "--limit", 2, "-o", tmp_path / "two.safetensors")
    two = Delta.load(tmp_path / "two.safetensors")
    restrained, _ = restrain_delta(two, Checkpoint(llama_dir), RestraintSettings("linear", beta=2.0), kappa=False)
    restrained.save(tmp_path / "r.safetensors")
    ok(*common, "--start", 2, "--delta", tmp_path / "r.safetensors", "-o", tmp_path / "ref.safetensors")
    reference = Delta.load(tmp_path / "ref.safetensors")
    _factors_close(pruned, reference)
    assert [op["op"] for op in reference.history] == ["edit", "prune", "edit"]
    # The restraint did shrink the large singular values.
    s_two, s_restrained = entry_svd(two.entries[WEIGHT]).s, entry_svd(restrained.entries[WEIGHT]).s
    assert float(s_restrained[0]) < float(s_two[0])


def _bad(tmp_path, *args) -> str:
    out = tmp_path / "out.safetensors"
    result = edit(*args, "-o", out)
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error:") and "Traceback" not in result.output
    assert not out.exists()
    return lines[-1]


def test_bad_requests(tmp_path, llama_dir):
    f = write_requests(tmp_path / "r.jsonl", [RECORDS[0], {"prompt": "Where is it", "subject": "Lyon",
                                                           "target_new": "Paris"}])
    assert "line 2: subject 'Lyon' does not occur" in _bad(tmp_path, llama_dir, "--requests", f)
    f = write_requests(tmp_path / "e.jsonl", [{**RECORDS[0], "target_new": "  "}])
    assert "line 1: target_new is missing or empty" in _bad(tmp_path, llama_dir, "--requests", f)


def test_bad_method_and_missing_stats(tmp_path, llama_dir, requests_file):
    assert "unknown editing method 'pmet'" in _bad(tmp_path, llama_dir, "--requests", requests_file,
                                                    "--method", "pmet")
    for method in ("memit", "alphaedit"):
        assert f"{method} needs key statistics" in _bad(tmp_path, llama_dir, "--requests", requests_file,
                                                        "--method", method)


def test_stats_of_another_model_or_layer(tmp_path, llama_dir, gpt2_dir, qwen2_dir, requests_file):
    text = tmp_path / "corpus.txt"
    text.write_text("The Eiffel Tower is in Paris. " * 20)
    stats = tmp_path / "s.safetensors"
    assert runner.invoke(app, ["stats", str(qwen2_dir), "--layers", "1", "--text", str(text), "-o",
                               str(stats)]).exit_code == 0
    common = ["--requests", requests_file, "--stats", stats, *SETS]
    assert "computed on another model" in _bad(tmp_path, llama_dir, *common)
    assert "not layer 2" in _bad(tmp_path, qwen2_dir, *common, "--set", "layers=2")


def test_delta_for_another_base_and_existing_output(tmp_path, llama_dir, gpt2_dir, qwen2_dir, requests_file):
    prev = tmp_path / "prev.safetensors"
    ok(qwen2_dir, "--requests", requests_file, "--limit", 1, *SETS, "-o", prev)
    assert "made for another base" in _bad(tmp_path, llama_dir, "--requests", requests_file, "--delta", prev, *SETS)
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"keep me")
    result = edit(llama_dir, "--requests", requests_file, *SETS, "-o", out)
    assert result.exit_code == 1 and "already exists" in result.stderr and out.read_bytes() == b"keep me"


def test_what_loads_is_said_and_the_summary_names_its_speed(tmp_path, llama_dir, requests_file):
    """No silence before the work: what loads and how long it took; the summary's s per edit is the edits' time
    (as the progress line's s/item), the time before the first edit named beside it."""
    result = edit(llama_dir, "--requests", requests_file, "--limit", 2, "--method", "rome", *SETS,
                  "-o", tmp_path / "d.safetensors")
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert lines[0] == f"loading {llama_dir}" and re.fullmatch(rf"loaded {re.escape(str(llama_dir))} in \d+\.\d s",
                                                               lines[1])
    assert "generating 2 context prefixes on the base model (seed 0)" in lines
    m = re.search(r"(\d+\.\d) s per edit \((\d+\.\d) s editing after (\d+\.\d) s for context prefixes", lines[-1])
    assert m and lines[-1].startswith(f"wrote {tmp_path / 'd.safetensors'}: 2 new edit(s)"), lines[-1]
    assert abs(float(m[1]) - float(m[2]) / 2) <= 0.1  # both rounded to 0.1 s
