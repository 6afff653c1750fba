"""CLI conventions: --version, shell completion, unwrapped examples in --help, `compare` without torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from prunecli.cli import app, command_help

runner = CliRunner()


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("prunecli ")


def test_shell_completion_is_offered() -> None:
    result = runner.invoke(app, ["--help"])
    assert "--install-completion" in result.output


def test_examples_are_one_unwrapped_line() -> None:
    doc = """Prose.

    Example: prunecli stats smollm2 --method memit --text wiki.raw
    --tokens 50000 -o s.safetensors
    """
    assert command_help(doc) == ("Prose.\n\n\b\nExample: prunecli stats smollm2 --method memit --text wiki.raw "
                                 "--tokens 50000 -o s.safetensors")
    from prunecli.commands import edit, evaluate, stats, train_mend

    for name, module in [("stats", stats), ("edit", edit), ("evaluate", evaluate), ("train-mend", train_mend)]:
        wanted = [p.removeprefix("\b\n") for p in command_help(module.main.__doc__).split("\n\n")
                  if p.startswith("\b\n")]
        out = runner.invoke(app, [name, "--help"], terminal_width=60).output
        lines = [line.strip() for line in out.splitlines()]
        assert wanted and all(example in lines for example in wanted), name  # printed whole, on one line


def _report(path: Path, value: float) -> Path:
    from prunecli.evaluation.base import MetricGroup, TaskOutcome
    from prunecli.evaluation.metrics import MetricValue
    from prunecli.evaluation.report import build_report, write_report

    outcome = TaskOutcome([MetricGroup("perplexity", "protocol text", {"perplexity": MetricValue(value, 10, 0)})], 10,
                          "tokens")
    write_report(build_report("m", [], {}, [("perplexity", outcome, 1.0)]), path, False)
    return path


def test_compare_command_reads_reports_without_torch(tmp_path: Path) -> None:
    a, b = _report(tmp_path / "a.json", 20.0), _report(tmp_path / "b.json", 25.0)
    code = ("import sys; from prunecli.cli import app; "
            "sys.argv = ['prunecli', 'compare', sys.argv[1], sys.argv[2], '--json']\n"
            "try:\n    app()\nexcept SystemExit as e:\n    code = e.code\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr); sys.exit(code)")
    out = subprocess.run([sys.executable, "-c", code, str(a), str(b)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "NO-TORCH" in out.stderr
    doc = json.loads(out.stdout)
    assert doc["labels"] == ["a", "b"] and doc["metrics"]["perplexity"]["values"] == [20.0, 25.0]
    alias = runner.invoke(app, ["evaluate", "--compare", str(a), str(b), "--json"])
    assert alias.exit_code == 0 and json.loads(alias.stdout)["metrics"] == doc["metrics"]


def test_requests_from_standard_input(llama_dir: Path) -> None:
    from helpers import COUNTERFACT

    text = "\n".join(json.dumps(r) for r in COUNTERFACT) + "\n"
    piped = runner.invoke(app, ["evaluate", str(llama_dir), "-e", "-", "-t", "counterfact", "--json"], input=text)
    assert piped.exit_code == 0, piped.stderr
    assert json.loads(piped.stdout)["edits"]["n"] == len(COUNTERFACT)


def test_device_is_one_option_everywhere(gpt2_dir: Path) -> None:
    for command in ("inspect", "prune", "stats", "edit", "evaluate", "train-mend"):
        bad = runner.invoke(app, [command, str(gpt2_dir), "--device", "tpu"])
        assert bad.exit_code == 2 and "is not auto, cpu, cuda, cuda:N or mps" in bad.output, command
    ok = runner.invoke(app, ["inspect", str(gpt2_dir), "--select", "*.h.0.mlp.c_proj.weight", "--device", "auto",
                             "--json"])
    import torch

    assert ok.exit_code == 0
    assert json.loads(ok.stdout)["device"].startswith("cuda" if torch.cuda.is_available() else "cpu")


def test_commands_that_load_models_have_the_allow_pickle_their_messages_name(tmp_path: Path) -> None:
    import torch
    from tiny_models import CORPUS, build_tiny_model, tiny_tokenizer

    folder = tmp_path / "pickled"
    model = build_tiny_model("gpt2")
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    tiny_tokenizer().save_pretrained(folder)
    text = tmp_path / "t.txt"
    text.write_text(" ".join(CORPUS))
    args = ["evaluate", str(folder), "-t", "perplexity", "--text", str(text), "--json"]
    refused = runner.invoke(app, args)
    assert refused.exit_code == 1 and "--allow-pickle" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    allowed = runner.invoke(app, [*args, "--allow-pickle"])
    assert allowed.exit_code == 0, allowed.stderr
    assert json.loads(allowed.stdout)["metrics"]["perplexity"] > 1
    for command in ("edit", "stats", "train-mend"):
        assert "--allow-pickle" in runner.invoke(app, [command, "--help"]).output, command


def test_one_name_per_concept_old_spellings_still_work(llama_dir: Path, tmp_path: Path) -> None:
    from helpers import COUNTERFACT

    edits = tmp_path / "cf.json"
    edits.write_text(json.dumps(COUNTERFACT))
    new = runner.invoke(app, ["evaluate", str(llama_dir), "-r", str(edits), "-t", "counterfact", "--json"])
    old = runner.invoke(app, ["evaluate", str(llama_dir), "--edits", str(edits), "-t", "counterfact", "--json"])
    assert new.exit_code == old.exit_code == 0
    assert json.loads(new.stdout)["metrics"] == json.loads(old.stdout)["metrics"]
    both = runner.invoke(app, ["evaluate", str(llama_dir), "-r", str(edits), "-e", str(edits)])
    assert both.exit_code == 2 and "old spelling of --requests" in both.output
    for command, old_name in [("evaluate", "--edits"), ("train-mend", "--data")]:
        shown = runner.invoke(app, [command, "--help"]).output
        assert "--requests" in shown and old_name not in shown, command
    for command in ("edit", "evaluate", "inspect"):
        assert "-d, --delta" in runner.invoke(app, [command, "--help"]).output, command


def test_every_spelling_of_the_requests_works_in_every_command_that_takes_them() -> None:
    """`--requests`/`-r`, and the old `--edits`/`-e`/`--data` (hidden, with a deprecation line), in edit, evaluate and
    train-mend alike (parsed only: the option group turns each into the same requests file)."""
    import typer

    commands = typer.main.get_command(app).commands
    rest = {"edit": ["m", "-o", "x"], "evaluate": ["m"], "train-mend": ["m", "-o", "x"]}
    for name, args in rest.items():
        for spelling in ("--requests", "-r", "--edits", "-e", "--data"):
            with commands[name].make_context(name, [*args, spelling, "facts.jsonl"]) as ctx:
                given = {k: v for k, v in ctx.params.items() if k in ("requests", "edits_old") and v is not None}
            assert [str(v) for v in given.values()] == ["facts.jsonl"], (name, spelling, given)


def test_edit_layers_option(llama_dir: Path, tmp_path: Path) -> None:
    from editing_helpers import RECORDS, TINY_SETS, write_requests

    requests = write_requests(tmp_path / "r.jsonl", RECORDS[:1])
    sets = [a for s in TINY_SETS for a in ("--set", s)]
    result = runner.invoke(app, ["edit", str(llama_dir), "--requests", str(requests), "--layers", "2", *sets,
                                 "-o", str(tmp_path / "d.safetensors"), "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["layers"] == [2]


def test_export_lora_takes_base_then_delta_and_select(llama_dir: Path, tmp_path: Path) -> None:
    from helpers import random_delta

    from prunecli.core.delta import Delta

    first = random_delta(llama_dir, "model.layers.1.mlp.down_proj.weight", tmp_path / "a.safetensors", 7)
    second = random_delta(llama_dir, "model.layers.2.mlp.down_proj.weight", tmp_path / "b.safetensors", 7)
    both = Delta.load(first).compose(Delta.load(second))
    both.save(tmp_path / "ab.safetensors")
    new = runner.invoke(app, ["export-lora", str(llama_dir), str(tmp_path / "ab.safetensors"), "--select",
                              "*.layers.2.*", "-o", str(tmp_path / "lora"), "--json"])
    assert new.exit_code == 0, new.stderr
    assert list(json.loads(new.stdout)["ranks"]) == ["model.layers.2.mlp.down_proj"]
    old = runner.invoke(app, ["export-lora", str(tmp_path / "ab.safetensors"), "--base", str(llama_dir), "-o",
                              str(tmp_path / "lora-old"), "--json"])
    assert old.exit_code == 0 and len(json.loads(old.stdout)["ranks"]) == 2
    wrong = runner.invoke(app, ["export-lora", str(tmp_path / "ab.safetensors"), "-o", str(tmp_path / "x")])
    assert wrong.exit_code == 2 and "give BASE DELTA" in wrong.output


def test_prune_takes_base_then_delta_select_and_usage_errors(llama_dir: Path, tmp_path: Path) -> None:
    from helpers import random_delta

    from prunecli.core.delta import Delta

    a = random_delta(llama_dir, "model.layers.1.mlp.down_proj.weight", tmp_path / "a.safetensors", 7)
    b = random_delta(llama_dir, "model.layers.2.mlp.down_proj.weight", tmp_path / "b.safetensors", 7)
    both = Delta.load(a).compose(Delta.load(b))
    both.save(tmp_path / "ab.safetensors")
    out = tmp_path / "p.safetensors"
    result = runner.invoke(app, ["prune", str(llama_dir), str(tmp_path / "ab.safetensors"), "--select", "*.layers.2.*",
                                 "--fn", "scale-free", "--strength", "1", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.stderr
    assert [t["name"] for t in json.loads(result.stdout)["tensors"]] == ["model.layers.2.mlp.down_proj.weight"]
    pruned = Delta.load(out)
    kept = "model.layers.1.mlp.down_proj.weight"
    assert torch_equal(pruned.entries[kept].to_dense(), both.entries[kept].to_dense())  # not selected: unchanged
    assert pruned.restraints[-1]["select"] == ["*.layers.2.*"]
    bad = runner.invoke(app, ["prune", str(llama_dir), str(a), "--alpha", "0.5", "-o", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "--alpha must be" in bad.output


def torch_equal(x, y) -> bool:
    import torch

    return bool(torch.equal(x, y))


def test_apply_select_merges_only_matching_entries(llama_dir: Path, tmp_path: Path) -> None:
    from helpers import random_delta

    from prunecli.core.checkpoint import Checkpoint
    from prunecli.core.delta import Delta

    a = random_delta(llama_dir, "model.layers.1.mlp.down_proj.weight", tmp_path / "a.safetensors", 7)
    b = random_delta(llama_dir, "model.layers.2.mlp.down_proj.weight", tmp_path / "b.safetensors", 7)
    Delta.load(a).compose(Delta.load(b)).save(tmp_path / "ab.safetensors")
    result = runner.invoke(app, ["apply", str(llama_dir), str(tmp_path / "ab.safetensors"), "--select",
                                 "*.layers.2.*", "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.stderr
    base, out = Checkpoint(llama_dir), Checkpoint(tmp_path / "out")
    one, two = "model.layers.1.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight"
    assert torch_equal(out.get(one), base.get(one)) and not torch_equal(out.get(two), base.get(two))


def test_a_closed_pipe_is_no_error(tmp_path: Path) -> None:
    """`prunecli compare ... | head -1`: the reader went away before the table was written; exit 0 and no error or
    traceback on stderr (a shell pipeline's normal end), with and without --json (rich alone would exit 1)."""
    a, b = _report(tmp_path / "a.json", 20.0), _report(tmp_path / "b.json", 25.0)
    for extra in ([], ["--json"]):
        proc = subprocess.Popen([sys.executable, "-m", "prunecli", "compare", str(a), str(b), *extra],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdout is not None
        proc.stdout.close()  # before the child (still importing) writes anything
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert not any(word in err for word in (b"error", b"Error", b"Traceback", b"Exception")), err


def test_a_misspelt_built_in_model_gets_a_suggestion() -> None:
    result = runner.invoke(app, ["inspect", "smolm2"])
    assert result.exit_code == 1 and "did you mean smollm2?" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_tables_follow_one_width_rule_when_piped(gpt2_dir: Path) -> None:
    """Piped, every table may use PIPED_WIDTH columns: a wide table is not squeezed to 80 (names cut, rows wrapped)."""
    from prunecli.commands._output import PIPED_WIDTH, stdout_console

    assert stdout_console().width == PIPED_WIDTH  # pytest's stdout is not a terminal
    result = runner.invoke(app, ["inspect", str(gpt2_dir), "--select", "*.h.1.*"])
    assert result.exit_code == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if "transformer.h.1." in line]
    assert rows and all(len(line) <= PIPED_WIDTH for line in result.stdout.splitlines())
    assert all(line.split()[1].startswith("transformer.h.1.") and line.split()[1].endswith(".weight") for line in rows)


def test_strength_range_in_help_is_the_one_checked() -> None:
    """--strength is checked against [0, 2] (2 removes D); the help says the same."""
    from prunecli.core.restraint_functions import MAX_STRENGTH

    shown = " ".join(runner.invoke(app, ["prune", "--help"], terminal_width=200).output.split())
    assert MAX_STRENGTH == 2 and "Strength t of scale-free F, in [0, 2]" in shown
    bad = runner.invoke(app, ["prune", "smollm2", "d.safetensors", "--fn", "scale-free", "--strength", "2.5", "-o",
                              "x.safetensors"])
    assert bad.exit_code == 2 and "--strength" in bad.output
