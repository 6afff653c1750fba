"""Issue 11, inputs: non-finite weights are never written or used (checked in the target dtype, adapters validated
like deltas), and every bad input the issue lists gives one specific line instead of a catch-all
(`error: KeyError: ...`), a torch warning or a multi-line message."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from editing_helpers import RECORDS, TINY_SETS
from safetensors.torch import save_file
from tiny_models import save_tiny_model
from typer.testing import CliRunner

from prunecli.cli import app
from prunecli.core.checkpoint import Checkpoint
from prunecli.core.delta import META_KEY, Delta, DeltaEntry
from prunecli.errors import PruneCliError

runner = CliRunner()
WEIGHT = "model.layers.1.mlp.down_proj.weight"
MODULE = "model.layers.1.mlp.down_proj"
ROOT = Path(__file__).resolve().parents[1]


def run(*args: object) -> object:
    return runner.invoke(app, [str(a) for a in args])


def one_error_line(result: object, *words: str, notes: bool = False) -> str:
    """Exit 1 and stderr is exactly one `error:` line (no warning, no traceback, no catch-all type name); with
    `notes`, the command's own log lines may come before it."""
    assert result.exit_code == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error:") and (notes or len(lines) == 1), result.stderr
    assert "Traceback" not in result.stderr and "Warning" not in result.stderr, result.stderr
    assert "--debug for the traceback" not in lines[-1], lines[-1]
    for w in words:
        assert w in lines[-1], lines[-1]
    return lines[-1]


@pytest.fixture()
def base(tmp_path: Path, llama_dir: Path) -> Path:
    return shutil.copytree(llama_dir, tmp_path / "base")


def write_delta(base: Path, path: Path, a: torch.Tensor, b: torch.Tensor, history: list | None = None) -> Path:
    ck = Checkpoint(base)
    delta = Delta.for_base(ck)
    delta.add(WEIGHT, DeltaEntry.lowrank(a, b, "out_in"), ck)
    delta.history.extend(history or [{"op": "edit", "method": "test", "requests": []}])
    delta.save(path)
    return path


def write_adapter(base: Path, folder: Path, config: object = None, lora_a: torch.Tensor | None = None,
                  lora_b: torch.Tensor | None = None) -> Path:
    out, inp = Checkpoint(base).info(WEIGHT).shape
    folder.mkdir()
    gen = torch.Generator().manual_seed(0)
    lora_a = torch.randn(2, inp, generator=gen) if lora_a is None else lora_a
    lora_b = torch.randn(out, 2, generator=gen) * 0.1 if lora_b is None else lora_b
    save_file({f"base_model.model.{MODULE}.lora_A.weight": lora_a,
               f"base_model.model.{MODULE}.lora_B.weight": lora_b}, folder / "adapter_model.safetensors")
    if config is None:
        config = {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": [MODULE]}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def _shape(base: Path) -> tuple[int, int]:
    out, inp = Checkpoint(base).info(WEIGHT).shape
    return out, inp


# ----------------------------------------------------------------------------------------- non-finite weights
def bad_updates(base: Path, tmp: Path) -> dict[str, tuple[Path, str]]:
    """Updates that make NaN/Inf weights, and what the refusal names (the tensor, or the adapter's bad setting)."""
    out, inp = _shape(base)
    huge = torch.full((out, 2), 3e38)
    ones = torch.ones(inp, 2)
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": [MODULE]}
    nan_a = torch.randn(2, inp)
    nan_a[0, 0] = float("nan")
    return {
        "finite factors that overflow": (write_delta(base, tmp / "overflow.safetensors", huge, ones), MODULE),
        "adapter with NaN in lora_A": (write_adapter(base, tmp / "nan-a", lora_a=nan_a), MODULE),
        "adapter with lora_alpha NaN": (write_adapter(base, tmp / "alpha-nan", {**cfg, "lora_alpha": float("nan")}),
                                        "lora_alpha"),
        "adapter whose alpha / r overflows": (write_adapter(base, tmp / "alpha-big", {**cfg, "lora_alpha": 1e300}),
                                              MODULE),
    }


def test_apply_evaluate_edit_inspect_export_refuse_non_finite_results(base: Path, tmp_path: Path) -> None:
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 20)
    requests = tmp_path / "r.jsonl"
    requests.write_text(json.dumps(RECORDS[0]) + "\n")  # a request the tiny models' edits take
    for label, (bad, named) in bad_updates(base, tmp_path).items():
        out = tmp_path / "out"
        one_error_line(run("apply", base, bad, "-o", out), named)
        assert not out.exists(), label
        one_error_line(run("evaluate", base, "-d", bad, "-t", "perplexity", "--text", text, "--max-tokens", 16,
                           "--device", "cpu"), named, notes=True)  # after the notes that say what loads
        one_error_line(run("edit", base, "--requests", requests, "--delta", bad, "--set", "layers=1", "--set",
                           "v_num_grad_steps=1", "-o", tmp_path / "e.safetensors"), named, notes=True)
        one_error_line(run("inspect", base, "--delta", bad), named)
        if bad.is_file():  # an adapter's own problems are found on reading; a delta's only once merged
            one_error_line(run("export-lora", base, bad, "-o", tmp_path / "lora"), WEIGHT, "NaN/Inf")
            assert not (tmp_path / "lora").exists()


