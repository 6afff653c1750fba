"""Data parallel `evaluate` and `stats` under `accelerate launch` with 2 CPU processes (gloo) equal one process.

accelerate's `--cpu` flag starts a single process (it spreads CPU runs only through MPI); `--multi_gpu
--num_processes 2` runs torch.distributed.run, and on a machine without GPUs prunecli joins the group over gloo.
The launched runs shard every task's items (CounterFact pairs and prompts decoded, perplexity windows, label words,
generations) and the corpus batches; metrics must equal the single-process run's and the statistics its sums to
float64 tolerance.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import CORPUS
from typer.testing import CliRunner

from prunecli.cli import app
from prunecli.editors.stats import KeyStats

runner = CliRunner()
COUNTERFACT = [
    {"case_id": i, "prompt": f"{subject} is located in", "subject": subject, "target_new": new, "ground_truth": true,
     "rephrase_prompt": f"The city of {subject} is", "locality_prompt": f"{other} is located in",
     "locality_ground_truth": true}
    for i, (subject, new, true, other) in enumerate([
        ("The Eiffel Tower", "Seattle", "Paris", "The Louvre"), ("The Space Needle", "Paris", "Seattle", "Pike Place"),
        ("Apple A5", "Microsoft", "Apple", "Windows"), ("Michael Jordan", "guitar", "basketball", "Chicago Bulls"),
        ("Toko Yasuda", "basketball", "guitar", "the piano"), ("Danielle Darrieux", "English", "French", "Paris")])]
SST2 = [{"sentence": s, "label": i % 2} for i, s in enumerate(CORPUS[:7])]
GSM8K = [{"question": f"How many towers are in {c}?", "answer": f"Count them. #### {i}"}
         for i, c in enumerate(["Paris", "Seattle", "Chicago", "France", "Apple"])]


def _launch(*args: object, cwd: Path) -> subprocess.CompletedProcess[str]:
    launcher = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    if launcher is None:
        pytest.skip("accelerate's launcher is not installed")
    with socket.socket() as s:  # a free port, so parallel test runs do not collide
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT")}
    env.update(PRUNECLI_NO_PROGRESS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(port), "-m", "prunecli", *[str(a) for a in args]]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mp")
    files = {"cf": root / "cf.json", "text": root / "text.txt", "sst2": root / "sst2.jsonl",
             "gsm8k": root / "gsm8k.jsonl", "root": root}
    files["cf"].write_text(json.dumps(COUNTERFACT))
    files["text"].write_text("\n\n".join(CORPUS))
    files["sst2"].write_text("".join(json.dumps(r) + "\n" for r in SST2))
    files["gsm8k"].write_text("".join(json.dumps(r) + "\n" for r in GSM8K))
    return files


def test_evaluate_two_processes_equals_one(llama_dir: Path, inputs: dict[str, Path]) -> None:
    args = [llama_dir, "-e", inputs["cf"], "--text", inputs["text"], "--window", 24, "--stride", 8, "--batch-size", 2,
            "-t", f"counterfact,counterfact-gen,perplexity,glue:sst2={inputs['sst2']},gsm8k={inputs['gsm8k']}",
            "--device", "cpu"]
    single = runner.invoke(app, ["evaluate", *[str(a) for a in args], "--json"])
    assert single.exit_code == 0, single.output
    one = json.loads(single.stdout)
    out = inputs["root"] / "report.json"
    launched = _launch("evaluate", *args, "-o", out, "--json", cwd=inputs["root"])
    assert launched.returncode == 0, launched.stderr
    reports = [json.loads(line) for line in launched.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == 1, "only rank 0 prints"
    two = json.loads(out.read_text())
    assert reports[0]["metrics"] == two["metrics"]
    assert two["settings"]["processes"] == 2 and one["settings"]["processes"] == 1
    assert two["n"] == one["n"] and two["n_nonfinite"] == one["n_nonfinite"] and two["n"]["efficacy_score"] == 6
    assert two["metrics"].keys() == one["metrics"].keys()
    for name, value in one["metrics"].items():
        assert two["metrics"][name] == pytest.approx(value, rel=1e-6, abs=1e-9), name
    # The generation protocol's prompts are sharded too: the same continuations, records and per-record outcomes.
    assert two["generations"] == one["generations"] and two["records"] == one["records"]
    assert two["outcomes"]["efficacy_gen"] == one["outcomes"]["efficacy_gen"]
    assert two["interval"].keys() == one["interval"].keys()


def test_stats_two_processes_equals_one(llama_dir: Path, inputs: dict[str, Path]) -> None:
    args = ["stats", llama_dir, "--layers", "1,3", "--text", inputs["text"], "--tokens", 300, "--seq-len", 16,
            "--batch-size", 2, "--device", "cpu"]
    single = inputs["root"] / "one.stats.safetensors"
    result = runner.invoke(app, [*map(str, args), "-o", str(single)])
    assert result.exit_code == 0, result.output
    double = inputs["root"] / "two.stats.safetensors"
    launched = _launch(*args, "-o", double, "--json", cwd=inputs["root"])
    assert launched.returncode == 0, launched.stderr
    assert len([line for line in launched.stdout.splitlines() if line.startswith("{")]) == 1, "only rank 0 prints"
    one, two = KeyStats.load(single), KeyStats.load(double)
    assert two.counts == one.counts and one.tokens == 300
    assert two.layers == one.layers and two.corpus == one.corpus
    for layer in (1, 3):
        assert two.sums[layer].dtype == torch.float64
        torch.testing.assert_close(two.sums[layer], one.sums[layer], rtol=1e-12, atol=1e-9)
        assert not torch.equal(one.sums[layer], torch.zeros_like(one.sums[layer]))
