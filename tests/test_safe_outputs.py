"""Issue 11, outputs: an output is never, never holds and never sits inside an input (symlinks and hard links seen
through); --force replaces only regular files and folders prunecli wrote; --force no longer silences the base check
(--ignore-base-mismatch does, with a warning); every output follows the umask; markup-laden paths print literally."""

from __future__ import annotations

import json
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from editing_helpers import RECORDS, TINY_SETS
from helpers import random_delta
from safetensors.torch import save_file
from typer.testing import CliRunner

from prunecli.cli import app
from prunecli.core.checkpoint import Checkpoint
from prunecli.core.delta import Delta, DeltaEntry

runner = CliRunner()
WEIGHT = "model.layers.1.mlp.down_proj.weight"


def run(*args: object) -> object:
    return runner.invoke(app, [str(a) for a in args])


def one_error_line(result: object, *words: str) -> str:
    assert result.exit_code == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def snapshot(*roots: Path) -> dict[str, tuple[int, bytes]]:
    """Every entry under `roots` (and the roots' parents, to catch stray temp files): mode and bytes."""
    seen: dict[str, tuple[int, bytes]] = {}
    for root in roots:
        for p in [root.parent, *(root.parent.rglob("*"))]:
            st = os.lstat(p)
            seen[str(p)] = (st.st_mode, p.read_bytes() if stat.S_ISREG(st.st_mode) else b"")
    return seen


@pytest.fixture()
def setup(tmp_path: Path, llama_dir: Path) -> Iterator[dict[str, Path]]:
    base = tmp_path / "base"
    shutil.copytree(llama_dir, base)
    work = tmp_path / "work"
    work.mkdir()
    delta = random_delta(base, WEIGHT, work / "d.safetensors", 3, requests=[])
    folder = tmp_path / "dir"
    folder.mkdir()
    shutil.copy(delta, folder / "d.safetensors")
    (folder / "notes.txt").write_text("unrelated")
    single = tmp_path / "single"
    single.mkdir()
    save_file({WEIGHT: torch.randn(4, 4)}, single / "a.safetensors")
    save_file({WEIGHT: torch.randn(4, 4)}, single / "b.safetensors")
    yield {"base": base, "delta": delta, "dir": folder, "single": single, "tmp": tmp_path}


def _cases(s: dict[str, Path]) -> dict[str, tuple[list[object], list[str]]]:
    b, d, folder, single = s["base"], s["delta"], s["dir"], s["single"]
    link = s["tmp"] / "link.safetensors"
    link.symlink_to(d)
    hard = s["tmp"] / "hard.safetensors"
    os.link(d, hard)
    return {
        "prune into the base folder": (["prune", b, d, "-o", b / "model.safetensors"], [str(b)]),
        "export-lora over the base": (["export-lora", b, d, "-o", b], [str(b)]),
        "apply into the delta's folder": (["apply", b, folder / "d.safetensors", "-o", folder], [str(folder)]),
        "inspect plot over the delta": (["inspect", b, "--delta", d, "--plot", d], [str(d)]),
        "prune over the delta": (["prune", b, d, "-o", d], [str(d)]),
        "diff over its base file": (["diff", single / "a.safetensors", single / "b.safetensors", "-o",
                                     single / "a.safetensors"], [str(single / "a.safetensors")]),
        "prune over a symlink to the delta": (["prune", b, d, "-o", link], [str(link), str(d)]),
        "prune over a hard link of the delta": (["prune", b, d, "-o", hard], [str(hard), str(d)]),
    }


@pytest.mark.parametrize("case", ["prune into the base folder", "export-lora over the base",
                                  "apply into the delta's folder", "inspect plot over the delta",
                                  "prune over the delta", "diff over its base file",
                                  "prune over a symlink to the delta", "prune over a hard link of the delta"])
def test_destructive_reproducers_are_refused(setup: dict[str, Path], case: str) -> None:
    args, named = _cases(setup)[case]
    before = snapshot(setup["base"], setup["dir"], setup["single"], setup["delta"])
    line = one_error_line(run(*args, "--force"), "refusing to write", *named)
    assert before == snapshot(setup["base"], setup["dir"], setup["single"], setup["delta"]), line