def test_half_precision_overflows_before_float32(tmp_path: Path) -> None:
    """1e5 fits in fp32 and bf16 but not in fp16 (max 65504): the check is made in the stored dtype."""
    fp16 = save_tiny_model("llama", tmp_path / "fp16", dtype=torch.float16)
    bf16 = save_tiny_model("llama", tmp_path / "bf16", dtype=torch.bfloat16)
    out, inp = _shape(fp16)
    a, b = torch.full((out, 1), 1e5), torch.ones(inp, 1)
    line = one_error_line(run("apply", fp16, write_delta(fp16, tmp_path / "d16.safetensors", a, b), "-o",
                              tmp_path / "o16"), WEIGHT, "float16")
    assert "overflows" in line and not (tmp_path / "o16").exists()
    assert run("apply", bf16, write_delta(bf16, tmp_path / "db.safetensors", a, b), "-o",
               tmp_path / "ob").exit_code == 0


# ------------------------------------------------------------------------------------------- PEFT adapters
@pytest.mark.parametrize(("config", "words"), [
    ({"peft_type": "LORA", "lora_alpha": 2}, ["no rank 'r'"]),
    ({"peft_type": "LORA", "r": 0}, ["r in", "0", "integer >= 1"]),
    ({"peft_type": "LORA", "r": None}, ["None", "integer >= 1"]),
    ({"peft_type": "LORA", "r": "abc"}, ["'abc'", "integer >= 1"]),
    ({"peft_type": "LORA", "r": 2, "lora_alpha": -1}, ["lora_alpha", "finite number > 0"]),
    ([{"peft_type": "LORA", "r": 2}], ["holds a JSON list", "expected an object"]),
    ({"peft_type": "LORA", "r": 2, "rank_pattern": [1, 2]}, ["rank_pattern", "list"]),
    ({"peft_type": "LORA", "r": 2, "alpha_pattern": {MODULE: "x"}}, ["alpha_pattern", "'x'"]),
])
def test_bad_adapter_configs_are_one_specific_line(base: Path, tmp_path: Path, config: object,
                                                   words: list[str]) -> None:
    adapter = write_adapter(base, tmp_path / "adapter", config)
    one_error_line(run("apply", base, adapter, "-o", tmp_path / "out"), str(adapter), *words)


