"""How the CLI shows the library's progress protocol (`prunecli.progress`) on stderr, where people look.

On a terminal every task is a live rich bar. In a log file or pipe rich would draw nothing until the end (a long
`make > log 2> err` would show an empty `err` for its whole run), so `LineProgress` prints plain lines instead: one
per task update at most every `PRUNECLI_PROGRESS_INTERVAL` seconds (default 15) per task (a busy inner task, e.g. the
optimisation steps within an edit, does not silence the outer one), always at the first and the last item, plus a
heartbeat line when an item runs longer than that, so a log shows that a long step is alive:
`editing 12/200 (6%), 4.1 s/item, elapsed 49 s, eta 12.9 min, loss 3.10 -> 0.04`. PRUNECLI_NO_PROGRESS turns both off.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from prunecli.commands._output import err_console, say, warn
from prunecli.progress import Progress as ProgressProtocol
from prunecli.progress import track as track_items

T = TypeVar("T")

DEFAULT_INTERVAL = 15.0


def interval() -> float:
    """Seconds between progress lines in a log ($PRUNECLI_PROGRESS_INTERVAL, default 15)."""
    try:
        return max(0.0, float(os.environ.get("PRUNECLI_PROGRESS_INTERVAL", DEFAULT_INTERVAL)))
    except ValueError:
        return DEFAULT_INTERVAL


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


@dataclass
class LineTask:
    description: str
    total: float | None
    started: float
    completed: float = 0.0
    first_reported: bool = False
    fields: dict[str, Any] = field(default_factory=dict)
    last_printed: float = float("-inf")

    def line(self, now: float) -> str:
        """`description done/total (pct), rate, elapsed, eta, fields...` (rate as s/item when items are slow)."""
        elapsed = now - self.started
        parts = [f"{self.description} {self.completed:g}" + (f"/{self.total:g}" if self.total else "")]
        if self.total:
            parts[0] += f" ({100 * self.completed / self.total:.0f}%)"
        if self.completed > 0 and elapsed > 0:
            rate = self.completed / elapsed
            parts.append(f"{1 / rate:.1f} s/item" if rate < 1 else f"{rate:,.1f}/s")
        parts.append(f"elapsed {_duration(elapsed)}")
        if self.total and 0 < self.completed < self.total:
            parts.append(f"eta {_duration(elapsed * (self.total - self.completed) / self.completed)}")
        parts.extend(str(v) for v in self.fields.values() if str(v))
        return ", ".join(parts)


class LineProgress:
    """rich-`Progress`-like progress that writes plain lines (see the module docstring)."""

    def __init__(self, console: Console, every: float | None = None, clock: Any = time.monotonic) -> None:
        self.console = console
        self.every = interval() if every is None else every
        self.clock = clock
        self.tasks: list[LineTask] = []
        self._last_line = clock()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def __enter__(self) -> LineProgress:
        if self.every > 0:
            self._heartbeat = threading.Thread(target=self._beat, daemon=True)
            self._heartbeat.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()

    def add_task(self, description: str, total: float | None = None, **fields: Any) -> int:
        with self._lock:
            self.tasks.append(LineTask(description, total, self.clock(), fields=fields))
            self._print(self.tasks[-1], force=True)
            return len(self.tasks) - 1

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def update(self, task_id: int, *, completed: float | None = None, advance: float | None = None,
               description: str | None = None, total: float | None = None, **fields: Any) -> None:
        with self._lock:
            task = self.tasks[task_id]
            if total is not None:
                task.total = total
            if completed is not None:
                if completed < task.completed:  # the task starts over (the next edit's optimisation): new clock
                    task.started = self.clock()
                task.completed = completed
            if advance is not None:
                task.completed += advance
            if description is not None:
                task.description = description
            task.fields.update(fields)
            first = task.completed > 0 and not task.first_reported
            task.first_reported |= first
            done = task.total is not None and task.completed >= task.total
            self._print(task, force=first or done)

    def _print(self, task: LineTask, force: bool) -> None:
        now = self.clock()
        if force or now - task.last_printed >= self.every:
            self.console.print(task.line(now), highlight=False, markup=False, soft_wrap=True)
            self._last_line = task.last_printed = now

    def _beat(self) -> None:
        """A line for the running task when nothing was printed for a whole interval (one long item)."""
        while not self._stop.wait(self.every):
            with self._lock:
                running = [t for t in self.tasks if t.total is None or t.completed < t.total]
                if running and self.clock() - self._last_line >= self.every:
                    self._print(running[-1], force=True)


class _RateColumn(ProgressColumn):
    """Items per second (seconds per item when slow) since the task started: the figure the log lines show and a
    command's summary repeats (e.g. `edit`'s s per edit), not rich's estimate over the last seconds."""

    def render(self, task: Task) -> Text:
        elapsed = task.elapsed
        if not task.completed or not elapsed:
            return Text("")
        speed = task.completed / elapsed
        rate = f"{1 / speed:.1f} s/item" if speed < 1 else f"{speed:,.1f}/s"
        return Text(rate, style="progress.data.speed")


class _FieldsColumn(ProgressColumn):
    """The text fields a task reports (`task.advance(loss="...")`)."""

    def render(self, task: Task) -> Text:
        return Text(" ".join(str(v) for v in task.fields.values() if str(v)))


def _display() -> Progress | LineProgress:
    """A rich bar on a terminal, plain lines in a log file, nothing when PRUNECLI_NO_PROGRESS is set."""
    off = bool(os.environ.get("PRUNECLI_NO_PROGRESS"))
    if not err_console.is_terminal and not off:
        return LineProgress(err_console)
    return Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), _RateColumn(), _FieldsColumn(), console=err_console,
                    transient=False, disable=off)


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
    """The renderer a command opens around a library call and passes down: every task the library opens becomes a
    bar (a log line in a file)."""
    with _display() as display:
        @contextlib.contextmanager
        def open_task(description: str, total: float | None = None) -> Iterator[_DisplayTask]:
            yield _DisplayTask(display, display.add_task(description, total=total or None))

        yield open_task


def track(items: Iterable[T], total: int, description: str) -> Iterator[T]:
    """Iterate with a progress bar on stderr."""
    with cli_progress() as progress:
        yield from track_items(progress, items, description, total)
