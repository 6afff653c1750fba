"""The error boundary every command runs inside: one red line and exit 1 for a user error, never a traceback unless
--debug; usage errors keep Typer's exit 2; Ctrl-C and SIGTERM say what is on disk (exit 130 / 143).

`guarded` is the decorator that makes a function a command: its option groups are expanded (`_options`), `--debug`
is added, and the body runs inside the boundary.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import signal
import warnings
from collections.abc import Callable, Iterator
from typing import Annotated, Any, TypeVar

import click
import typer

from prunecli.commands._options import with_option_groups
from prunecli.commands._output import err_console, error, note, one_line, warn
from prunecli.errors import PruneCliError, PruneCliWarning, Terminated

F = TypeVar("F", bound=Callable[..., Any])

Debug = Annotated[bool, typer.Option("--debug", envvar="PRUNECLI_DEBUG",
                                     help="Show full tracebacks instead of one-line errors.")]


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated()


def interrupt_message(exc: KeyboardInterrupt) -> str:
    """What an interrupted command leaves on disk: only outputs that had been committed completely, or what the
    command said it kept (a note on the interrupt, e.g. `edit`'s finished edits)."""
    from prunecli.core.atomic import committed_outputs

    what = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
    notes = getattr(exc, "__notes__", None)
    if notes:
        return f"{what}: {notes[-1]}"
    done = committed_outputs()
    if not done:
        return f"{what}: no output was written"
    return f"{what}: {', '.join(map(str, done))} had been written completely; nothing else was written"


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: object = None, line: str | None = None) -> None:
    warn(str(message))


class _NoteHandler(logging.Handler):
    """The library's `prunecli` log (what it is doing: loading, defaults chosen) as dim lines on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        note(record.getMessage())


@contextlib.contextmanager
def _library_notes() -> Iterator[None]:
    logger = logging.getLogger("prunecli")
    handler, level, propagate = _NoteHandler(), logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def run_guarded(debug: bool, body: Callable[[], Any]) -> Any:
    """Run a command body inside the boundary (see the module docstring). Library warnings (`PruneCliWarning`)
    are printed as one yellow line each, the library's log lines as notes."""
    previous = signal.getsignal(signal.SIGTERM)
    if previous is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        with warnings.catch_warnings(), _library_notes():
            warnings.simplefilter("always", PruneCliWarning)
            warnings.showwarning = _show_warning
            return body()
    except (typer.Exit, typer.Abort, typer.BadParameter, click.exceptions.ClickException, click.exceptions.Abort):
        raise  # usage errors keep Typer's exit code 2 (Typer >= 0.26 raises its own vendored Click classes)
    except BrokenPipeError:  # `prunecli ... | head`: the reader has what it wanted; a closed pipe is no error
        _silence_stdout()
        return None
    except PruneCliError as exc:
        if debug:
            raise
        error(str(exc))
        raise typer.Exit(1) from None
    except KeyboardInterrupt as exc:
        err_console.print(f"[bold red]{one_line(interrupt_message(exc))}[/]", highlight=False, soft_wrap=True)
        raise typer.Exit(143 if isinstance(exc, Terminated) else 130) from None
    except Exception as exc:
        if debug:
            raise
        error(f"{type(exc).__name__}: {exc} (run with --debug for the traceback)")
        raise typer.Exit(1) from None
    finally:
        if previous is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, previous)


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail on the closed pipe again."""
    import os
    import sys

    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    finally:
        os.close(devnull)


def guarded(fn: F) -> F:
    """Make `fn` a command: option groups expanded, `--debug` added, the body run inside the error boundary."""
    command = with_option_groups(fn)

    @functools.wraps(command)
    def boundary(*, debug: bool = False, **values: Any) -> Any:
        return run_guarded(debug, lambda: command(**values))

    params = [*inspect.signature(command).parameters.values(),
              inspect.Parameter("debug", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Debug)]
    boundary.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    boundary.__annotations__ = {**command.__annotations__, "debug": Debug}
    return boundary  # type: ignore[return-value]
