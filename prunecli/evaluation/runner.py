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
from typing import Any

from prunecli.core.checkpoint import Checkpoint
from prunecli.core.delta import Delta
from prunecli.core.delta_files import load_deltas
from prunecli.distributed import SINGLE, Workers
from prunecli.errors import PruneCliError
from prunecli.evaluation.base import EvalContext, EvalOptions, TaskOutcome
from prunecli.evaluation.reference_cache import ReferenceCache, reference_key
from prunecli.evaluation.registry import TaskDef, check_inputs, parse_tasks
from prunecli.evaluation.report import build_report
from prunecli.evaluation.zsre import locality_pairs, reference_scores, score_pairs
from prunecli.models.builtin import resolve_model_path
from prunecli.models.scoring import TargetScore
from prunecli.progress import Progress, no_progress
from prunecli.requests import EditRequest, load_requests, parse_record


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
            raise PruneCliError(f"the delta's recorded request {i} cannot be read ({exc}); give --requests "
                                "FILE") from None
    return out


def select_requests(options: EvalOptions, delta: Delta | None) -> list[EditRequest] | None:
    if options.requests is not None:
        return load_requests(options.requests, options.start, options.limit)
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
            raise PruneCliError("nothing to evaluate: give --requests FILE, --text FILE or --tasks LIST")
        tasks = parse_tasks(",".join(names))
    for task, _ in tasks:
        if task.needs == "edits" and not requests:
            raise PruneCliError(f"task {task.name} needs edit requests: give --requests FILE")
    check_inputs(tasks, options.data_dir, options.text)
    return tasks


def _load(ref: str, options: EvalOptions, workers: Workers) -> tuple[Any, Any, Any]:
    from prunecli.models.loading import load_model

    return load_model(ref, options.load, device=workers.resolve_device(options.load.device))


def _reference_cache(options: EvalOptions, reference: str, workers: Workers) -> ReferenceCache | None:
    """The disk cache of `reference`'s locality scores under these options; none for a parallel run (its processes
    must agree on what is missing) or a reference that is not a model folder (loading it gives the error)."""
    from prunecli.models.loading import resolve_device
    from prunecli.models.tokenizer import tokenizer_source

    folder = resolve_model_path(reference)
    if workers.parallel or not folder.is_dir():
        return None
    source = tokenizer_source(folder, options.load.tokenizer)
    device = options.load.device_map or resolve_device(workers.resolve_device(options.load.device)).type
    return ReferenceCache(reference_key(folder, source.path if source.given else None,
                                        {"dtype": options.load.dtype, "device": device,
                                         "batch_size": options.batch_size}))


def _reference(options: EvalOptions, model: Any, tokenizer: Any, requests: list[EditRequest], model_ref: str,
               has_delta: bool, progress: Progress, workers: Workers) -> tuple[list[list[TargetScore]], str]:
    """Locality predictions of the reference model: --locality-reference, else the base model before the deltas.
    Scores of the same reference from earlier runs come from the disk cache (`reference_cache`); a reference model
    of its own is loaded only when some pair is missing there."""
    cache = _reference_cache(options, options.locality_reference or model_ref, workers)
    pairs = locality_pairs(requests)
    known = cache.lookup(pairs) if cache is not None else {}
    missing = [pair for pair in pairs if pair not in known]
    if missing:
        if options.locality_reference:
            model, tokenizer, _ = _load(options.locality_reference, options, workers)
        with progress("zsre locality reference", len(missing)) as bar:
            scored = score_pairs(model, tokenizer, missing, options.batch_size, bar.advance, workers)
        if cache is not None:
            cache.store(scored)
        known.update(scored)
    scores = reference_scores(model, tokenizer, requests, known=known)  # every pair known: arranged per request
    if options.locality_reference:
        return scores, options.locality_reference
    return scores, (f"{model_ref} without deltas" if has_delta else f"{model_ref} (the evaluated model itself)")


def run_evaluation(model_ref: str, options: EvalOptions, progress: Progress = no_progress,
                   workers: Workers = SINGLE) -> dict[str, Any]:
    """Evaluate `model_ref` plus `options.deltas` on the planned tasks; returns the report object (the same one on
    every process of a parallel run). Every input file is checked before the model is loaded; when one of several
    tasks fails, the others still report and `failed_tasks` names the failure."""
    from prunecli.models.loading import add_delta_to_model
    from prunecli.models.placement import input_device

    if options.batch_size < 1:
        raise PruneCliError("--batch-size must be at least 1")
    progress = workers.progress(progress)
    # The checkpoint is opened (lazily) first: PEFT adapter folders among the deltas are read against it.
    checkpoint = Checkpoint(resolve_model_path(model_ref), options.load.allow_pickle)
    delta = load_deltas(options.deltas, checkpoint)
    if delta is not None:
        delta.check_base(checkpoint, options.ignore_base_mismatch)
    requests = select_requests(options, delta)
    tasks = plan(options, requests)
    model, tokenizer, _ = _load(model_ref, options, workers)
    reference, reference_name = None, None
    if requests and any(t.name == "zsre" for t, _ in tasks):
        reference, reference_name = _reference(options, model, tokenizer, requests, model_ref, delta is not None,
                                               progress, workers)
    if delta is not None:
        add_delta_to_model(model, delta)
    ctx = EvalContext(model, tokenizer, options, requests, reference, reference_name, progress, workers)
    outcomes: list[tuple[str, TaskOutcome, float]] = []
    failed: dict[str, str] = {}
    for task, source in tasks:
        t0 = time.perf_counter()
        try:
            outcome = task.run(ctx, source)
        except Exception as exc:
            if len(tasks) == 1:
                raise
            failed[task.name] = str(exc) if isinstance(exc, PruneCliError) else f"{type(exc).__name__}: {exc}"
            continue
        outcomes.append((task.name, outcome, time.perf_counter() - t0))
    info = {
        "edits": None if requests is None else {
            "file": str(options.requests) if options.requests is not None else "recorded in the deltas",
            "start": options.start, "n": len(requests)},
        "tasks": [t.name for t, _ in tasks],
        "failed_tasks": failed,
        "locality_reference": reference_name,
        "settings": {"batch_size": options.batch_size, "device": str(input_device(model)),
                     "device_map": getattr(model, "hf_device_map", None) if options.load.device_map else None,
                     "processes": workers.world_size, "dtype": options.load.dtype, "limit": options.limit,
                     "seed": options.seed, "data_dir": str(options.data_dir)},
    }
    return build_report(str(model_ref), [str(d) for d in options.deltas], info, outcomes)
