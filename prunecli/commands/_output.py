"""What a command shows: its result on stdout (a table, or one JSON object with --json), everything else on stderr.

Data goes to stdout and nothing else does, so `prunecli inspect ... --json | jq` works; logs, warnings and progress go
to stderr. User-supplied text (tensor names, paths, prompts) may contain rich markup characters (`[`, `]`, `[/]`),
so it is always printed literally. Tables follow one width rule: a terminal's own width, and `PIPED_WIDTH` columns
when stdout is a file or a pipe (rich would otherwise squeeze every table into 80).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Column, Table
from rich.text import Text

from prunecli.jsonio import dumps_json

PIPED_WIDTH = 160


class _PipeConsole(Console):
    """A console for which a closed pipe (`prunecli ... | head -1`) is a BrokenPipeError, which the error boundary
    (`_errors.run_guarded`) ends quietly with exit 0; rich's own reaction is to exit 1."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        raise BrokenPipeError


err_console = _PipeConsole(stderr=True)
"""Logs, warnings and progress: stderr, so stdout stays clean for `--json | jq`."""


def one_line(text: str) -> str:
    """Text for one terminal line: newlines folded, rich markup escaped."""
    return escape(" ".join(str(text).split()))


def warn(message: str) -> None:
    """One yellow line on stderr; `message` is printed literally."""
    err_console.print(f"[yellow]warning:[/] {one_line(message)}", highlight=False, soft_wrap=True)


def note(message: str) -> None:
    """A dim log line on stderr; `message` is printed literally."""
    err_console.print(f"[dim]{escape(message)}[/]", highlight=False, soft_wrap=True)


def say(message: str) -> None:
    """A plain log line on stderr; `message` is printed literally."""
    err_console.print(escape(message), highlight=False, soft_wrap=True)


def error(message: str) -> None:
    """The one red `error:` line of a failed command."""
    err_console.print(f"[bold red]error:[/] {one_line(message)}", highlight=False, soft_wrap=True)


def cell(value: object) -> Text:
    """A table cell shown literally: tensor names, paths and prompts may contain `[...]`."""
    return Text(str(value))


def number(x: float | None) -> str:
    """A measured quantity in a table: 4 significant digits, '-' where there is none."""
    return "-" if x is None else f"{x:.4g}"


def emit_json(obj: Any) -> None:
    """Print one JSON document on stdout (non-finite floats as "nan"/"inf", see `prunecli.jsonio`)."""
    sys.stdout.write(dumps_json(obj) + "\n")
    sys.stdout.flush()


def stdout_console() -> Console:
    """The console tables are printed on (see the module docstring for its width)."""
    console = _PipeConsole()
    if not console.is_terminal:
        console.width = PIPED_WIDTH
    return console


@dataclass(frozen=True)
class Output:
    """A command's output channel: `--json` decides whether its result is a JSON object or a table."""

    json: bool = False

    def result(self, obj: Any, render: Callable[[], None]) -> None:
        """The command's result: `obj` as one JSON object with --json, else whatever `render` prints."""
        if self.json:
            emit_json(obj)
        else:
            render()

    @staticmethod
    def table(title: str | Text | None, columns: Sequence[str | Column], rows: Iterable[Sequence[Any]],
              right: Iterable[str] = ()) -> None:
        """Print a table on stdout; columns named in `right` are right-aligned (numbers), cells are literal text
        unless they are already rich renderables."""
        right = set(right)
        table = Table(*(Column(c, justify="right" if c in right else "left") if isinstance(c, str) else c
                        for c in columns), title=title)
        for row in rows:
            table.add_row(*(v if isinstance(v, Text) else cell(v) for v in row))
        stdout_console().print(table)

    warn = staticmethod(warn)
    note = staticmethod(note)
    say = staticmethod(say)
