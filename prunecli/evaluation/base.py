"""The types every evaluation task shares: what a task needs (`EvalContext`) and what it returns (`MetricGroup`).

A task returns metric groups; each group names the protocol its metrics were computed under, because numbers from
different protocols (probability comparison vs argmax, agreement vs gold) are not comparable and must never be
reported without saying which one they are.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunecli.distributed import SINGLE, Workers
from prunecli.evaluation.data import DEFAULT_DATA_DIR
from prunecli.evaluation.metrics import MetricValue
from prunecli.evaluation.scoring import TargetScore
from prunecli.requests import EditRequest

Advance = Callable[[int], None]
ProgressFactory = Callable[[str, int], contextlib.AbstractContextManager[Advance]]
"""progress(description, total) -> context manager yielding `advance(n)`; the CLI draws a bar, tests pass nothing."""


@contextlib.contextmanager
def no_progress(description: str, total: int) -> Iterator[Advance]:  # noqa: ARG001 - same signature as the bar
    yield lambda n: None


@dataclass(frozen=True)
class MetricGroup:
    """Metrics computed under one protocol, with the protocol stated in words."""

    name: str
    protocol: str
    metrics: dict[str, MetricValue]


@dataclass(frozen=True)
class TaskOutcome:
    """What one task produced; `cases` (requests, examples, tokens) and `unit` feed the throughput line."""

    groups: list[MetricGroup]
    cases: int
    unit: str = "cases"


@dataclass
class EvalContext:
    """Everything a task may need; tasks read only their fields (the model is the final, edited one)."""

    model: Any
    tokenizer: Any
    batch_size: int = 16
    limit: int | None = None  # subsample general-ability tasks to this many examples
    seed: int | None = None  # None: the first `limit` examples; else a seeded random sample
    data_dir: Path = DEFAULT_DATA_DIR
    requests: list[EditRequest] | None = None
    locality_reference: list[list[TargetScore]] | None = None  # per request, per locality prompt (unedited model)
    reference_name: str | None = None
    text_path: Path | None = None
    window: int | None = None
    stride: int | None = None
    max_tokens: int | None = None
    progress: ProgressFactory = field(default=no_progress)
    workers: Workers = SINGLE  # the processes of a data-parallel run; each scores its share of every task
