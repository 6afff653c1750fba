"""Acceptance on the real SmolLM2-135M (CPU): 10 sequential ROME edits and one MEMIT / AlphaEdit batch of CounterFact
records 0-9 reach efficacy >= 0.9 with the packaged default hyper-parameters (ROME protocol: P(target_new) >
P(ground_truth) by mean token NLL on the edit prompt, evaluated on the final model after all edits)."""

from __future__ import annotations

import json
import os

import pytest
from typer.testing import CliRunner

from prunecli.cli import app
from prunecli.core.delta import Delta
from prunecli.core.delta_files import load_deltas
from prunecli.models.loading import add_delta_to_model, load_model
from prunecli.models.scoring import score_targets
from prunecli.requests import load_requests

pytestmark = pytest.mark.slow
runner = CliRunner()


@pytest.fixture(scope="module")
def smollm2():
    from prunecli.models.builtin import ensure_default_model

    return ensure_default_model()


@pytest.fixture(scope="module")
def counterfact(shared_data):
    return shared_data / "counterfact" / "counterfact-edit.json"


@pytest.fixture(scope="module")
def stats(smollm2, shared_data, tmp_path_factory):
    """Key statistics of the default ROME and MEMIT layers (AlphaEdit's are MEMIT's) from a 20k-token WikiText slice,
    in one pass, computed once for all test processes (`-n`: the tests of this module may run in two of them)."""
    from filelock import FileLock

    from prunecli.editors.registry import default_values

    layers = sorted(set(default_values("rome", "llama", 30)["layers"]) | set(default_values("memit", "llama", 30)
                                                                             ["layers"]))
    session = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:  # a worker's folder sits in the session's, which the workers share
        session = session.parent
    out = session / "smollm2.stats.safetensors"
    with FileLock(f"{out}.lock"):
        if not out.exists():
            result = runner.invoke(app, ["stats", str(smollm2), "--layers", ",".join(map(str, layers)), "--text",
                                         str(shared_data / "wikitext" / "wiki.test.raw"), "--tokens", "20000", "-o",
                                         str(out)])
            assert result.exit_code == 0, result.output
    return out


def _efficacy(model_dir, delta_path, counterfact) -> float:
    requests = load_requests(counterfact, 0, 10)
    model, tok, _ = load_model(model_dir)
    add_delta_to_model(model, load_deltas([delta_path]))
    texts = [r.text for r in requests]
    new = score_targets(model, tok, texts, [r.target_new for r in requests])
    true = score_targets(model, tok, texts, [r.target_true for r in requests])
    return sum(n.nll < t.nll for n, t in zip(new, true)) / len(requests)


@pytest.mark.parametrize("method, extra", [("rome", []), ("memit", ["--batch-size", "10"]),
                                           ("alphaedit", ["--batch-size", "10"])])
def test_ten_counterfact_edits_reach_efficacy(method, extra, smollm2, counterfact, stats, tmp_path):
    out = tmp_path / f"{method}.delta.safetensors"
    result = runner.invoke(app, ["edit", str(smollm2), "--requests", str(counterfact), "--limit", "10", "--method",
                                 method, "--stats", str(stats), *extra, "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["edits"] == 10 and len(Delta.load(out).requests) == 10
    assert _efficacy(smollm2, out, counterfact) >= 0.9
