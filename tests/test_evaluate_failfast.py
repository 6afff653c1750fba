"""evaluate fails before loading any model when an input is missing, and keeps what it computed when one task fails."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import COUNTERFACT
from typer.testing import CliRunner

from prunecli.cli import app

runner = CliRunner()


@pytest.fixture
def no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    import prunecli.models.loading as loading

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(loading, "load_model", refuse)


@pytest.mark.parametrize("args, message", [
    (["-t", "perplexity", "--data-dir", "/nonexistent/data"],
     "task perplexity: /nonexistent/data/wikitext/wiki.test.raw does not exist; it is looked up in the data folder "
     "/nonexistent/data"),
    (["-t", "glue:sst2", "--data-dir", "/nonexistent/data"], "set --data-dir or PRUNECLI_DATA_DIR"),
    (["-t", "perplexity", "--text", "/nonexistent/wiki.txt"], "/nonexistent/wiki.txt does not exist; check --text"),
    (["-t", "perplexity=/nonexistent/t.txt"], "check perplexity=/nonexistent/t.txt"),
])
def test_missing_inputs_fail_before_the_model_loads(llama_dir: Path, no_model_load: None, args: list[str],
                                                    message: str) -> None:
    result = runner.invoke(app, ["evaluate", str(llama_dir), *args])
    assert result.exit_code == 1, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_environment_variable_points_to_the_data(llama_dir: Path, no_model_load: None,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRUNECLI_DATA_DIR", "/elsewhere/data")
    result = runner.invoke(app, ["evaluate", str(llama_dir), "-t", "perplexity"])
    assert result.exit_code == 1 and "/elsewhere/data/wikitext/wiki.test.raw does not exist" in result.stderr


def test_one_failing_task_keeps_the_others_results(llama_dir: Path, tmp_path: Path) -> None:
    edits = tmp_path / "cf.json"
    edits.write_text(json.dumps(COUNTERFACT))
    empty = tmp_path / "empty.txt"
    empty.write_text("")  # perplexity fails at run time: fewer than 2 tokens
    out = tmp_path / "report.json"
    result = runner.invoke(app, ["evaluate", str(llama_dir), "-e", str(edits), "-t",
                                 f"counterfact,perplexity={empty}", "-o", str(out)])
    assert result.exit_code == 1
    assert "1 of 2 tasks failed" in result.stderr and "fewer than 2 tokens" in result.stderr
    report = json.loads(out.read_text())
    assert "efficacy_score" in report["metrics"] and "perplexity" not in report["metrics"]
    assert list(report["failed_tasks"]) == ["perplexity"]
