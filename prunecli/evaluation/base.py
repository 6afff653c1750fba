"""The types every evaluation task shares: what a task needs (`EvalContext`) and what it returns (`MetricGroup`).

A task returns metric groups; each group names the protocol its metrics were computed under, because numbers from
different protocols (probability comparison vs argmax, agreement vs gold) are not comparable and must never be
reported without saying which one they are. A group also names the records its metrics' per-record outcomes belong
to (`RecordSet`), so two reports can be compared record by record only when they scored the same ones.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunecli.distributed import SINGLE, Workers
from prunecli.evaluation.data import DEFAULT_PPL_TOKENS, default_data_dir
from prunecli.evaluation.metrics import MetricValue
from prunecli.models.options import LoadOptions
from prunecli.models.scoring import TargetScore
from prunecli.progress import Progress, no_progress
from prunecli.requests import EditRequest


@dataclass(frozen=True)
class RecordSet:
    """The records a group's per-record outcomes belong to, in order: their ids (CounterFact `case_id`, a task
    record's index in its file, a perplexity window's number) and a digest of what was scored, so records that share
    ids but not content (another file, another text) are never paired."""

    ids: list[Any]
    digest: str

    @classmethod
    def of(cls, ids: Sequence[Any], content: Any) -> RecordSet:
        """Ids and the SHA-256 of `content` (anything JSON can write: prompts, targets, token ids)."""
        text = json.dumps(content, sort_keys=True, default=str, ensure_ascii=False)
        return cls(list(ids), "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest())

    def to_json(self) -> dict[str, Any]:
        return {"ids": self.ids, "digest": self.digest}


def request_records(requests: Sequence[EditRequest]) -> RecordSet:
    """The records of edit metrics: each request's `case_id` (its index in the file when it has none), and its
    content without that index (the same record read from another position of another file is the same record)."""
    ids = [r.case_id if r.case_id is not None else r.index for r in requests]
    return RecordSet.of(ids, [{k: v for k, v in r.to_json().items() if k != "index"} for r in requests])


@dataclass(frozen=True)
class MetricGroup:
    """Metrics computed under one protocol, with the protocol stated in words; `records` when the metrics keep
    per-record outcomes, `generations` (one JSON object per record) when the protocol decodes text worth reading."""

    name: str
    protocol: str
    metrics: dict[str, MetricValue]
    records: RecordSet | None = None
    generations: list[dict[str, Any]] | None = None


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
    requests: Path | None = None  # edit requests (the CLI's --requests); None: those recorded in the deltas
    start: int = 0
    limit: int | None = None  # edit requests to evaluate; general-ability tasks: subsample to this many examples
    tasks: str | None = None
    text: Path | None = None
    window: int | None = None
    stride: int | None = None
    max_tokens: int | None = DEFAULT_PPL_TOKENS  # perplexity's token budget; None: the whole text
    seed: int | None = None  # None: the first `limit` examples; else a seeded random sample
    batch_size: int = 16
    locality_reference: str | None = None
    data_dir: Path = field(default_factory=default_data_dir)
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
