"""Evaluation speed work must not move a metric: CounterFact, zsRE and perplexity on SmolLM2 against values recorded
with the code before it (main at cba0a8c, `tests/data/eval_recorded_smollm2.json`).

The recording command (run from tests/, with the older prunecli first on the path):
    PYTHONPATH=<old checkout> python -c "import json, test_eval_recorded as t; print(json.dumps(t.measure(DATA)))"
with DATA the shared data folder (the file says which versions recorded it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

RECORDED = Path(__file__).parent / "data" / "eval_recorded_smollm2.json"


def measure(data: str | Path) -> dict[str, Any]:
    """Every metric of CounterFact records 0-23, zsRE records 0-11 (locality against the model itself) and the
    perplexity of WikiText's first 512 tokens, on the built-in SmolLM2 on the CPU, batch size 16."""
    import torch

    from prunecli.evaluation.counterfact import evaluate_counterfact
    from prunecli.evaluation.perplexity import evaluate_perplexity
    from prunecli.evaluation.zsre import evaluate_zsre, reference_scores
    from prunecli.models.loading import load_model
    from prunecli.requests import load_requests

    torch.set_num_threads(1)
    data = Path(data)
    model, tok, _ = load_model("smollm2", device="cpu")
    cf = load_requests(data / "counterfact" / "counterfact-edit.json", 0, 24)
    zs = load_requests(data / "zsre" / "zsre_mend_train-1k.json", 0, 12)
    groups = [*evaluate_counterfact(model, tok, cf), *evaluate_zsre(model, tok, zs, reference_scores(model, tok, zs),
                                                                     "itself"),
              *evaluate_perplexity(model, tok, data / "wikitext" / "wiki.test.raw", max_tokens=512).groups]
    return {name: [value.value, value.n] for g in groups for name, value in g.metrics.items()}


@pytest.mark.slow
def test_metrics_equal_the_recorded_ones(shared_data: Path) -> None:
    recorded = json.loads(RECORDED.read_text())["metrics"]
    now = measure(shared_data)
    assert set(now) == set(recorded)
    for name, (value, n) in recorded.items():
        assert now[name][1] == n, name
        assert now[name][0] == pytest.approx(value, rel=1e-6, abs=1e-6), name
