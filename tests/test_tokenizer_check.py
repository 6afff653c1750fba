"""Model folders without a usable tokenizer (issue 19): every command that loads a model says so in one line, before
any work; `--tokenizer` fixes it; `apply --tokenizer` writes a complete checkpoint.

Two broken folders, as users have them: a tiny GPT-2 saved without its tokenizer (transformers 5 then loads an empty
tokenizer with a vocabulary of 1), and the same model beside another model's tokenizer whose ids reach past its 400
embedding rows (the IndexError case).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from editing_helpers import TINY_SETS, write_requests
from tiny_models import CORPUS, save_tiny_model, tiny_tokenizer
from typer.testing import CliRunner

from prunecli.cli import app
from prunecli.core.checkpoint import Checkpoint
from prunecli.core.delta import Delta, DeltaEntry
from prunecli.models.loading import load_model
from prunecli.models.tokenizer import TOKENIZER_FILES_HINT

runner = CliRunner()

# What these causes produced before the check (issue 19's table): none may reach a user again.
SYMPTOMS = ("tokenizes to nothing", "fewer than 2 tokens", "cannot reshape", "yielded no tokens", "index out of range",
            "IndexError", "RuntimeError", "ValueError", "Traceback")
RESERVED = 200  # the other tokenizer: 600 ids for the model's 400 embedding rows


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    good = save_tiny_model("gpt2", root / "good")
    no_tok = save_tiny_model("gpt2", root / "no-tokenizer", tokenizer=False)
    other = save_tiny_model("gpt2", root / "other-tokenizer", tokenizer=False)
    tiny_tokenizer(RESERVED).save_pretrained(other)
    (root / "corpus.txt").write_text(" ".join(CORPUS))
    return {"good": good, "no_tok": no_tok, "other": other, "text": root / "corpus.txt",
            "cf": write_requests(root / "requests.jsonl"), "root": root}


def commands(model: Path, f: dict[str, Path], out: Path) -> dict[str, list[str]]:
    """The issue's four failing invocations, plus train-mend (which loads a model too)."""
    return {
        "evaluate --edits": ["evaluate", str(model), "--edits", str(f["cf"]), "--device", "cpu"],
        "evaluate perplexity": ["evaluate", str(model), "-t", "perplexity", "--text", str(f["text"]), "--window", "32",
                                "--device", "cpu"],
        "edit": ["edit", str(model), "--requests", str(f["cf"]), "--limit", "1",
                 *[a for s in TINY_SETS for a in ("--set", s)], "-o", str(out / "d.safetensors")],
        "stats": ["stats", str(model), "--method", "memit", "--text", str(f["text"]), "--tokens", "40", "--seq-len",
                  "16", "-o", str(out / "s.safetensors")],
        "train-mend": ["train-mend", str(model), "--data", str(f["cf"]), "--steps", "1", "--batch-size", "1",
                       "--val-fraction", "0.4", "--rank", "4", "-o", str(out / "m.safetensors")],
    }


