"""`prunecli evaluate` through the CLI: the JSON report, deltas in memory == the applied checkpoint, zsRE locality
references, --compare, errors; and (slow) the unedited SmolLM2 CounterFact numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import COUNTERFACT, random_delta
from tiny_models import CORPUS
from typer.testing import CliRunner

from prunecli.cli import app
from prunecli.core.delta import Delta
from prunecli.evaluation.zsre import evaluate_zsre, reference_scores
from prunecli.models.loading import add_delta_to_model, load_model
from prunecli.requests import load_requests

runner = CliRunner()

ZSRE = [
    {"subject": "Apple A5", "src": "Who created Apple A5?", "pred": "Apple", "rephrase": "Apple A5 was made by whom?",
     "alt": "Microsoft", "answers": ["Apple"], "loc": "nq question: where is the space needle", "loc_ans": "Seattle"},
    {"subject": "Toko Yasuda", "src": "What does Toko Yasuda play?", "pred": "guitar",
     "rephrase": "Which instrument is Toko Yasuda known for?", "alt": "piano", "answers": ["guitar"],
     "loc": "nq question: who played for the chicago bulls", "loc_ans": "Michael Jordan"},
]
TARGETS = {"gpt2": "transformer.h.1.mlp.c_proj.weight", "llama": "model.layers.1.mlp.down_proj.weight"}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("evaldata")
    (root / "cf.json").write_text(json.dumps(COUNTERFACT))
    (root / "zsre.jsonl").write_text("\n".join(json.dumps(r) for r in ZSRE) + "\n")
    (root / "corpus.txt").write_text(" ".join(CORPUS))
    return {"cf": root / "cf.json", "zsre": root / "zsre.jsonl", "text": root / "corpus.txt", "root": root}


def evaluate(*args: str) -> dict:
    result = runner.invoke(app, ["evaluate", *args, "--json"])
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return json.loads(result.stdout)


def test_json_report_has_every_metric_with_its_protocol(llama_dir: Path, files: dict[str, Path],
                                                        tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    report = evaluate(str(llama_dir), "-e", str(files["cf"]), "-t", "counterfact,perplexity", "--text",
                      str(files["text"]), "--window", "32", "-b", "4", "-o", str(out))
    names = ["efficacy_score", "paraphrase_score", "neighborhood_score", "efficacy_magnitude", "paraphrase_magnitude",
             "neighborhood_magnitude", "efficacy_acc", "paraphrase_acc", "neighborhood_acc", "perplexity"]
    assert list(report["metrics"]) == names
    assert report["model"] == str(llama_dir) and report["deltas"] == []
    assert set(report["protocol"]) == {"counterfact_rome", "counterfact_argmax", "perplexity"}
    assert all(report["metric_group"][m] in report["protocol"] for m in names)
    assert all(report["n"][m] == 3 and report["n_nonfinite"][m] == 0 for m in names[:-1])
    assert "window of 32 tokens with stride 16" in report["protocol"]["perplexity"]
    assert report["edits"] == {"file": str(files["cf"]), "start": 0, "n": 3}
    assert json.loads(out.read_text()) == report
    # Human output: the table on stdout, throughput on stderr.
    result = runner.invoke(app, ["evaluate", str(llama_dir), "-e", str(files["cf"]), "--limit", "2"])
    assert result.exit_code == 0, result.stderr
    assert "efficacy_score" in result.stdout and "counterfact_rome" in result.stdout
    assert "cases/s" in result.stderr and "efficacy_score" not in result.stderr
    # A minimal record has no true object: the *_score metrics count fewer records, and the table says why.
    mixed = tmp_path / "mixed.json"
    mixed.write_text(json.dumps([*COUNTERFACT[:2], {k: COUNTERFACT[2][k] for k in ("prompt", "subject",
                                                                                   "target_new")}]))
    result = runner.invoke(app, ["evaluate", str(llama_dir), "-r", str(mixed), "-t", "counterfact"])
    assert result.exit_code == 0, result.stderr
    assert ("efficacy_score: n counts only the records with a true object (target_true / ground_truth) to compare "
            "the new one with (efficacy_score n=2, efficacy_acc n=3)") in " ".join(result.stderr.split())


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_delta_in_memory_equals_the_applied_checkpoint(family: str, request: pytest.FixtureRequest,
                                                       files: dict[str, Path], tmp_path: Path) -> None:
    base = request.getfixturevalue(f"{family}_dir")
    delta = random_delta(base, TARGETS[family], tmp_path / "d.safetensors", 7)
    applied = tmp_path / "applied"
    result = runner.invoke(app, ["apply", str(base), str(delta), "-o", str(applied)])
    assert result.exit_code == 0, result.stderr
    common = ["-e", str(files["cf"]), "-t", "counterfact,perplexity", "--text", str(files["text"]), "--window", "32"]
    in_memory = evaluate(str(base), "-d", str(delta), *common)
    on_disk = evaluate(str(applied), *common)
    unedited = evaluate(str(base), *common)
    assert in_memory["deltas"] == [str(delta)]
    for name, value in in_memory["metrics"].items():
        assert value == pytest.approx(on_disk["metrics"][name], abs=1e-5), name
    assert in_memory["metrics"]["perplexity"] != pytest.approx(unedited["metrics"]["perplexity"], rel=1e-3)


def test_zsre_locality_is_measured_against_the_model_without_deltas(llama_dir: Path, files: dict[str, Path],
                                                                   tmp_path: Path) -> None:
    alone = evaluate(str(llama_dir), "-e", str(files["zsre"]))
    assert list(alone["metrics"]) == ["zsre_edit_acc", "zsre_rephrase_acc", "zsre_locality_agreement",
                                      "zsre_locality_gold_acc"]
    assert alone["metrics"]["zsre_locality_agreement"] == 1.0 and "itself" in alone["locality_reference"]
    delta = random_delta(llama_dir, TARGETS["llama"], tmp_path / "d.safetensors", 7)
    edited = evaluate(str(llama_dir), "-e", str(files["zsre"]), "-d", str(delta))
    assert edited["locality_reference"] == f"{llama_dir} without deltas"
    # The same numbers computed by hand: reference = the base model, evaluated = base + delta.
    requests = load_requests(files["zsre"])
    model, tok, _ = load_model(llama_dir)
    ref = reference_scores(model, tok, requests)
    add_delta_to_model(model, Delta.load(delta))
    (group,) = evaluate_zsre(model, tok, requests, ref, "base")
    for name, value in group.metrics.items():
        assert edited["metrics"][name] == pytest.approx(value.value, abs=1e-9)
    assert edited["metrics"]["zsre_locality_agreement"] < 1.0
    # An explicit reference: the applied checkpoint measured against the base gives the in-memory numbers.
    applied = tmp_path / "applied"
    assert runner.invoke(app, ["apply", str(llama_dir), str(delta), "-o", str(applied)]).exit_code == 0
    explicit = evaluate(str(applied), "-e", str(files["zsre"]), "--locality-reference", str(llama_dir))
    assert explicit["metrics"]["zsre_locality_agreement"] == pytest.approx(
        edited["metrics"]["zsre_locality_agreement"], abs=1e-9)


def test_requests_recorded_in_the_delta_are_evaluated(llama_dir: Path, files: dict[str, Path],
                                                       tmp_path: Path) -> None:
    recorded = [r.to_json() for r in load_requests(files["cf"])]
    delta = random_delta(llama_dir, TARGETS["llama"], tmp_path / "d.safetensors", 7, requests=recorded)
    from_delta = evaluate(str(llama_dir), "-d", str(delta))
    from_file = evaluate(str(llama_dir), "-d", str(delta), "-e", str(files["cf"]))
    assert from_delta["edits"]["file"] == "recorded in the deltas" and from_delta["metrics"] == from_file["metrics"]


def test_compare_reports(llama_dir: Path, files: dict[str, Path], tmp_path: Path) -> None:
    delta = random_delta(llama_dir, TARGETS["llama"], tmp_path / "d.safetensors", 7)
    common = ["-e", str(files["cf"]), "-t", "counterfact,perplexity", "--text", str(files["text"])]
    base, edited, other = tmp_path / "base.json", tmp_path / "edited.json", tmp_path / "other.json"
    evaluate(str(llama_dir), *common, "--window", "32", "-o", str(base))
    evaluate(str(llama_dir), *common, "--window", "32", "-d", str(delta), "-o", str(edited))
    evaluate(str(llama_dir), *common, "--window", "16", "--limit", "2", "-o", str(other))
    result = runner.invoke(app, ["evaluate", "--compare", str(base), str(edited), "--json"])
    assert result.exit_code == 0, result.stderr
    cmp = json.loads(result.stdout)
    assert cmp["labels"] == ["base", "edited"] and cmp["protocol_mismatch"] == [] and cmp["n_mismatch"] == []
    b, e = json.loads(base.read_text()), json.loads(edited.read_text())
    assert cmp["metrics"]["perplexity"]["values"] == [b["metrics"]["perplexity"], e["metrics"]["perplexity"]]
    table = runner.invoke(app, ["evaluate", "--compare", str(base), str(edited), str(other)])
    assert table.exit_code == 0 and "efficacy_score" in table.stdout and "other" in table.stdout
    assert "'perplexity' differs" in table.stderr and "different case counts" in table.stderr


@pytest.mark.parametrize("args, code, message", [
    (["a", "b"], 2, "exactly one MODEL"),
    (["--compare"], 2, "REPORT.json"),
    (["--compare", "x.json", "-d", "d.safetensors"], 2, "only reads reports"),
    (["--compare", "missing.json"], 1, "does not exist"),
])
def test_usage_errors(args: list[str], code: int, message: str) -> None:
    result = runner.invoke(app, ["evaluate", *args])
    assert result.exit_code == code and message in result.output.replace("\n", " ")


def test_runtime_errors_are_one_line(llama_dir: Path, files: dict[str, Path], tmp_path: Path) -> None:
    existing = tmp_path / "exists.json"
    existing.write_text("{}")
    not_report = tmp_path / "nope.json"
    not_report.write_text('{"metrics": {}}')
    for args, message in [
        ([str(llama_dir)], "nothing to evaluate"),
        ([str(llama_dir), "-t", "counterfact"], "needs edit requests"),
        ([str(llama_dir), "-t", "nonsense"], "unknown task"),
        ([str(llama_dir), "-e", str(files["cf"]), "-o", str(existing)], "already exists"),
        ([str(llama_dir), "-t", "gsm8k", "--data-dir", str(tmp_path)], "does not exist"),
        (["--compare", str(not_report)], "not a prunecli evaluation report"),
    ]:
        result = runner.invoke(app, ["evaluate", *args])
        assert result.exit_code == 1, (args, result.stdout, result.stderr)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message in errors[0] and "Traceback" not in result.output, result.stderr
    assert existing.read_text() == "{}"


@pytest.mark.slow
def test_smollm2_counterfact_unedited(shared_data: Path, tmp_path: Path) -> None:
    from prunecli.models.builtin import ensure_default_model

    model = ensure_default_model()
    report = evaluate(str(model), "-e", str(shared_data / "counterfact" / "counterfact-edit.json"), "--limit", "50",
                      "-b", "32", "--device", "cpu", "-o", str(tmp_path / "smollm2.json"))
    m = report["metrics"]
    print({k: round(v, 4) for k, v in m.items()})
    assert all(report["n"][k] == 50 and report["n_nonfinite"][k] == 0 for k in m)
    # Unedited: the true object mostly beats the counterfactual one, and no new object is the argmax.
    assert m["efficacy_score"] < 0.5 and m["neighborhood_score"] > 0.5
    assert m["efficacy_magnitude"] < 0 < m["neighborhood_magnitude"]
    assert m["efficacy_acc"] <= 0.1 and m["paraphrase_acc"] <= 0.1
