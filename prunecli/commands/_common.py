"""What every command shares: error handling, JSON output, consoles, progress bars, common options.

Commands import torch/transformers inside their bodies, never at module level, so `prunecli --help` starts instantly.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Annotated, Any, TypeVar

import click
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from prunecli.commands._progress import LineProgress
from prunecli.errors import PruneCliError
from prunecli.jsonio import dumps_json

T = TypeVar("T")

err_console = Console(stderr=True)
"""Logs, warnings and progress: stderr, so stdout stays clean for `--json | jq`."""

DebugOpt = Annotated[bool, typer.Option("--debug", help="Show full tracebacks instead of one-line errors.",
                                        envvar="PRUNECLI_DEBUG")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one machine-readable JSON object on stdout.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite an existing output.")]
AllowPickleOpt = Annotated[bool, typer.Option("--allow-pickle", help="Allow pickle (.bin/.pt) weights; they can run "
                                              "code when loaded, and are read with weights_only=True.")]
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


def guarded(debug: bool, body: Callable[[], T]) -> T:
    """Run a command body: user errors become one red line and exit 1; bugs too unless --debug."""
    try:
        return body()
    except (typer.Exit, typer.Abort, typer.BadParameter, click.exceptions.ClickException, click.exceptions.Abort):
        raise  # usage errors keep Typer's exit code 2 (Typer >= 0.26 raises its own vendored Click classes)
    except PruneCliError as exc:
        if debug:
            raise
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err_console.print("[bold red]interrupted[/] (no output was written)")
        raise typer.Exit(130) from None
    except Exception as exc:  # noqa: BLE001 - the point is to catch everything at the boundary
        if debug:
            raise
        err_console.print(f"[bold red]error:[/] {type(exc).__name__}: {exc} (run with --debug for the traceback)",
                          highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None


def emit_json(obj: Any) -> None:
    """Print one JSON document on stdout."""
    sys.stdout.write(dumps_json(obj) + "\n")
    sys.stdout.flush()


def warn(message: str) -> None:
    err_console.print(f"[yellow]warning:[/] {message}", highlight=False, soft_wrap=True)


def note(message: str) -> None:
    err_console.print(f"[dim]{message}[/]", highlight=False, soft_wrap=True)


def progress_bar(extra_columns: Iterable[Any] = ()) -> Progress | LineProgress:
    """Progress on stderr: a rich bar on a terminal, plain lines in a log file (`_progress.LineProgress`), nothing
    when PRUNECLI_NO_PROGRESS is set."""
    if not err_console.is_terminal and not os.environ.get("PRUNECLI_NO_PROGRESS"):
        return LineProgress(err_console)
    return Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), *extra_columns, console=err_console,
                    transient=False, disable=bool(os.environ.get("PRUNECLI_NO_PROGRESS")))


def track(items: Iterable[T], total: int, description: str) -> Iterator[T]:
    """Iterate with a progress bar on stderr."""
    with progress_bar() as bar:
        task = bar.add_task(description, total=total)
        for item in items:
            yield item
            bar.advance(task)