def test_non_regular_outputs_are_never_replaced(setup: dict[str, Path]) -> None:
    fifo = setup["tmp"] / "fifo"
    os.mkfifo(fifo)
    targets = [fifo]
    if os.geteuid() == 0:  # as root a device node can be made (and would be replaced by today's code)
        node = setup["tmp"] / "null-device"
        os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 3))
        targets.append(node)
    for target in targets:
        one_error_line(run("prune", setup["base"], setup["delta"], "-o", target, "--force"),
                       "not a regular file", str(target))
        assert not stat.S_ISREG(os.lstat(target).st_mode)


def test_force_replaces_only_folders_prunecli_wrote(setup: dict[str, Path]) -> None:
    mine = setup["tmp"] / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    one_error_line(run("apply", setup["base"], setup["delta"], "-o", mine, "--force"), "did not write", str(mine))
    assert [p.name for p in mine.iterdir()] == ["keep.txt"]
    out = setup["tmp"] / "out"
    assert run("apply", setup["base"], setup["delta"], "-o", out).exit_code == 0
    assert run("apply", setup["base"], setup["delta"], "-o", out, "--force").exit_code == 0
    lora = setup["tmp"] / "lora"
    assert run("export-lora", setup["base"], setup["delta"], "-o", lora).exit_code == 0
    assert run("export-lora", setup["base"], setup["delta"], "-o", lora, "--force").exit_code == 0


def test_force_no_longer_skips_the_base_check(setup: dict[str, Path]) -> None:
    """The re-run trap: `apply EDITED_MODEL edits -o X --force` must not apply the edits a second time; the refusal
    says the model already contains the delta (its shards record what apply merged), not "another base"."""
    edited = setup["tmp"] / "edited"
    assert run("apply", setup["base"], setup["delta"], "-o", edited).exit_code == 0
    again = setup["tmp"] / "again"
    for cmd in (["apply", edited, setup["delta"], "-o", again], ["prune", edited, setup["delta"], "-o",
                                                                 setup["tmp"] / "p.safetensors"],
                ["inspect", edited, "--delta", setup["delta"]],
                ["export-lora", edited, setup["delta"], "-o", setup["tmp"] / "l"]):
        line = one_error_line(run(*cmd, "--force"), f"{edited} already contains this delta (applied by prunecli: "
                              f"{setup['delta']})", WEIGHT, f"use the base it was made for ({setup['base']})")
        assert "another base" not in line and "--ignore-base-mismatch" not in line
        result = run(*cmd, "--ignore-base-mismatch")
        assert result.exit_code == 0, result.output
        assert "warning:" in result.stderr and WEIGHT in result.stderr
    # Another delta on the edited model: it contains edits, not this delta; a model another program wrote (no
    # record of what was applied) keeps the general message.
    other = random_delta(setup["base"], WEIGHT, setup["tmp"] / "other.safetensors", 5, requests=[])
    one_error_line(run("inspect", edited, "--delta", other), f"{edited} already contains edits (applied by prunecli")
    plain = setup["tmp"] / "plain"
    shutil.copytree(setup["base"], plain)
    weights = {n: Checkpoint(edited).get(n) for n in Checkpoint(edited).names()}
    save_file(weights, plain / "model.safetensors", metadata={"format": "pt"})
    one_error_line(run("inspect", plain, "--delta", setup["delta"]), "another base", "--ignore-base-mismatch")


def test_the_input_is_named_before_force_is_suggested(setup: dict[str, Path]) -> None:
    """`prune BASE D -o D` without --force: the output is the input, which --force would not change."""
    line = one_error_line(run("prune", setup["base"], setup["delta"], "-o", setup["delta"]), "refusing to write",
                          "it is the delta")
    assert "--force" not in line


def test_evaluate_and_edit_need_ignore_base_mismatch(setup: dict[str, Path], tmp_path: Path) -> None:
    edited = setup["tmp"] / "edited"
    assert run("apply", setup["base"], setup["delta"], "-o", edited).exit_code == 0
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 20)
    evaluate = ["evaluate", edited, "-d", setup["delta"], "-t", "perplexity", "--text", text, "--max-tokens", 32,
                "--device", "cpu"]
    one_error_line(run(*evaluate, "--force"), "already contains this delta (applied by prunecli")
    result = run(*evaluate, "--ignore-base-mismatch", "--json")
    assert result.exit_code == 0 and WEIGHT in result.stderr, result.output
    requests = tmp_path / "r.jsonl"
    requests.write_text(json.dumps(RECORDS[0]) + "\n")  # a request the tiny models' edits take
    edit = ["edit", edited, "--requests", requests, "--delta", setup["delta"], "--set", "layers=1",
            *[a for s in TINY_SETS for a in ("--set", s)], "-o", tmp_path / "e.safetensors"]
    one_error_line(run(*edit, "--force"), "already contains this delta (applied by prunecli")
    result = run(*edit, "--ignore-base-mismatch")
    assert result.exit_code == 0 and WEIGHT in result.stderr, result.output