def test_adapter_factor_shapes(base: Path, tmp_path: Path) -> None:
    out, inp = _shape(base)
    one_d = write_adapter(base, tmp_path / "one-d", lora_a=torch.randn(inp))  # today: a torch warning, then an error
    one_error_line(run("apply", base, one_d, "-o", tmp_path / "o"), "lora_A", "[r, in]")
    ranks = write_adapter(base, tmp_path / "ranks", lora_a=torch.randn(3, inp), lora_b=torch.randn(out, 3))
    one_error_line(run("apply", base, ranks, "-o", tmp_path / "o"), "rank 3", "r = 2")


def test_adapters_are_accepted_wherever_a_delta_is(base: Path, tmp_path: Path) -> None:
    adapter = write_adapter(base, tmp_path / "adapter")
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 20)
    result = run("evaluate", base, "-d", adapter, "-t", "perplexity", "--text", text, "--max-tokens", 16,
                 "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    requests = tmp_path / "r.jsonl"
    requests.write_text(json.dumps(RECORDS[0]) + "\n")  # a request the tiny models' edits take
    out = tmp_path / "e.safetensors"
    result = run("edit", base, "--requests", requests, "--delta", adapter, "--set", "layers=1",
                 *[a for s in TINY_SETS for a in ("--set", s)], "-o", out)  # settings under which the edit takes
    assert result.exit_code == 0, result.output
    assert [op["op"] for op in Delta.load(out).history] == ["import-peft", "edit"]


# ------------------------------------------------------------------------------------- delta files and the rest
def rewrite_metadata(src: Path, dest: Path, meta: str) -> Path:
    from safetensors import safe_open

    with safe_open(str(src), framework="pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    save_file(tensors, dest, metadata={"format": "pt", META_KEY: meta})
    return dest


def test_history_entries_are_typed_on_read(base: Path, tmp_path: Path) -> None:
    out, inp = _shape(base)
    good = write_delta(base, tmp_path / "good.safetensors", torch.randn(out, 1), torch.randn(inp, 1))
    meta = Delta.load(good).metadata()
    for history, words in (([1, "x"], ["history entry 0", "int"]), ([{"no": "op"}], ["history entry 0", "'op'"]),
                           ([{"op": "edit", "requests": ["a"]}], ["history entry 0", "requests"])):
        bad = rewrite_metadata(good, tmp_path / "bad.safetensors", json.dumps({**meta, "history": history}))
        with pytest.raises(PruneCliError, match="invalid delta") as e:
            Delta.load(bad)
        assert all(w in str(e.value) for w in words), str(e.value)
        text = tmp_path / "t.txt"
        text.write_text("the quick brown fox " * 10)
        one_error_line(run("evaluate", base, "-d", bad, "-t", "perplexity", "--text", text, "--device", "cpu"),
                       "history entry 0")


def test_deeply_nested_metadata(base: Path, tmp_path: Path) -> None:
    out, inp = _shape(base)
    good = write_delta(base, tmp_path / "good.safetensors", torch.randn(out, 1), torch.randn(inp, 1))
    bad = rewrite_metadata(good, tmp_path / "deep.safetensors", "[" * 100_000 + "]" * 100_000)
    one_error_line(run("inspect", bad), "nested too deeply")
    index = {"weight_map": {WEIGHT: "model.safetensors"}, "metadata": json.loads("[" * 50 + "]" * 50)}
    deep = shutil.copytree(base, tmp_path / "deep-index")
    (deep / "model.safetensors.index.json").write_text(json.dumps(index)[:-1] + ', "x": ' + "[" * 100_000
                                                       + "]" * 100_000 + "}")
    one_error_line(run("inspect", deep), "nested too deeply")


def test_requests_file_with_invalid_utf8(base: Path, tmp_path: Path) -> None:
    requests = tmp_path / "r.jsonl"
    requests.write_bytes(b'{"prompt": "caf\xe9 is", "subject": "caf", "target_new": "x"}\n')
    one_error_line(run("edit", base, "--requests", requests, "-o", tmp_path / "e.safetensors"), str(requests),
                   "not UTF-8", "offset 15")


def test_index_entries_outside_the_model_folder(base: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2, 2)}, other)
    folder = tmp_path / "m" / "model"
    shutil.copytree(base, folder)
    for name in ("../../other.safetensors", str(other)):
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": name}}))
        one_error_line(run("inspect", folder), "not a file inside the model folder", name)


