"""The types every evaluation task shares: what a task needs (`EvalContext`) and what it returns (`MetricGroup`).

A task returns metric groups; each group names the protocol its metrics were computed under, because numbers from
different protocols (probability comparison vs argmax, agreement vs gold) are not comparable and must never be
reported without saying which one they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunecli.distributed import SINGLE, Workers
from prunecli.evaluation.data import DEFAULT_DATA_DIR
from prunecli.evaluation.metrics import MetricValue
from prunecli.models.options import LoadOptions
from prunecli.models.scoring import TargetScore
from prunecli.progress import Progress, no_progress
from prunecli.requests import EditRequest


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


@dataclass(frozen=True)
class EvalOptions:
    """Everything `prunecli evaluate` accepts besides the model (the library-level form of its options); tasks read
    their settings (batch size, limit, data folder, perplexity window...) from it."""

    deltas: Sequence[Path] = ()
    edits: Path | None = None
    start: int = 0
    limit: int | None = None  # edit requests to evaluate; general-ability tasks: subsample to this many examples
    tasks: str | None = None
    text: Path | None = None
    window: int | None = None
    stride: int | None = None
    max_tokens: int | None = None
    seed: int | None = None  # None: the first `limit` examples; else a seeded random sample
    batch_size: int = 16
    locality_reference: str | None = None
    data_dir: Path = field(default=DEFAULT_DATA_DIR)
    ignore_base_mismatch: bool = False  # evaluate deltas made for a base whose tensors differ (with a warning)
    load: LoadOptions = field(default_factory=LoadOptions)  # how the model (and the locality reference) is loaded


@dataclass
class EvalContext:
    """What a task runs on: the final (edited) model, the options, and what the runner prepared once for all tasks
    (the requests, the locality reference's predictions)."""

    model: Any
    tokenizer: Any
    options: EvalOptions = field(default_factory=EvalOptions)
    requests: list[EditRequest] | None = None
    locality_reference: list[list[TargetScore]] | None = None  # per request, per locality prompt (unedited model)
    reference_name: str | None = None
    progress: Progress = field(default=no_progress)
    workers: Workers = SINGLE  # the processes of a data-parallel run; each scores its share of every task
