"""`prunecli edit` checks every edit on its prompt: failures are warned about, counted, and never look like success."""

from __future__ import annotations

import json

from editing_helpers import RECORDS, TINY_SETS, write_requests
from typer.testing import CliRunner

from prunecli.cli import app
from prunecli.core.delta import Delta
from prunecli.models.recall import recalled

runner = CliRunner()
SETS = [a for s in [*TINY_SETS, "layers=1"] for a in ("--set", s)]
# Record 1 names its new target as its true object too: P(new) = P(true) is never "above", so that edit cannot take.
MIXED = [dict(RECORDS[0], ground_truth="English"), dict(RECORDS[1], ground_truth=RECORDS[1]["target_new"]),
         RECORDS[2]]


def _edit(llama_dir, requests, out, *extra):
    return runner.invoke(app, ["edit", str(llama_dir), "--requests", str(requests), *SETS, "-o", str(out), *extra])


def _stderr(result) -> str:
    return " ".join(result.stderr.split())  # rich wraps long lines


def test_failed_edit_is_warned_counted_and_summarised(tmp_path, llama_dir):
    requests = write_requests(tmp_path / "r.jsonl", MIXED)
    result = _edit(llama_dir, requests, tmp_path / "d.safetensors", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["check"] == "teacher-forced"  # the default
    assert summary["failed_edits"] == 1 and summary["failed_records"] == [1]
    took = {r["index"]: r["took"] for r in summary["requests"]}
    assert took == {0: True, 1: False, 2: True}
    rep = summary["requests"][0]
    assert rep["new_mean_prob"] > rep["true_mean_prob"]  # the rule, as reported
    assert "edit of record 1 did not take" in _stderr(result)
    assert (tmp_path / "d.safetensors").exists()
    plain = _edit(llama_dir, requests, tmp_path / "e.safetensors")
    assert plain.exit_code == 0 and "1 of 3 edit(s) did not take (records 1)" in _stderr(plain)


def test_strict_exits_1_and_writes_nothing(tmp_path, llama_dir):
    requests = write_requests(tmp_path / "r.jsonl", MIXED)
    result = _edit(llama_dir, requests, tmp_path / "d.safetensors", "--strict")
    assert result.exit_code == 1
    assert "1 of 3 edit(s) did not take (records 1); --strict: nothing written" in _stderr(result)
    assert not (tmp_path / "d.safetensors").exists()
    # Checkpoints were written while editing: the message says what is there instead of "nothing".
    result = _edit(llama_dir, requests, tmp_path / "d.safetensors", "--strict", "--checkpoint-every", "1")
    assert result.exit_code == 1
    assert (f"--strict: the result was not written ({tmp_path / 'd.safetensors'} holds the checkpoint of records 0-1, "
            "marked partial)") in _stderr(result)
    assert Delta.load(tmp_path / "d.safetensors").partial.next == 2


def test_a_run_where_no_edit_took_is_an_error(tmp_path, llama_dir):
    """A vanishing learning rate: the value shift stays ~0, so ROME changes nothing the prompt can see."""
    requests = write_requests(tmp_path / "r.jsonl")
    result = _edit(llama_dir, requests, tmp_path / "d.safetensors", "--set", "v_lr=1e-9")
    assert result.exit_code == 1
    assert "3 of 3 edit(s) did not take (records 0-2); no edit took: nothing written" in _stderr(result)
    assert not (tmp_path / "d.safetensors").exists()


def test_generation_check_uses_the_evaluation_rule(tmp_path, llama_dir):
    """`--check generation` judges each edit by what greedy decoding writes: record 1 (new target = true object)
    cannot take teacher-forced but takes when the model writes it. On the final model (the last edit's check) the
    check agrees, text and verdict, with `evaluate -t counterfact-gen`, which applies the same rule."""
    requests = write_requests(tmp_path / "r.jsonl", MIXED)
    out = tmp_path / "d.safetensors"
    result = _edit(llama_dir, requests, out, "--check", "generation", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["check"] == "generation"
    for r in summary["requests"]:
        assert r["took"] == recalled(r["generated"], r["target_new"]), r
    tied = summary["requests"][1]
    assert tied["new_mean_prob"] == tied["true_mean_prob"] and tied["took"]
    report = runner.invoke(app, ["evaluate", str(llama_dir), "-d", str(out), "-t", "counterfact-gen", "--json"])
    assert report.exit_code == 0, report.stderr
    evaluated = json.loads(report.stdout)
    last = summary["requests"][-1]
    written = evaluated["generations"]["counterfact_generation"][-1]
    assert written["efficacy"] == [[last["prompt"], last["generated"]]]
    assert evaluated["outcomes"]["efficacy_gen"]["values"][-1] == float(last["took"])
    # The table shows what was generated.
    table = runner.invoke(app, ["edit", str(llama_dir), "--requests", str(requests), *SETS, "-o",
                                str(tmp_path / "e.safetensors"), "--check", "generation"], env={"COLUMNS": "200"})
    assert table.exit_code == 0 and "generated" in table.stdout and last["generated"].strip() in table.stdout
    assert _edit(llama_dir, requests, tmp_path / "f.safetensors", "--check", "vibes").exit_code == 2
