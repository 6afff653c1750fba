"""What every command shares: error handling, JSON output, consoles, progress bars, common options.

Commands import torch/transformers inside their bodies, never at module level, so `prunecli --help` starts instantly.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Annotated, Any, TypeVar

import click
import typer
from rich.console import Console
from rich.markup import escape
from rich.text import Text
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

from prunecli.commands._progress import LineProgress
from prunecli.errors import PruneCliError, PruneCliWarning
from prunecli.jsonio import dumps_json
from prunecli.progress import Progress as ProgressProtocol
from prunecli.progress import track as track_items

T = TypeVar("T")

err_console = Console(stderr=True)
"""Logs, warnings and progress: stderr, so stdout stays clean for `--json | jq`."""

DebugOpt = Annotated[bool, typer.Option("--debug", help="Show full tracebacks instead of one-line errors.",
                                        envvar="PRUNECLI_DEBUG")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one machine-readable JSON object on stdout.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite an existing output (a regular file or a folder "
                                        "prunecli wrote; never an input).")]
IgnoreBaseMismatchOpt = Annotated[bool, typer.Option(
    "--ignore-base-mismatch", help="Accept deltas whose base fingerprints differ from these base weights (warns, "
    "naming the tensors that differ). Without it such a delta is an error.")]
AllowPickleOpt = Annotated[bool, typer.Option("--allow-pickle", help="Allow pickle (.bin/.pt) weights; they can run "
                                              "code when loaded, and are read with weights_only=True.")]
def _check_device(value: str) -> str:
    """A usage error (exit 2) for anything but auto, cpu, cuda, cuda:N or mps, before any work starts."""
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
        raise typer.BadParameter(f"{value!r} is not auto, cpu, cuda, cuda:N or mps")
    return value


DeviceOpt = Annotated[str, typer.Option(
    "--device", callback=_check_device, envvar="PRUNECLI_DEVICE",
    help="auto (a GPU when there is one, else the CPU), cpu, cuda, cuda:N or mps.")]
DeviceMapOpt = Annotated[str | None, typer.Option(
    "--device-map", help="Spread a model too big for one device over GPUs, CPU and disk with accelerate: auto, "
    "balanced, balanced_low_0, sequential, or one device (cpu, cuda:N). Replaces --device.")]
MaxMemoryOpt = Annotated[str | None, typer.Option(
    "--max-memory", help="With --device-map: memory per device, e.g. 0=20GiB,1=20GiB,cpu=60GiB (the rest goes to "
    "disk).")]
OffloadFolderOpt = Annotated[Path | None, typer.Option(
    "--offload-folder", help="With --device-map: folder accelerate may use for weights offloaded to disk "
    "(safetensors checkpoints are read in place; edits never write to disk-offloaded files).")]
TokenizerOpt = Annotated[str | None, typer.Option(
    "--tokenizer", metavar="PATH_OR_ALIAS", help="Tokenizer to use instead of the model folder's own (for folders "
    "saved without one): a folder, a tokenizer.json file, or a built-in model name (smollm2, gemma3-270m).")]


class Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an interrupt so it cleans up exactly like Ctrl-C."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated()


def _one_line(text: str) -> str:
    """Error text for one terminal line: newlines folded, rich markup escaped (paths may hold `[`, `]`, `[/]`)."""
    return escape(" ".join(str(text).split()))


def _interrupt_message(exc: KeyboardInterrupt) -> str:
    from prunecli.core.atomic import committed_outputs

    what = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
    done = committed_outputs()
    if not done:
        return f"{what}: no output was written"
    return f"{what}: {', '.join(map(str, done))} had been written completely; nothing else was written"


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: object = None, line: str | None = None) -> None:
    warn(str(message))


BaseDeltaArgs = Annotated[list[str], typer.Argument(
    metavar="BASE DELTA", help="The base checkpoint the delta was made for (folder, .safetensors file, or a built-in "
    "name such as `smollm2`), then the delta file (or PEFT adapter folder), as in apply and diff.")]
BaseOldOpt = Annotated[str | None, typer.Option("--base", hidden=True)]
SelectOpt = Annotated[list[str] | None, typer.Option(
    "--select", "-s", help="Only the delta entries whose tensor name matches this glob (repeatable).")]


def base_and_delta(paths: list[str], base_old: str | None) -> tuple[str, Path]:
    """BASE DELTA, or the older `DELTA --base BASE` that scripts may still use."""
    if base_old is not None:
        if len(paths) != 1:
            raise typer.BadParameter("with --base give only DELTA (or write BASE DELTA, base first)")
        return base_old, Path(paths[0])
    if len(paths) != 2:
        raise typer.BadParameter("give BASE DELTA: the base checkpoint first, then the delta")
    return paths[0], Path(paths[1])


def either(new: T | None, old: T | None, new_name: str, old_name: str) -> T | None:
    """An option given under its name or under the old spelling that scripts may still use (hidden in --help)."""
    if new is not None and old is not None:
        raise typer.BadParameter(f"{old_name} is the old spelling of {new_name}: give only one of them")
    return new if new is not None else old


def guarded(debug: bool, body: Callable[[], T]) -> T:
    """Run a command body: user errors become one red line and exit 1; bugs too unless --debug.

    SIGTERM behaves like Ctrl-C (temporary files are removed, the message says what is on disk), and library
    warnings (`PruneCliWarning`) are printed as one yellow line each.
    """
    previous = signal.getsignal(signal.SIGTERM)
    if previous is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", PruneCliWarning)
            warnings.showwarning = _show_warning
            return body()
    except (typer.Exit, typer.Abort, typer.BadParameter, click.exceptions.ClickException, click.exceptions.Abort):
        raise  # usage errors keep Typer's exit code 2 (Typer >= 0.26 raises its own vendored Click classes)
    except PruneCliError as exc:
        if debug:
            raise
        err_console.print(f"[bold red]error:[/] {_one_line(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt as exc:
        err_console.print(f"[bold red]{_one_line(_interrupt_message(exc))}[/]", highlight=False, soft_wrap=True)
        raise typer.Exit(143 if isinstance(exc, Terminated) else 130) from None
    except Exception as exc:  # noqa: BLE001 - the point is to catch everything at the boundary
        if debug:
            raise
        err_console.print(f"[bold red]error:[/] {_one_line(f'{type(exc).__name__}: {exc}')} (run with --debug for "
                          "the traceback)", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    finally:
        if previous is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, previous)


def emit_json(obj: Any) -> None:
    """Print one JSON document on stdout."""
    sys.stdout.write(dumps_json(obj) + "\n")
    sys.stdout.flush()


def warn(message: str) -> None:
    """One yellow line on stderr; `message` is printed literally (no rich markup)."""
    err_console.print(f"[yellow]warning:[/] {_one_line(message)}", highlight=False, soft_wrap=True)


def note(message: str) -> None:
    """A dim log line on stderr; `message` is printed literally (no rich markup)."""
    err_console.print(f"[dim]{escape(message)}[/]", highlight=False, soft_wrap=True)


def say(message: str) -> None:
    """A plain log line on stderr; `message` is printed literally (no rich markup)."""
    err_console.print(escape(message), highlight=False, soft_wrap=True)


def cell(value: object) -> Text:
    """A table cell shown literally: tensor names, paths and prompts may contain `[...]`."""
    return Text(str(value))


def _progress_display() -> Progress | LineProgress:
    """A rich bar on a terminal, plain lines in a log file (`_progress.LineProgress`), nothing when
    PRUNECLI_NO_PROGRESS is set."""
    if not err_console.is_terminal and not os.environ.get("PRUNECLI_NO_PROGRESS"):
        return LineProgress(err_console)
    return Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), _RateColumn(), _FieldsColumn(), console=err_console,
                    transient=False, disable=bool(os.environ.get("PRUNECLI_NO_PROGRESS")))


class _RateColumn(ProgressColumn):
    """Items per second (seconds per item when slow), the throughput of the task."""

    def render(self, task: Task) -> Text:
        if not task.speed:
            return Text("")
        rate = f"{1 / task.speed:.1f} s/item" if task.speed < 1 else f"{task.speed:,.1f}/s"
        return Text(rate, style="progress.data.speed")


class _FieldsColumn(ProgressColumn):
    """The text fields a task reports (`task.advance(loss="...")`)."""

    def render(self, task: Task) -> Text:
        return Text(" ".join(str(v) for v in task.fields.values() if str(v)))


class _DisplayTask:
    """A `prunecli.progress.ProgressTask` drawn by the display."""

    def __init__(self, display: Progress | LineProgress, task_id: Any) -> None:
        self.display, self.task_id = display, task_id

    def advance(self, n: float = 1, **fields: str) -> None:
        self.display.update(self.task_id, advance=n, **fields)

    def update(self, *, completed: float | None = None, total: float | None = None, **fields: str) -> None:
        self.display.update(self.task_id, completed=completed, total=total, **fields)

    def log(self, message: str, *, warning: bool = False) -> None:
        (warn if warning else say)(message)


@contextlib.contextmanager
def cli_progress() -> Iterator[ProgressProtocol]:
    """The CLI's renderer of the library's progress protocol (`prunecli.progress`): a command opens it around the
    library call and passes it down; every task the library opens becomes a bar (a log line in a file)."""
    with _progress_display() as display:
        @contextlib.contextmanager
        def open_task(description: str, total: float | None = None) -> Iterator[_DisplayTask]:
            yield _DisplayTask(display, display.add_task(description, total=total or None))

        yield open_task


def track(items: Iterable[T], total: int, description: str) -> Iterator[T]:
    """Iterate with a progress bar on stderr."""
    with cli_progress() as progress:
        yield from track_items(progress, items, description, total)