def one_error_line(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 1, (args, result.output)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert not any(s in result.output for s in SYMPTOMS), result.output
    return errors[0]


@pytest.mark.parametrize("name", ["evaluate --edits", "evaluate perplexity", "edit", "stats", "train-mend"])
def test_a_folder_without_tokenizer_files_is_one_line_naming_the_fix(name: str, folders: dict[str, Path],
                                                                      tmp_path: Path) -> None:
    line = one_error_line(commands(folders["no_tok"], folders, tmp_path)[name])
    assert line == (f"error: {folders['no_tok']} has no tokenizer files ({TOKENIZER_FILES_HINT}): copy them from the "
                    "original model or pass --tokenizer")
    assert not list(tmp_path.iterdir())  # failed before any work: nothing written


@pytest.mark.parametrize("name", ["evaluate --edits", "evaluate perplexity", "edit", "stats", "train-mend"])
def test_a_tokenizer_with_ids_beyond_the_embedding_is_one_line_with_both_sizes(name: str, folders: dict[str, Path],
                                                                               tmp_path: Path) -> None:
    line = one_error_line(commands(folders["other"], folders, tmp_path)[name])
    top = max(tiny_tokenizer(RESERVED).get_vocab().values())
    assert f"has ids up to {top} ({len(tiny_tokenizer(RESERVED))} tokens)" in line
    assert f"the model {folders['other']} has {len(tiny_tokenizer())} embedding rows" in line
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("name", ["evaluate --edits", "evaluate perplexity", "edit", "stats"])
@pytest.mark.parametrize(("broken", "given"), [("no_tok", "file"), ("other", "folder")])
def test_tokenizer_option_fixes_both_folders(name: str, broken: str, given: str, folders: dict[str, Path],
                                             tmp_path: Path) -> None:
    tokenizer = folders["good"] if given == "folder" else folders["good"] / "tokenizer.json"
    args = commands(folders[broken], folders, tmp_path)[name]
    fixed = runner.invoke(app, [*args, "--tokenizer", str(tokenizer), "--json"])
    assert fixed.exit_code == 0, fixed.output
    # The same numbers as the intact folder: the given tokenizer is really the one used.
    if name.startswith("evaluate"):
        reference = runner.invoke(app, [args[0], str(folders["good"]), *args[2:], "--json"])
        assert json.loads(fixed.stdout)["metrics"] == json.loads(reference.stdout)["metrics"]


def test_tokenizer_option_takes_a_built_in_model_name(folders: dict[str, Path], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """`--tokenizer smollm2` is the built-in model's cache folder (here a complete entry holding the tiny tokenizer,
    so nothing is converted)."""
    from prunecli.models.builtin import COMPLETE_MARKER, builtin_dir

    monkeypatch.setenv("PRUNECLI_CACHE", str(tmp_path / "cache"))
    entry = builtin_dir("smollm2")
    tiny_tokenizer().save_pretrained(entry)
    (entry / COMPLETE_MARKER).write_text("smollm2\n")
    monkeypatch.chdir(tmp_path)  # no folder named smollm2 here to shadow the name
    result = runner.invoke(app, [*commands(folders["no_tok"], folders, tmp_path)["evaluate --edits"], "--tokenizer",
                                 "smollm2", "--json"])
    assert result.exit_code == 0, result.output


def test_the_check_covers_architectures_whose_loader_raises(tmp_path: Path, folders: dict[str, Path]) -> None:
    """For LLaMA, transformers raises ("Couldn't instantiate the backend tokenizer") instead of returning an empty
    tokenizer: the same one line."""
    llama = save_tiny_model("llama", tmp_path / "llama", tokenizer=False)
    line = one_error_line(commands(llama, folders, tmp_path / "out")["evaluate --edits"])
    assert line.startswith(f"error: {llama} has no tokenizer files (")


def test_padded_vocabulary_is_accepted(tmp_path: Path) -> None:
    """More embedding rows than tokens (vocabularies padded to a multiple of 64, say) is normal."""
    padded = save_tiny_model("gpt2", tmp_path / "padded", vocab_size=448)
    model, tok, _ = load_model(padded)
    assert model.get_input_embeddings().weight.shape[0] == 448 and len(tok) == 400


def test_bad_tokenizer_options(folders: dict[str, Path], tmp_path: Path) -> None:
    base = ["evaluate", str(folders["no_tok"]), "--edits", str(folders["cf"]), "--tokenizer"]
    line = one_error_line([*base, str(tmp_path / "missing")])
    assert "--tokenizer" in line and "no such folder or file" in line
    line = one_error_line([*base, str(folders["no_tok"])])  # a folder that has none either
    assert f"--tokenizer {folders['no_tok']} has no tokenizer files" in line and "built-in model name" in line
    merges = tmp_path / "merges.txt"
    merges.write_text("#version: 0.2\n")
    assert "must be a tokenizers JSON file" in one_error_line([*base, str(merges)])
    unreadable = tmp_path / "tokenizer.json"
    unreadable.write_text("{}")
    assert "cannot load the tokenizer of --tokenizer" in one_error_line([*base, str(unreadable)])


def _delta(model_dir: Path, path: Path) -> Path:
    name = "transformer.h.1.mlp.c_proj.weight"
    ck = Checkpoint(model_dir)
    inp, out = ck.info(name).shape  # Conv1D: stored [in, out]
    gen = torch.Generator().manual_seed(3)
    delta = Delta.for_base(ck)
    delta.add(name, DeltaEntry.lowrank(torch.randn(out, 2, generator=gen), torch.randn(inp, 2, generator=gen),
                                       ck.layout(name)), ck)
    delta.save(path)
    return path


def test_apply_with_tokenizer_writes_a_complete_folder(folders: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    base = tmp_path / "base"
    shutil.copytree(folders["no_tok"], base)
    (base / "tokenizer_config.json").write_text('{"tokenizer_class": "NoSuchTokenizer"}')  # a stale leftover
    delta = _delta(base, tmp_path / "d.safetensors")

    plain = runner.invoke(app, ["apply", str(folders["no_tok"]), str(delta), "-o", str(tmp_path / "plain")])
    assert plain.exit_code == 0 and "has no tokenizer files" in plain.stderr and "--tokenizer" in plain.stderr

    mismatched = tmp_path / "mismatched"
    line = one_error_line(["apply", str(base), str(delta), "--tokenizer", str(folders["other"]), "-o",
                           str(mismatched)])
    assert "embedding rows" in line and not mismatched.exists()

    out = tmp_path / "edited"
    result = runner.invoke(app, ["apply", str(base), str(delta), "--tokenizer", str(folders["good"] / "tokenizer.json"),
                                 "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["tokenizer"] == str(folders["good"] / "tokenizer.json")
    written = AutoTokenizer.from_pretrained(out)
    assert written(CORPUS[0])["input_ids"] == tiny_tokenizer()(CORPUS[0])["input_ids"]
    assert "NoSuchTokenizer" not in (out / "tokenizer_config.json").read_text()
    # The written checkpoint is complete: every command takes it without --tokenizer.
    report = runner.invoke(app, ["evaluate", str(out), "--edits", str(folders["cf"]), "--device", "cpu", "--json"])
    assert report.exit_code == 0, report.output

    single = one_error_line(["apply", str(base / "model.safetensors"), str(delta), "--tokenizer",
                             str(folders["good"]), "-o", str(tmp_path / "x.safetensors")])
    assert "needs a model folder base" in single


def test_a_tokenizer_that_cannot_encode_ordinary_text(folders: dict[str, Path], tmp_path: Path) -> None:
    """Tokenizer files that load but know none of the words: named as such, not as missing files."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    words = Tokenizer(WordLevel({"[UNK]": 0, "hello": 1}, unk_token="[UNK]"))
    words.pre_tokenizer = Whitespace()
    model = tmp_path / "model"
    shutil.copytree(folders["no_tok"], model)
    words.save(str(model / "tokenizer.json"))
    (model / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "[UNK]"}')
    line = one_error_line(commands(model, folders, tmp_path / "out")["evaluate --edits"])
    assert line.startswith(f"error: the tokenizer of {model} cannot encode ordinary text (")
    assert "gives only unknown tokens): pass a working one with --tokenizer" in line
