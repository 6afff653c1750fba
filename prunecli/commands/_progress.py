"""Progress on stderr where people look: a live bar on a terminal, plain timestamped lines in a log file.

rich draws nothing until the end when stderr is not a terminal, so `make > log 2> err` showed an empty `err` through
a 16-minute edit. `LineProgress` offers the subset of rich's `Progress` API the commands use (`add_task`, `advance`,
`update`, `tasks`) and prints one line per task update at most every `PRUNECLI_PROGRESS_INTERVAL` seconds
(default 15) per task (a busy inner task, e.g. the optimisation steps within an edit, does not silence the outer one),
always at the first and the last item, plus a heartbeat line when an item runs longer than that, so a log shows that
a long step is alive: `editing 12/200 (6%), 4.1 s/item, elapsed 49 s, eta 12.9 min, loss 3.10 -> 0.04`.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console

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
