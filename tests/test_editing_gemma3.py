"""The real Gemma-3-270M (post-MLP norm, 262k vocabulary): one MEMIT batch of CounterFact records 0-2 takes.

Before MEMIT mapped its residual targets through `post_feedforward_layernorm` (editors/residual.py), every target's
probability fell (to 1e-6 .. 1e-14 on these records) and the model was destroyed. Kept small: statistics from 4096
WikiText tokens, no context prefixes; the 0-49 acceptance figures are in docs/RESULTS.md."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from prunecli.cli import app
from prunecli.errors import PruneCliError

pytestmark = pytest.mark.slow
runner = CliRunner()


@pytest.fixture(scope="module")
def gemma3():
    from prunecli.models.builtin import ensure_builtin

    try:
        return ensure_builtin("gemma3-270m")
    except PruneCliError as exc:
        pytest.skip(f"gemma3-270m is not available: {exc}")


def test_memit_batch_takes_on_gemma3(gemma3, shared_data, tmp_path):
    stats = tmp_path / "g3.stats.safetensors"
    result = runner.invoke(app, ["stats", str(gemma3), "--method", "memit", "--text",
                                 str(shared_data / "wikitext" / "wiki.test.raw"), "--tokens", "4096", "-o", str(stats)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["edit", str(gemma3), "--requests",
                                 str(shared_data / "counterfact" / "counterfact-edit.json"), "--limit", "3",
                                 "--method", "memit", "--stats", str(stats), "--set",
                                 "context_template_length_params=[]", "--strict", "--json",
                                 "-o", str(tmp_path / "d.safetensors")])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["layers"] == [1, 2, 3, 4, 5] and summary["failed_edits"] == 0
    for rep in summary["requests"]:
        assert rep["new_mean_prob"] > max(rep["true_mean_prob"], 0.1), rep
