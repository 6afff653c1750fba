"""`prunecli edit` as a function: edit requests into a model one after another and write the accumulated delta."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunecli.core.atomic import check_output_path, labelled
from prunecli.core.checkpoint import Checkpoint
from prunecli.core.delta_files import load_deltas
from prunecli.core.restraint import RestraintSettings
from prunecli.editors.base import EditorInputs
from prunecli.editors.registry import editor_for, file_method
from prunecli.editors.session import EditRun, PruneSchedule, run_edits
from prunecli.editors.stats import KeyStats, load_moments
from prunecli.editors.success import CHECKS, TEACHER_FORCED
from prunecli.errors import PruneCliError
from prunecli.models.adapters import resolve_adapter
from prunecli.models.builtin import resolve_model_path
from prunecli.models.loading import load_model
from prunecli.models.options import LoadOptions
from prunecli.progress import Progress, no_progress
from prunecli.requests import load_requests

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EditOptions:
    """What `prunecli edit` takes: MODEL, the requests, the output, the method and its inputs, restraints while
    editing. `method` None: the hyper-parameter file's alg_name, else rome."""

    model: str | Path
    requests: str | Path
    output: str | Path
    method: str | None = None
    start: int = 0
    limit: int | None = None
    stats: Path | None = None  # key statistics (`collect_stats`)
    deltas: tuple[str | Path, ...] = ()  # previous deltas to continue from
    batch_size: int = 10  # batched methods: requests per batch
    hparams: Path | None = None  # hyper-parameter file (EasyEdit files accepted)
    overrides: tuple[str, ...] = ()  # key=value
    archive: Path | None = None  # MEND: the trained networks
    prune_every: int | None = None  # restrain the accumulated delta after every K edits
    kappa_trigger: float | None = None  # ... and/or whenever kappa(W + D) of an edited matrix exceeds T
    restraint: RestraintSettings = field(default_factory=RestraintSettings)
    seed: int = 0  # of the context-prefix sampler
    strict: bool = False  # any edit that did not take is an error (nothing written)
    check: str = TEACHER_FORCED  # how an edit is judged to have taken (`editors.success`)
    load: LoadOptions = field(default_factory=LoadOptions)
    force: bool = False
    ignore_base_mismatch: bool = False


@dataclass(frozen=True)
class EditResult:
    options: EditOptions
    method: str
    layers: list[int]
    hparams: dict[str, Any]
    run: EditRun

    @property
    def failed_records(self) -> list[int]:
        return [r.index for r in self.run.failed]

    def to_json(self) -> dict[str, Any]:
        run, n = self.run, len(self.run.reports)
        return {"output": str(self.options.output), "model": str(run.delta.source), "method": self.method,
                "layers": self.layers, "hparams": self.hparams, "edits": n, "check": self.options.check,
                "failed_edits": len(self.failed_records),
                "failed_records": self.failed_records, "total_edits": len(run.delta.requests),
                "seconds": run.seconds, "seconds_per_edit": run.seconds / n,
                "restraints": [[r.to_json() for r in rs] for rs in run.restraints],
                "restraint_points": run.restraint_points, "requests": [r.to_json() for r in run.reports]}


def _schedule(o: EditOptions) -> PruneSchedule | None:
    """The restraint while editing, checked (a kappa target needs a schedule to act in)."""
    if o.prune_every is None and o.kappa_trigger is None:
        if o.restraint.target_kappa is not None:
            raise PruneCliError("--target-kappa restrains only with --prune-every or --kappa-trigger")
        return None
    if o.prune_every is not None and o.prune_every < 1:
        raise PruneCliError(f"--prune-every must be at least 1, got {o.prune_every}")
    if o.kappa_trigger is not None and not o.kappa_trigger >= 1:
        raise PruneCliError(f"--kappa-trigger must be a number >= 1 (a condition number), got {o.kappa_trigger}")
    target = o.restraint.target_kappa
    if o.kappa_trigger is not None and target is not None and target > o.kappa_trigger:
        raise PruneCliError(f"--target-kappa {target:g} above --kappa-trigger {o.kappa_trigger:g} would restrain "
                            "after every edit: choose a target at or below the trigger")
    o.restraint.check()
    return PruneSchedule(o.restraint, o.prune_every, o.kappa_trigger)


def ranges(numbers: list[int]) -> str:
    """Sorted record numbers as short ranges: 0-3, 7, 9-10."""
    runs: list[list[int]] = []
    for n in numbers:
        if runs and runs[-1][-1] == n - 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


def run_edit_job(options: EditOptions, progress: Progress = no_progress) -> EditResult:
    """Edit the requests into the model (after the previous deltas) and write the accumulated delta. Everything
    that can be checked without the model is checked before it loads."""
    o = options
    method = o.method or (file_method(o.hparams) if o.hparams is not None else None) or "rome"
    editor = editor_for(method, EditorInputs(o.hparams, tuple(o.overrides), o.archive))
    model_path = resolve_model_path(str(o.model))
    check_output_path(Path(o.output), o.force, is_dir=False, inputs=[
        ("model", model_path), ("requests file", o.requests), ("statistics file", o.stats), ("archive", o.archive),
        ("hyper-parameter file", o.hparams), *labelled("delta", o.deltas)])
    if editor.needs_stats and o.stats is None:
        raise PruneCliError(f"{method} needs key statistics: compute them with `prunecli stats {o.model} --method "
                            f"{method} --text FILE -o STATS` and pass --stats STATS")
    schedule = _schedule(o)
    if o.check not in CHECKS:
        raise PruneCliError(f"unknown edit check {o.check!r}; use one of {', '.join(CHECKS)}")
    if o.load.dtype.lower() not in ("fp32", "float32", "bf16", "bfloat16"):
        raise PruneCliError(f"--dtype must be fp32 or bf16 for editing, got {o.load.dtype!r}")
    requests = load_requests(o.requests, o.start, o.limit)
    checkpoint = Checkpoint(model_path, o.load.allow_pickle)
    prior = load_deltas(o.deltas, checkpoint)
    if prior is not None:
        prior.check_base(checkpoint, o.ignore_base_mismatch)
    key_stats = KeyStats.load(o.stats) if o.stats is not None else None  # read once, before the model loads
    editor.check_base(checkpoint)

    log.info(f"loading {o.model}")
    model, tokenizer, base = load_model(o.model, o.load)
    adapter = resolve_adapter(model)
    hp = editor.resolve_hparams(model, adapter, log.info)
    moments = load_moments(key_stats, base, adapter, hp.layers) if key_stats is not None else None
    for line in editor.notes(hp, moments is not None):
        log.info(line)
    provenance: dict[str, Any] = ({"stats": {"path": str(o.stats), "corpus": key_stats.corpus}}
                                  if key_stats is not None else {})
    if o.load.tokenizer is not None:
        provenance["tokenizer"] = o.load.tokenizer  # the edits were computed with this tokenizer
    run = run_edits(model, tokenizer, base, requests, editor, hp, moments, prior, o.batch_size, schedule, o.seed,
                    provenance, progress, o.check)
    n, failed = len(run.reports), [r.index for r in run.failed]
    if failed and (o.strict or len(failed) == n):
        why = "--strict" if len(failed) < n else "no edit took"
        raise PruneCliError(f"{len(failed)} of {n} edit(s) did not take (records {ranges(failed)}); {why}: "
                            "nothing written")
    run.delta.save(o.output, o.force)
    return EditResult(o, method, list(hp.layers), hp.to_json(), run)
