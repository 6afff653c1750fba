"""Every `Example:` of every command's --help is one line at 80 columns and runs as printed, and so does the
README's quick start: what a newcomer pastes first.

The examples chain (stats -> anchor -> edit -> prune -> apply -> diff -> inspect -> evaluate -> compare ->
export-lora -> train-mend), so they run in that order in one fresh folder outside the repository, with
PRUNECLI_DATA_DIR set to the shared data, on the real SmolLM2 (slow). The quick start runs first, in its own empty
folder, with its `export PRUNECLI_DATA_DIR=...` line pointing at the shared data; an example identical to one of its
commands (the key statistics) is not run twice: its output is linked over.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from prunecli.cli import app, command_help

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CHAIN = ["stats", "anchor", "edit", "prune", "apply", "diff", "inspect", "evaluate", "compare", "export-lora",
         "train-mend"]
runner = CliRunner()


def help_examples(command: str) -> list[str]:
    """The examples `prunecli COMMAND --help` prints at 80 columns, each checked to be one whole line."""
    result = runner.invoke(app, [command, "--help"], terminal_width=80, env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    examples = []
    for i, line in enumerate(lines):
        if line.strip().startswith("Example:"):
            example = line.strip().removeprefix("Example:").strip()
            assert example.startswith(("prunecli ", "accelerate launch")), line
            assert i + 1 == len(lines) or not lines[i + 1].strip(), f"wrapped: {line!r} then {lines[i + 1]!r}"
            examples.append(example)
    return examples


def test_every_command_has_examples_printed_whole_at_80_columns() -> None:
    commands = typer.main.get_command(app).commands
    assert sorted(commands) == sorted(CHAIN)  # a new command joins the chain below
    for name, command in commands.items():
        documented = [p.removeprefix("\b\nExample:").strip() for p in command_help(command.callback.__doc__ or "")
                      .split("\n\n") if p.startswith("\b\nExample:")]
        assert documented and help_examples(name) == documented, name


def _env(**extra: str) -> dict[str, str]:
    """The test's environment with this interpreter's `prunecli` first on PATH (PYTHONPATH is inherited)."""
    env = {k: v for k, v in os.environ.items() if k != "PRUNECLI_DATA_DIR"}
    return {**env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", **extra}


def _quickstart_script(data: Path) -> str:
    block = re.search(r"<!-- quickstart -->\n```bash\n(.*?)```\n<!-- /quickstart -->", README.read_text(), re.S)
    assert block, "README.md has no quick-start block"
    script, replaced = re.subn(r"^export PRUNECLI_DATA_DIR=.*$", f"export PRUNECLI_DATA_DIR={shlex.quote(str(data))}",
                               block[1], flags=re.M)
    assert replaced == 1
    return script


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> tuple[Path, str, str]:
    """(folder, script, stderr) of the README's quick start run as printed (bash -e) from an empty folder."""
    folder = tmp_path_factory.mktemp("quickstart")
    assert not folder.resolve().is_relative_to(ROOT) and not any(folder.iterdir())
    script = _quickstart_script(shared_data)
    result = subprocess.run(["bash", "-e", "-c", script], cwd=folder, env=_env(), capture_output=True, text=True,
                            timeout=1800)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    return folder, script, result.stderr


@pytest.mark.slow
def test_the_readme_quick_start_runs_as_printed(quickstart: tuple[Path, str, str]) -> None:
    folder, _, stderr = quickstart
    assert {p.name for p in folder.iterdir()} >= {"facts.jsonl", "smollm2.stats.safetensors", "edits.safetensors",
                                                  "pruned.safetensors"}
    assert "every edit took" in stderr


@pytest.mark.slow
def test_every_help_example_runs_as_printed(quickstart: tuple[Path, str, str], tmp_path: Path,
                                            shared_data: Path) -> None:
    done, script, _ = quickstart
    folder = tmp_path / "examples"
    folder.mkdir()
    env = _env(PRUNECLI_DATA_DIR=str(shared_data))
    ran = []
    for command in CHAIN:
        for example in help_examples(command):
            if not example.startswith("prunecli "):
                continue  # accelerate launch: several processes, not runnable here
            if example in script.splitlines():  # the same command the quick start ran: link its output over
                output = shlex.split(example)[shlex.split(example).index("-o") + 1]
                os.link(done / output, folder / output)
                continue
            result = subprocess.run(["bash", "-c", example], cwd=folder, env=env, capture_output=True, text=True,
                                    timeout=900)
            assert result.returncode == 0, (example, result.stderr[-3000:])
            ran.append(example)
    assert len(ran) >= 15
