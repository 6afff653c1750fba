"""Honest scores through the CLI: the generation protocol's report fields, an interval on every rate, and paired
comparisons of real report files written by `evaluate` on a tiny model (refused for different records; version 1
reports compared side by side as before)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import COUNTERFACT, random_delta
from tiny_models import CORPUS
from typer.testing import CliRunner

from prunecli.cli import app
from prunecli.evaluation.uncertainty import mcnemar, wilson
from prunecli.models.generation import greedy_generate
from prunecli.models.loading import load_model
from prunecli.models.recall import answer_budgets, recalled
from prunecli.requests import load_requests

runner = CliRunner()
TASKS = "counterfact,counterfact-gen,perplexity"


def _evaluate(*args: str) -> dict:
    result = runner.invoke(app, ["evaluate", *args, "--json"])
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def reports(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """base and edited (a random delta) over the same records; `shifted` over records 1-2; `renamed` over records
    with the same ids but another target."""
    root = tmp_path_factory.mktemp("paired")
    cf, text = root / "cf.json", root / "text.txt"
    cf.write_text(json.dumps(COUNTERFACT))
    text.write_text(" ".join(CORPUS))
    (root / "renamed-cf.json").write_text(json.dumps([dict(COUNTERFACT[0], target_new="German"), *COUNTERFACT[1:]]))
    delta = random_delta(llama_dir, "model.layers.1.mlp.down_proj.weight", root / "d.safetensors", 7, scale=3.0)
    common = ["-t", TASKS, "--text", str(text), "--window", "32"]
    out = {name: root / f"{name}.json" for name in ("base", "edited", "shifted", "renamed")}
    _evaluate(str(llama_dir), "-r", str(cf), *common, "-o", str(out["base"]))
    _evaluate(str(llama_dir), "-r", str(cf), "-d", str(delta), *common, "-o", str(out["edited"]))
    _evaluate(str(llama_dir), "-r", str(cf), "--start", "1", *common, "-o", str(out["shifted"]))
    _evaluate(str(llama_dir), "-r", str(root / "renamed-cf.json"), *common, "-o", str(out["renamed"]))
    return {**out, "cf": cf}


def _compare(*paths: Path) -> tuple[dict, str]:
    result = runner.invoke(app, ["compare", *map(str, paths), "--json"])
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout), " ".join(result.stderr.split())


def test_generation_protocol_report(llama_dir: Path, reports: dict[str, Path]) -> None:
    report = json.loads(reports["base"].read_text())
    assert report["version"] == 2
    gen = {"efficacy_gen", "paraphrase_gen", "neighborhood_gen"}
    assert gen <= report["metrics"].keys() and {report["metric_group"][m] for m in gen} == {"counterfact_generation"}
    assert "efficacy_score" in report["metrics"]  # the teacher-forced protocols stay, under their own groups
    # Every continuation is the library's greedy decoding within the answer's budget, and its verdict the rule's.
    model, tok, _ = load_model(llama_dir)
    requests = load_requests(reports["cf"])
    written = report["generations"]["counterfact_generation"]
    assert [case["case_id"] for case in written] == [0, 1, 2] == report["records"]["counterfact_generation"]["ids"]
    for case, req in zip(written, requests):
        (prompt, text), = case["efficacy"]
        budget = answer_budgets(tok, [(req.text, req.target_new)])[req.text]
        assert prompt == req.text and text == greedy_generate(model, tok, [prompt], budget)[0].text
    assert report["outcomes"]["efficacy_gen"]["values"] == [
        float(recalled(case["efficacy"][0][1], req.target_new)) for case, req in zip(written, requests)]


def test_every_rate_has_an_interval(reports: dict[str, Path]) -> None:
    report = json.loads(reports["edited"].read_text())
    assert set(report["interval"]) == set(report["metrics"]) == set(report["outcomes"])
    assert report["interval_settings"] == {"level": 0.95, "bootstrap_resamples": 2000, "bootstrap_seed": 0}
    values = report["outcomes"]["neighborhood_score"]["values"]
    assert report["interval_method"]["neighborhood_score"] == "wilson"
    assert report["interval"]["neighborhood_score"] == pytest.approx(list(wilson(sum(values), len(values))))
    assert report["interval_method"]["perplexity"] == "bootstrap"
    lo, hi = report["interval"]["perplexity"]
    assert lo < report["metrics"]["perplexity"] < hi
    table = runner.invoke(app, ["evaluate", "--compare", str(reports["edited"])])
    assert table.exit_code == 0 and "[0." in table.stdout


def test_paired_comparison_of_the_same_records(reports: dict[str, Path]) -> None:
    cmp, stderr = _compare(reports["base"], reports["edited"])
    assert cmp["unpaired"] == [] and "different records" not in stderr
    paired = {p["metric"]: p for p in cmp["paired"]}
    assert set(paired) == set(cmp["metrics"])
    base, edited = (json.loads(reports[k].read_text()) for k in ("base", "edited"))
    for name, p in paired.items():
        # n counts the paired records (perplexity: its windows).
        assert p["report"] == "edited" and p["n"] == len(base["records"][base["metric_group"][name]]["ids"])
        assert p["difference"] == pytest.approx(edited["metrics"][name] - base["metrics"][name], abs=1e-9), name
    # McNemar from the per-record outcomes in the files, counted here by hand.
    a, b = (r["outcomes"]["neighborhood_score"]["values"] for r in (base, edited))
    discordant = [sum(x == 1 and y == 0 for x, y in zip(a, b)), sum(x == 0 and y == 1 for x, y in zip(a, b))]
    assert discordant[1] > 0 and paired["neighborhood_score"]["discordant"] == discordant
    assert paired["neighborhood_score"]["test"] == "mcnemar-exact"
    assert paired["neighborhood_score"]["p"] == pytest.approx(mcnemar(*discordant)[0])
    assert paired["neighborhood_score"]["within_noise"]  # three records cannot show a difference
    assert paired["perplexity"]["test"] == "paired-bootstrap" and paired["perplexity"]["interval"] is not None
    table = runner.invoke(app, ["compare", str(reports["base"]), str(reports["edited"])], env={"COLUMNS": "200"})
    assert table.exit_code == 0 and "paired differences against base" in table.stdout
    assert "McNemar exact" in table.stdout and "within noise" in table.stdout


@pytest.mark.parametrize("other, groups", [
    ("shifted", "counterfact_rome, counterfact_argmax, counterfact_generation"),  # other case ids
    ("renamed", "counterfact_rome, counterfact_argmax, counterfact_generation"),  # same ids, another record
])
def test_different_records_are_refused_in_one_line(reports: dict[str, Path], other: str, groups: str) -> None:
    cmp, stderr = _compare(reports["base"], reports[other])
    line = f"no paired test of {other} against base: they scored different records ({groups}); side by side only"
    assert cmp["unpaired"] == [line] and line in stderr
    assert {p["metric"] for p in cmp["paired"]} == {"perplexity"}  # the same text is still paired
    assert cmp["metrics"]["efficacy_score"]["values"][1] is not None  # the side-by-side values stand


def test_version_1_reports_compare_as_before(reports: dict[str, Path], tmp_path: Path) -> None:
    old = json.loads(reports["base"].read_text())
    for key in ("interval", "interval_method", "interval_settings", "records", "outcomes", "generations"):
        del old[key]
    old["version"] = 1
    (tmp_path / "old.json").write_text(json.dumps(old))
    cmp, stderr = _compare(tmp_path / "old.json", reports["edited"])
    assert cmp["paired"] == [] and cmp["unpaired"] == []
    assert cmp["metrics"]["efficacy_score"]["interval"][0] is None and cmp["metrics"]["efficacy_score"]["interval"][1]
    assert "no per-record outcomes in old" in stderr
    table = runner.invoke(app, ["compare", str(tmp_path / "old.json"), str(reports["edited"])], env={"COLUMNS": "200"})
    assert table.exit_code == 0 and "paired differences" not in table.stdout


def test_malformed_outcomes_are_one_line(reports: dict[str, Path], tmp_path: Path) -> None:
    broken = json.loads(reports["base"].read_text())
    broken["outcomes"]["efficacy_score"] = {"statistic": "median", "values": [1]}
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    result = runner.invoke(app, ["compare", str(tmp_path / "broken.json"), str(reports["edited"])])
    assert result.exit_code == 1 and "malformed intervals, records or per-record outcomes" in result.stderr