def test_every_delta_command_has_the_same_option() -> None:
    for command in ("apply", "prune", "inspect", "evaluate", "edit", "export-lora"):
        result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
        assert "--ignore-base-mismatch" in result.stdout, command


@pytest.fixture()
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_outputs_follow_the_umask(setup: dict[str, Path], tmp_path: Path, umask_022: None) -> None:
    """(The built-in model cache is checked with the concurrent first use in tests/test_builtin_models.py.)"""
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 40)
    stats = tmp_path / "s.safetensors"
    assert run("stats", setup["base"], "--layers", "1", "--text", text, "--tokens", 64, "-o", stats).exit_code == 0
    lora = tmp_path / "lora"
    assert run("export-lora", setup["base"], setup["delta"], "-o", lora).exit_code == 0
    out = tmp_path / "applied"
    assert run("apply", setup["base"], setup["delta"], "-o", out).exit_code == 0
    assert _mode(stats) == 0o644
    assert _mode(lora) == 0o755 and _mode(out) == 0o755
    for f in [*lora.iterdir(), out / "model.safetensors"]:
        assert _mode(f) == 0o644, f


def test_unsigned_dtypes_are_read(tmp_path: Path) -> None:
    tensors = {"w": torch.randn(6, 5), "u16": torch.tensor([[1, 2, 65535], [4, 5, 6]], dtype=torch.uint16),
               "u32": torch.tensor([1, 2**31 + 5], dtype=torch.uint32),
               "u64": torch.tensor([2**63 + 7], dtype=torch.uint64)}
    path = tmp_path / "m.safetensors"
    save_file(tensors, path)
    ck = Checkpoint(path)
    for name, t in tensors.items():
        assert ck.info(name).dtype == {"w": "F32", "u16": "U16", "u32": "U32", "u64": "U64"}[name]
        assert ck.get(name).dtype == t.dtype and ck.get(name).tolist() == t.tolist()
    delta = Delta.for_base(ck)
    delta.add("w", DeltaEntry.lowrank(torch.ones(6, 1), torch.ones(5, 1), "out_in"), ck)
    dpath = tmp_path / "d.safetensors"
    delta.save(dpath)
    out = tmp_path / "out.safetensors"
    assert run("apply", path, dpath, "-o", out).exit_code == 0
    merged = Checkpoint(out)
    for name in ("u16", "u32", "u64"):
        assert merged.get(name).tolist() == tensors[name].tolist()
    assert run("inspect", path, "--json").exit_code == 0


@pytest.mark.parametrize("name", ["edits[v2].safetensors", "run[/]x.safetensors", "[bold]red[/bold].safetensors"])
def test_markup_laden_paths_print_literally(setup: dict[str, Path], tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    one_error_line(run("inspect", path), str(path))  # does not exist: the message names the very path
    shutil.copy(setup["delta"], path)
    assert run("inspect", path).exit_code == 0
    out = tmp_path / f"out-{name}"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = run("prune", setup["base"], path, "-o", out)
    assert result.exit_code == 0, result.output
    assert str(out) in result.stderr and Delta.load(out).restraints


def test_every_safetensors_output_goes_through_one_writer() -> None:
    """Issue 12: prunecli files go through `artifacts.write_artifact` (atomic_file), model and adapter folders through
    the same streaming writer inside `atomic_directory`; safetensors' own writers (0600 files, whole file in memory)
    are never used."""
    import ast

    root = Path(__file__).resolve().parent.parent / "prunecli"
    writers: dict[str, list[str]] = {}
    for path in root.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "safetensors.torch":
                raise AssertionError(f"{path} imports safetensors.torch")
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("write_safetensors", "write_artifact"):
                writers.setdefault(node.func.id, []).append(path.relative_to(root).as_posix())
    assert sorted(set(writers["write_safetensors"])) == ["core/artifacts.py", "core/checkpoint.py", "core/peft_io.py"]
    assert sorted(set(writers["write_artifact"])) == ["core/delta.py", "editors/mend/archive.py",
                                                      "editors/mend/train.py", "editors/nas.py", "editors/stats.py"]
