"""`run_evaluation`: load the model once, add the deltas in memory, run the requested tasks, return the report.

Order matters for zsRE locality: the reference predictions are taken from the model *before* its deltas are added
(or from `--locality-reference`), then the deltas are added to the touched tensors and every task runs on that
final model (the sequential protocol: all edits applied, each edit judged afterwards).

Big models load with a device map (`device_map`, `max_memory`, `offload_folder`). In a data-parallel run (`workers`
from `prunecli.distributed`) every process loads the model and scores its share of each task's items; the scores
are gathered in the original order, so every process computes the metrics of a single-process run, and only the
main process draws progress.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunecli.core.checkpoint import Checkpoint
from prunecli.core.delta import Delta, load_deltas
from prunecli.distributed import SINGLE, Workers
from prunecli.errors import PruneCliError
from prunecli.evaluation.base import EvalContext, ProgressFactory, TaskOutcome, no_progress
from prunecli.evaluation.data import DEFAULT_DATA_DIR
from prunecli.evaluation.registry import TaskDef, check_inputs, parse_tasks
from prunecli.evaluation.report import build_report
from prunecli.evaluation.scoring import TargetScore
from prunecli.evaluation.zsre import reference_scores
from prunecli.models.default_model import resolve_model_path
from prunecli.requests import EditRequest, load_requests, parse_record


@dataclass
class EvalOptions:
    """Everything `prunecli evaluate` accepts besides the model (the library-level form of its options)."""

    deltas: Sequence[Path] = ()
    edits: Path | None = None
    start: int = 0
    limit: int | None = None
    tasks: str | None = None
    text: Path | None = None
    window: int | None = None
    stride: int | None = None
    max_tokens: int | None = None
    seed: int | None = None
    batch_size: int = 16
    device: str = "auto"
    dtype: str = "fp32"
    locality_reference: str | None = None
    data_dir: Path = field(default=DEFAULT_DATA_DIR)
    ignore_base_mismatch: bool = False  # evaluate deltas made for a base whose tensors differ (with a warning)
    device_map: str | None = None  # accelerate placement ("auto", ...) instead of `device`
    max_memory: str | None = None  # e.g. "0=20GiB,cpu=60GiB"
    offload_folder: Path | None = None
    allow_pickle: bool = False  # --allow-pickle: .bin weights (read with weights_only=True)
    tokenizer: str | None = None  # --tokenizer: for the evaluated model and the locality reference


def requests_from_history(delta: Delta) -> list[EditRequest]:
    """The edit requests a delta records (as EditRequest fields, or as any record format `edit` accepts)."""
    names = {f.name for f in dataclasses.fields(EditRequest)}
    out = []
    for i, rec in enumerate(delta.requests):
        try:
            if isinstance(rec, dict) and {"prompt", "subject", "target_new"} <= rec.keys() and set(rec) <= names:
                out.append(EditRequest(**rec))
            else:
                out.append(parse_record(rec, i))
        except (TypeError, ValueError, KeyError) as exc:
            raise PruneCliError(f"the delta's recorded request {i} cannot be read ({exc}); give --edits FILE") from None
    return out


def select_requests(options: EvalOptions, delta: Delta | None) -> list[EditRequest] | None:
    if options.edits is not None:
        return load_requests(options.edits, options.start, options.limit)
    if delta is not None and delta.requests:
        recorded = requests_from_history(delta)
        end = None if options.limit is None else options.start + options.limit
        return recorded[options.start:end] or None
    return None


def plan(options: EvalOptions, requests: list[EditRequest] | None) -> list[tuple[TaskDef, str | None]]:
    """The tasks to run: --tasks, else the edit metrics matching the requests' format plus perplexity with --text."""
    if options.tasks:
        tasks = parse_tasks(options.tasks)
    else:
        names = []
        if requests:
            names.append("zsre" if all(r.source_format == "zsre" for r in requests) else "counterfact")
        if options.text is not None:
            names.append("perplexity")
        if not names:
            raise PruneCliError("nothing to evaluate: give --edits FILE, --text FILE or --tasks LIST")
        tasks = parse_tasks(",".join(names))
    for task, _ in tasks:
        if task.needs == "edits" and not requests:
            raise PruneCliError(f"task {task.name} needs edit requests: give --edits FILE")
    check_inputs(tasks, options.data_dir, options.text)
    return tasks


