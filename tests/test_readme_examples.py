"""Every `prunecli ...` example in the README's bash blocks parses: its subcommand, options and argument counts exist
(the command body is not run; that needs the real models and data)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer
from typer._click import exceptions as click_exceptions

from prunecli.cli import app

README = Path(__file__).resolve().parents[1] / "README.md"


def _examples() -> list[str]:
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():  # a trailing backslash continues the line
            command = re.split(r" #| \| | > | && ", line)[0].strip()
            if command.startswith("prunecli ") and not command.split()[1].startswith("-"):
                lines.append(command)
    return lines


EXAMPLES = _examples()


def test_the_readme_has_examples() -> None:
    assert len(EXAMPLES) >= 30


@pytest.mark.parametrize("line", EXAMPLES)
def test_example_parses(line: str) -> None:
    args = shlex.split(line)[1:]
    command = typer.main.get_command(app).commands.get(args[0])
    assert command is not None, f"no subcommand {args[0]!r}"
    try:
        with command.make_context(args[0], args[1:]):
            pass
    except click_exceptions.UsageError as exc:
        pytest.fail(f"{line}: {exc}")
