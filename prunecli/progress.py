"""The one progress protocol of the library: long-running functions report what they do, the CLI renders it.

A function that takes a while accepts `progress: Progress = no_progress` and opens a task per unit of work:

    with progress("key statistics (tokens)", total_tokens) as task:
        ...
        task.advance(n, rate="1,200 tokens/s")   # keyword fields are shown next to the bar (strings)
        task.log("one line worth reading now")    # an event above the bar (warning=True for a warning)

The library never draws, prints or imports the CLI; notebooks and tests pass nothing (`no_progress`) or their own
callable. `commands/_display.cli_progress` renders tasks as a rich bar on a terminal and as timestamped lines in a
log file. This module sits below everything (core may import it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from typing import Protocol, TypeVar

T = TypeVar("T")

Advance = Callable[[int], None]
"""A task's `advance`, as inner batch loops receive it (`on_batch=task.advance`)."""


class ProgressTask(Protocol):
    """One running unit of work (a bar)."""

    def advance(self, n: float = 1, **fields: str) -> None:
        """`n` more items done; `fields` replace the task's shown text fields."""

    def update(self, *, completed: float | None = None, total: float | None = None, **fields: str) -> None:
        """Set the done count (a smaller one starts the task over, e.g. the next edit's optimisation steps), the
        total, or text fields."""

    def log(self, message: str, *, warning: bool = False) -> None:
        """An event worth a line of its own now (a failed edit, a validation result)."""


class Progress(Protocol):
    """Opens tasks: `with progress(description, total) as task: ...` (`total` None: unknown)."""

    def __call__(self, description: str, total: float | None = None) -> AbstractContextManager[ProgressTask]: ...


class _SilentTask:
    def advance(self, n: float = 1, **fields: str) -> None:
        pass

    def update(self, *, completed: float | None = None, total: float | None = None, **fields: str) -> None:
        pass

    def log(self, message: str, *, warning: bool = False) -> None:
        pass


def silent_task() -> ProgressTask:
    """A task that reports nothing (the default where a function receives a task rather than opening one)."""
    return _SilentTask()


@contextlib.contextmanager
def no_progress(description: str, total: float | None = None) -> Iterator[ProgressTask]:
    """The default: report nothing."""
    yield silent_task()


def track(progress: Progress, items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate over `items`, advancing one task per item (`total` defaults to len(items) when it has one)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with progress(description, total) as task:
        for item in items:
            yield item
            task.advance()