def test_refused_pickle_is_one_line(tmp_path: Path) -> None:
    folder = tmp_path / "pickled"
    folder.mkdir()
    torch.save({"w": torch.zeros(2, 2), "path": Path("not/a/tensor")}, folder / "pytorch_model.bin")
    one_error_line(run("inspect", folder, "--allow-pickle"), "cannot read pickle checkpoint")


def test_prune_of_a_restrained_delta_warns(base: Path, tmp_path: Path) -> None:
    out, inp = _shape(base)
    d = write_delta(base, tmp_path / "d.safetensors", torch.randn(out, 1) * 50, torch.randn(inp, 1))
    once, twice = tmp_path / "once.safetensors", tmp_path / "twice.safetensors"
    first = run("prune", base, d, "-o", once)
    assert first.exit_code == 0 and "already restrained" not in first.stderr
    second = run("prune", base, once, "-o", twice)
    assert second.exit_code == 0 and "already restrained 1 time(s)" in second.stderr


def test_disk_full_is_one_line(base: Path, tmp_path: Path) -> None:
    """A write that fails for lack of space (here: a file-size limit, which fails the same way) names the output."""
    out, inp = _shape(base)
    d = write_delta(base, tmp_path / "d.safetensors", torch.randn(out, 1), torch.randn(inp, 1))
    target = tmp_path / "applied"
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096)); "
            "from prunecli.cli import app; sys.argv = ['prunecli', *sys.argv[1:]]; app()")
    result = subprocess.run([sys.executable, "-c", code, "apply", str(base), str(d), "-o", str(target)],
                            capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: cannot write") and str(target) in lines[0] and "nothing was written" in lines[0]
    assert not target.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".applied.")]


def test_no_space_left_is_named(base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import prunecli.core.artifacts as artifacts  # the one writer of prunecli files

    def full(path: Path, *args: object) -> None:
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    out, inp = _shape(base)
    d = write_delta(base, tmp_path / "d.safetensors", torch.randn(out, 1) * 50, torch.randn(inp, 1))
    monkeypatch.setattr(artifacts, "write_safetensors", full)
    target = tmp_path / "p.safetensors"
    one_error_line(run("prune", base, d, "-o", target), "No space left on device", str(target),
                   notes=True)
    assert not target.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".p.safetensors.")]


def test_error_text_is_not_markup(capsys: pytest.CaptureFixture[str]) -> None:
    import typer

    from prunecli.commands._errors import run_guarded

    def body() -> None:
        raise PruneCliError("factors must be [out, r] and [in, r], got [/] and [bold]")

    with pytest.raises(typer.Exit):
        run_guarded(False, body)
    assert "factors must be [out, r] and [in, r], got [/] and [bold]" in capsys.readouterr().err



def test_a_delta_altered_after_writing_is_refused(base: Path, tmp_path: Path) -> None:
    """Every `::A` factor set to 3e38 with the metadata kept: `apply` used to write weights of 7e37 with exit 0."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    good = write_delta(base, tmp_path / "good.safetensors", torch.randn(32, 1), torch.randn(96, 1) * 1e-3)
    with safe_open(str(good), framework="pt") as fh:
        metadata = fh.metadata()
    tensors = {k: torch.full_like(t, 3e38) if k.endswith("::A") else t for k, t in load_file(good).items()}
    save_file(tensors, tmp_path / "altered.safetensors", metadata=metadata)
    out = tmp_path / "out"
    one_error_line(run("apply", base, tmp_path / "altered.safetensors", "-o", out), f"{WEIGHT}::A",
                   "does not match the digest", notes=True)
    assert not out.exists()
