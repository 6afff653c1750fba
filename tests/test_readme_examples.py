"""The documentation stays true to the code: every `prunecli ...` example in the bash blocks of README.md and docs/*.md
parses (its subcommand, options and argument counts exist; the command body is not run, that needs the real models
and data) and uses no deprecated spelling; the README shows every command; every relative link points to a file (and
heading) that exists; the Python examples of docs/LIBRARY.md compile and name real options."""

from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import typer
from typer._click import exceptions as click_exceptions

import prunecli.api
from prunecli.cli import app

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
COMMANDS: dict[str, Any] = typer.main.get_command(app).commands  # type: ignore[attr-defined]


def _blocks(page: Path, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", page.read_text(), re.S)


def _examples(page: Path) -> list[str]:
    lines = []
    for block in _blocks(page, "bash"):
        for line in block.replace("\\\n", " ").splitlines():  # a trailing backslash continues the line
            command = re.split(r" #| \| | > | && ", line)[0].strip()
            if command.startswith("prunecli ") and not command.split()[1].startswith("-"):
                lines.append(command)
    return lines


EXAMPLES = [(page.relative_to(ROOT).as_posix(), line) for page in PAGES for line in _examples(page)]


def test_the_docs_have_examples() -> None:
    assert len(EXAMPLES) >= 30


def test_the_readme_shows_every_command() -> None:
    shown = {shlex.split(line)[1] for line in _examples(README)}
    assert set(COMMANDS) <= shown, f"no README example of {sorted(set(COMMANDS) - shown)}"


def _hidden_spellings(command: Any) -> set[str]:
    """The deprecated spellings: options kept for old scripts but hidden from --help."""
    return {name for p in command.params if getattr(p, "hidden", False) for name in (*p.opts, *p.secondary_opts)}


@pytest.mark.parametrize(("page", "line"), EXAMPLES)
def test_example_parses(page: str, line: str) -> None:
    args = shlex.split(line)[1:]
    command = COMMANDS.get(args[0])
    assert command is not None, f"{page}: no subcommand {args[0]!r}"
    old = [a for a in args[1:] if a.split("=")[0] in _hidden_spellings(command)]
    assert not old, f"{page}: {line}: deprecated spelling {old}"
    try:
        with command.make_context(args[0], args[1:]):
            pass
    except click_exceptions.UsageError as exc:
        pytest.fail(f"{page}: {line}: {exc}")


# ------------------------------------------------------------------------------------------------- links
def _prose(page: Path) -> str:
    """The page without its fenced code blocks (a link or heading inside one is code, not Markdown)."""
    return re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)


def _anchors(page: Path) -> set[str]:
    """The heading anchors GitHub makes: lower case, punctuation but hyphens dropped, spaces as hyphens, repeats
    numbered."""
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6} +(.+?) *$", _prose(page), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        seen[slug] = seen.get(slug, -1) + 1
        if seen[slug]:
            seen[f"{slug}-{seen[slug]}"] = 0
    return set(seen)


LINKS = [(page.relative_to(ROOT).as_posix(), target) for page in PAGES
         for target in re.findall(r"\]\(([^)\s]+)\)", _prose(page)) if not re.match(r"[a-z]+:", target)]


def test_the_docs_link_each_other() -> None:
    assert len(LINKS) >= 20


@pytest.mark.parametrize(("page", "target"), LINKS)
def test_relative_link_resolves(page: str, target: str) -> None:
    path, _, anchor = target.partition("#")
    file = (ROOT / page).parent / path if path else ROOT / page
    assert file.exists(), f"{page}: {target}: no file {file.relative_to(ROOT)}"
    if anchor and file.suffix == ".md":
        assert anchor in _anchors(file), f"{page}: {target}: no heading #{anchor} in {file.relative_to(ROOT)}"


# ------------------------------------------------------------------------------------------------- Python examples
PY_BLOCKS = [(page.relative_to(ROOT).as_posix(), block) for page in (README, ROOT / "docs" / "LIBRARY.md")
             for block in _blocks(page, "python")]


@pytest.mark.parametrize(("page", "block"), PY_BLOCKS)
def test_python_example_names_real_options(page: str, block: str) -> None:
    """Each block compiles, imports what exists, and gives the options classes only fields they have."""
    tree = ast.parse(block)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "prunecli.api":
            missing = [a.name for a in node.names if not hasattr(prunecli.api, a.name)]
            assert not missing, f"{page}: prunecli.api has no {missing}"
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and hasattr(prunecli.api, node.func.id):
            cls = getattr(prunecli.api, node.func.id)
            fields = getattr(cls, "__dataclass_fields__", None)
            if fields is None:
                continue
            unknown = [k.arg for k in node.keywords if k.arg not in fields]
            assert not unknown, f"{page}: {node.func.id} has no field(s) {unknown}"
            assert len(node.args) <= len(fields), f"{page}: {node.func.id} takes at most {len(fields)} arguments"