def _load(ref: str, options: EvalOptions, workers: Workers) -> tuple[Any, Any, Any]:
    from prunecli.models.loading import load_model

    return load_model(ref, workers.resolve_device(options.device), options.dtype, device_map=options.device_map,
                      max_memory=options.max_memory, offload_folder=options.offload_folder,
                      tokenizer=options.tokenizer, allow_pickle=options.allow_pickle)


def _shared_progress(progress: ProgressFactory, workers: Workers) -> ProgressFactory:
    """The main process's bar counts its own share of each task; the other processes draw nothing."""
    if not workers.parallel:
        return progress
    if not workers.is_main:
        return no_progress
    return lambda description, total: progress(f"{description} [process 1 of {workers.world_size}]",
                                               workers.share(total))


def _reference(options: EvalOptions, model: Any, tokenizer: Any, requests: list[EditRequest], model_ref: str,
               has_delta: bool, progress: ProgressFactory, workers: Workers) -> tuple[list[list[TargetScore]], str]:
    """Locality predictions of the reference model: --locality-reference, else the base model before the deltas."""
    total = sum(min(len(r.locality_prompts), len(r.locality_answers)) for r in requests)
    if options.locality_reference:
        ref_model, ref_tok, _ = _load(options.locality_reference, options, workers)
        with progress("zsre locality reference", total) as advance:
            scores = reference_scores(ref_model, ref_tok, requests, options.batch_size, advance, workers)
        return scores, options.locality_reference
    with progress("zsre locality reference", total) as advance:
        scores = reference_scores(model, tokenizer, requests, options.batch_size, advance, workers)
    return scores, (f"{model_ref} without deltas" if has_delta else f"{model_ref} (the evaluated model itself)")


def run_evaluation(model_ref: str, options: EvalOptions, progress: ProgressFactory = no_progress,
                   workers: Workers = SINGLE) -> dict[str, Any]:
    """Evaluate `model_ref` plus `options.deltas` on the planned tasks; returns the report object (the same one on
    every process of a parallel run). Every input file is checked before the model is loaded; when one of several
    tasks fails, the others still report and `failed_tasks` names the failure."""
    from prunecli.models.loading import add_delta_to_model
    from prunecli.models.placement import input_device

    if options.batch_size < 1:
        raise PruneCliError("--batch-size must be at least 1")
    progress = _shared_progress(progress, workers)
    # The checkpoint is opened (lazily) first: PEFT adapter folders among the deltas are read against it.
    delta = load_deltas(options.deltas, Checkpoint(resolve_model_path(model_ref), options.allow_pickle)
                        if options.deltas else None)
    requests = select_requests(options, delta)
    tasks = plan(options, requests)
    model, tokenizer, base = _load(model_ref, options, workers)
    if delta is not None:
        delta.check_base(base, options.ignore_base_mismatch)
    reference, reference_name = None, None
    if requests and any(t.name == "zsre" for t, _ in tasks):
        reference, reference_name = _reference(options, model, tokenizer, requests, model_ref, delta is not None,
                                               progress, workers)
    if delta is not None:
        add_delta_to_model(model, delta)
    ctx = EvalContext(model, tokenizer, batch_size=options.batch_size, limit=options.limit, seed=options.seed,
                      data_dir=options.data_dir, requests=requests, locality_reference=reference,
                      reference_name=reference_name, text_path=options.text, window=options.window,
                      stride=options.stride, max_tokens=options.max_tokens, progress=progress, workers=workers)
    outcomes: list[tuple[str, TaskOutcome, float]] = []
    failed: dict[str, str] = {}
    for task, source in tasks:
        t0 = time.perf_counter()
        try:
            outcome = task.run(ctx, source)
        except Exception as exc:  # noqa: BLE001 - one failing task must not lose the others' results
            if len(tasks) == 1:
                raise
            failed[task.name] = str(exc) if isinstance(exc, PruneCliError) else f"{type(exc).__name__}: {exc}"
            continue
        outcomes.append((task.name, outcome, time.perf_counter() - t0))
    info = {
        "edits": None if requests is None else {
            "file": str(options.edits) if options.edits is not None else "recorded in the deltas",
            "start": options.start, "n": len(requests)},
        "tasks": [t.name for t, _ in tasks],
        "failed_tasks": failed,
        "locality_reference": reference_name,
        "settings": {"batch_size": options.batch_size, "device": str(input_device(model)),
                     "device_map": getattr(model, "hf_device_map", None) if options.device_map else None,
                     "processes": workers.world_size, "dtype": options.dtype, "limit": options.limit,
                     "seed": options.seed, "data_dir": str(options.data_dir)},
    }
    return build_report(str(model_ref), [str(d) for d in options.deltas], info, outcomes)
