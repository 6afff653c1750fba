"""`prunecli edit` as a function: edit requests into a model one after another and write the accumulated delta.

Finished work is kept: every `checkpoint_every` edits, and when Ctrl-C or SIGTERM stops the run, the edits done so far
are written to the output with a `partial` history entry (`core.history.PartialOp`: the run's records, the next one,
the options that shape the delta). `resume` continues such an output where it stopped, as does `--delta PARTIAL
--start NEXT` into another output; either writes what an uninterrupted run writes (`editors.session`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunecli.core.artifacts import DELTA, is_artifact
from prunecli.core.atomic import check_output_path, labelled
from prunecli.core.checkpoint import Checkpoint
from prunecli.core.delta import Delta
from prunecli.core.delta_files import load_deltas
from prunecli.core.history import PartialOp
from prunecli.core.restraint import RestraintSettings
from prunecli.core.restraint_functions import SphereSettings
from prunecli.editors.base import Editor, EditorInputs
from prunecli.editors.nas import Anchor, drop_at
from prunecli.editors.registry import editor_for, file_method
from prunecli.editors.session import EditRun, PruneSchedule, run_edits
from prunecli.editors.stats import KeyStats, load_moments
from prunecli.editors.success import CHECKS, TEACHER_FORCED
from prunecli.errors import PruneCliError, Terminated
from prunecli.models.adapters import resolve_adapter
from prunecli.models.builtin import resolve_model_path
from prunecli.models.loading import load_model
from prunecli.models.options import LoadOptions
from prunecli.progress import Progress, no_progress
from prunecli.requests import EditRequest, load_requests

log = logging.getLogger(__name__)

CHECKPOINT_EVERY = 50
"""Default of `--checkpoint-every`: writing the delta takes a second or two even after hundreds of edits, while 50
edits take minutes, so a run killed without warning (out of memory, kill -9, a power cut) loses minutes of work for a
cost well below 1 % of the run. Ctrl-C and SIGTERM always write the finished edits, whatever K is."""


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
    sphere: SphereSettings | None = None  # SPHERE's projection of every update (alpha None: the method's default)
    nas: Path | None = None  # NAS anchor file (`run_anchor`): every target value rescaled to its norm
    seed: int = 0  # of the context-prefix sampler
    strict: bool = False  # any edit that did not take is an error (the result is not written)
    check: str = TEACHER_FORCED  # how an edit is judged to have taken (`editors.success`)
    load: LoadOptions = field(default_factory=LoadOptions)
    force: bool = False
    ignore_base_mismatch: bool = False
    checkpoint_every: int = CHECKPOINT_EVERY  # also write the finished edits after every K edits (0: only when stopped)
    resume: bool = False  # continue the unfinished run in `output` (a partial delta) where it stopped


@dataclass(frozen=True)
class EditResult:
    options: EditOptions
    method: str
    layers: list[int]
    hparams: dict[str, Any]
    run: EditRun
    continued_from: int | None = None  # the record this run continued an unfinished one at

    @property
    def failed_records(self) -> list[int]:
        return [r.index for r in self.run.failed]

    def to_json(self) -> dict[str, Any]:
        run, n = self.run, len(self.run.reports)
        return {"output": str(self.options.output), "model": str(run.delta.source), "method": self.method,
                "layers": self.layers, "hparams": self.hparams, "edits": n, "check": self.options.check,
                "failed_edits": len(self.failed_records),
                "failed_records": self.failed_records, "total_edits": len(run.delta.requests),
                "nas_dropped_records": [r.index for r in run.reports if r.dropped],
                "continued_from": self.continued_from, "seconds": run.seconds, "edit_seconds": run.edit_seconds,
                "seconds_per_edit": run.edit_seconds / n if n else None,
                "restraints": [[r.to_json() for r in rs] for rs in run.restraints],
                "restraint_points": run.restraint_points, "requests": [r.to_json() for r in run.reports]}


@dataclass(frozen=True)
class _Span:
    """Where this process's edits lie in the whole run, which earlier processes may have started (and stopped)."""

    start: int  # the run's first record
    first: int  # the first record this process edits
    end: int  # one past the run's last record
    settings: dict[str, Any]  # the options a continuation must repeat (`PartialOp.settings`)


@dataclass
class _PartialWriter:
    """Writes the finished edits to the output, marked partial (`core.history.PartialOp`)."""

    output: Path
    requests: str
    span: _Span
    force: bool  # the output may be replaced: --force, a continued partial, or this run's own earlier checkpoint
    written: int | None = None  # the next record of the last partial delta this writer wrote

    def __call__(self, delta: Delta, done: int, reason: str = "checkpoint") -> None:
        marker = PartialOp(self.requests, self.span.start, self.span.first + done, self.span.end, reason,
                           self.span.settings)
        delta.with_entries(delta.entries, marker).save(self.output, self.force)
        self.force, self.written = True, marker.next

    def left(self) -> str:
        """What a run that ends in an error leaves at the output."""
        if self.written is None:
            return "nothing written"
        return (f"the result was not written ({self.output} holds the checkpoint of records {self.span.start}-"
                f"{self.written - 1}, marked partial)")


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


def _as_stored(value: Any) -> Any:
    """`value` as a delta file holds it (JSON: tuples become lists)."""
    return json.loads(json.dumps(value))


def _settings(o: EditOptions, editor: Editor, schedule: PruneSchedule | None) -> dict[str, Any]:
    """The options besides the edit op's own fields (method, hyper-parameters, seed, statistics) that shape the
    delta, as a partial delta records them for its continuation to repeat."""
    return _as_stored({"batch_size": o.batch_size if editor.batched else None, "prune_every": o.prune_every,
                       "kappa_trigger": o.kappa_trigger,
                       "restraint": schedule.restraint.to_json() if schedule is not None else None,
                       "deltas": [str(d) for d in o.deltas]})


def _output_to_resume(o: EditOptions) -> Delta | None:
    """With `resume`, the delta at the output to continue (None: no output yet, the run starts from the beginning).
    Without, an unfinished run at the output is refused with the way to continue it (unless --force)."""
    path = Path(o.output)
    if o.resume:
        return Delta.load(path) if path.exists() else None
    if not o.force and is_artifact(path, DELTA) and (marker := Delta.load(path).partial) is not None:
        raise PruneCliError(f"output {path} holds an unfinished edit run (records {marker.start}-{marker.next - 1} of "
                            f"{marker.start}-{marker.end - 1} done): continue it with --resume, or use --force to "
                            "start over")
    return None


def _span(o: EditOptions, requests: list[EditRequest], prior: Delta | None, settings: dict[str, Any],
          resuming: bool) -> _Span:
    """Where this process's edits lie in the run; a continued partial delta (the output with `resume`, or the last
    --delta) must be continued exactly: from its next record, with the same options and the same records done."""
    end = requests[-1].index + 1
    marker = prior.partial if prior is not None else None
    if marker is None:
        return _Span(o.start, o.start, end, settings)
    assert prior is not None
    where = str(o.output) if resuming else "the --delta"
    expected = marker.start if resuming else marker.next  # --resume repeats the run's --start; --delta goes on
    if o.start != expected:
        raise PruneCliError(f"{where} is an unfinished edit run of records {marker.start}-{marker.end - 1} that "
                            f"stopped before record {marker.next}: {'resume' if resuming else 'continue'} it with "
                            f"--start {expected}")
    ignored = () if resuming else ("deltas",)  # --delta PARTIAL: the previous deltas are inside it
    theirs = marker.settings
    differ = sorted(k for k in set(settings) | set(theirs) if k not in ignored and settings.get(k) != theirs.get(k))
    if differ:
        raise PruneCliError(f"{where} is an unfinished edit run made with other options ("
                            + "; ".join(f"{k}: {theirs.get(k)!r} there, {settings.get(k)!r} here" for k in differ)
                            + "); continue it with the options it was started with")
    done = [r.to_json() for r in load_requests(o.requests, marker.start, marker.next - marker.start)]
    if _as_stored(done) != prior.requests[len(prior.requests) - len(done):]:
        raise PruneCliError(f"{where} is an unfinished edit run whose edits are not records {marker.start}-"
                            f"{marker.next - 1} of {o.requests}: continue it with the requests file it was started "
                            f"with ({marker.requests})")
    if marker.next >= end:
        raise PruneCliError(f"{where} already holds records {marker.start}-{marker.next - 1}: nothing is left of "
                            f"records {o.start}-{end - 1}")
    return _Span(marker.start, marker.next, end, settings)


def _finished_output(o: EditOptions, method: str, delta: Delta, requests: list[EditRequest]) -> EditResult:
    """`resume` on an output that is no longer partial: the run had finished (nothing to do) if its last edits are
    these requests; anything else is not this run's output."""
    mine = _as_stored([r.to_json() for r in requests])
    if delta.requests[len(delta.requests) - len(mine):] != mine:
        raise PruneCliError(f"--resume: {o.output} is a finished delta of other edits, not an unfinished run of these "
                            "requests; choose another output, or --force without --resume to replace it")
    op = next(h for h in reversed(delta.history) if h.get("op") == "edit")
    hparams = op.get("hparams", {})
    log.info(f"{o.output} already holds every edit of this run (records {o.start}-{requests[-1].index}): nothing to "
             "resume")
    return EditResult(o, op.get("method", method), list(hparams.get("layers", [])), hparams, EditRun(delta))


def run_edit_job(options: EditOptions, progress: Progress = no_progress) -> EditResult:
    """Edit the requests into the model (after the previous deltas) and write the accumulated delta. Everything
    that can be checked without the model is checked before it loads. Ctrl-C or SIGTERM (a KeyboardInterrupt)
    writes the finished edits marked partial and is raised again with a note saying what was written."""
    o = options
    method = o.method or (file_method(o.hparams) if o.hparams is not None else None) or "rome"
    editor = editor_for(method, EditorInputs(o.hparams, tuple(o.overrides), o.archive))
    model_path = resolve_model_path(str(o.model))
    resumed = _output_to_resume(o)
    check_output_path(Path(o.output), o.force or resumed is not None, is_dir=False, inputs=[
        ("model", model_path), ("requests file", o.requests), ("statistics file", o.stats), ("archive", o.archive),
        ("hyper-parameter file", o.hparams), ("NAS anchor", o.nas), *labelled("delta", o.deltas)])
    if o.nas is not None and not editor.nas:
        raise PruneCliError(f"--nas applies to the editors that optimise a target value (ROME, MEMIT, AlphaEdit), "
                            f"not {method}")
    if editor.needs_stats and o.stats is None:
        raise PruneCliError(f"{method} needs key statistics: compute them with `prunecli stats {o.model} --method "
                            f"{method} --text FILE -o STATS` and pass --stats STATS")
    schedule = _schedule(o)
    if o.check not in CHECKS:
        raise PruneCliError(f"unknown edit check {o.check!r}; use one of {', '.join(CHECKS)}")
    if o.load.dtype.lower() not in ("fp32", "float32", "bf16", "bfloat16"):
        raise PruneCliError(f"--dtype must be fp32 or bf16 for editing, got {o.load.dtype!r}")
    if o.checkpoint_every < 0:
        raise PruneCliError(f"--checkpoint-every must be 0 (only when stopped) or more, got {o.checkpoint_every}")
    sphere = o.sphere.for_method(method) if o.sphere is not None else None
    if sphere is not None:
        sphere.check()
    requests = load_requests(o.requests, o.start, o.limit)
    if resumed is not None and resumed.partial is None:
        return _finished_output(o, method, resumed, requests)
    checkpoint = Checkpoint(model_path, o.load.allow_pickle)
    prior = resumed if resumed is not None else load_deltas(o.deltas, checkpoint)
    span = _span(o, requests, prior, _settings(o, editor, schedule), resumed is not None)
    requests = requests[span.first - o.start:]
    if prior is not None:
        prior.check_base(checkpoint, o.ignore_base_mismatch)
    if o.stats is not None and not editor.uses_stats:
        log.info(f"--stats is not used: {method} needs no key statistics")
    # read once, before the model loads
    key_stats = KeyStats.load(o.stats) if o.stats is not None and editor.uses_stats else None
    anchor = Anchor.load(o.nas) if o.nas is not None else None
    editor.check_base(checkpoint)

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
    if sphere is not None:
        provenance["sphere"] = sphere.to_json()  # every update of these edits was projected so
    if anchor is not None:
        anchor.check(base, method, editor.value_site(adapter, hp)[0], o.nas)
        provenance["nas"] = {"path": str(o.nas), **anchor.to_json(), "drop_at": drop_at(method)}
    writer = _PartialWriter(Path(o.output), str(o.requests), span, o.force or resumed is not None)
    run = run_edits(model, tokenizer, base, requests, editor, hp, moments, prior, o.batch_size, schedule, o.seed,
                    provenance, progress, o.check, o.checkpoint_every, writer, sphere,
                    anchor.value if anchor is not None else None)
    if run.stopped is not None:
        raise _kept(run, writer, run.stopped)
    n, failed = len(run.reports), [r.index for r in run.failed]
    if failed and (o.strict or len(failed) == n):
        why = "--strict" if len(failed) < n else "no edit took"
        raise PruneCliError(f"{len(failed)} of {n} edit(s) did not take (records {ranges(failed)}); {why}: "
                            f"{writer.left()}")
    run.delta.save(o.output, writer.force)
    continued = span.first if prior is not None and prior.partial is not None else None
    return EditResult(o, method, list(hp.layers), hp.to_json(), run, continued)


def _kept(run: EditRun, writer: _PartialWriter, stop: KeyboardInterrupt) -> KeyboardInterrupt:
    """The interrupt, after the finished edits were written marked partial, with a note saying what was written and
    how to continue (no note when no edit had finished: then nothing was written)."""
    n = len(run.reports)
    if n:
        writer(run.delta, n, "terminated" if isinstance(stop, Terminated) else "interrupted")
        span, out = writer.span, writer.output
        nxt = span.first + n
        stop.add_note(f"wrote {out} with {nxt - span.start} of the {span.end - span.start} edits (records "
                      f"{span.start}-{nxt - 1}; {n} in this run), marked partial; continue with the same command and "
                      f"--resume (or --delta {out} --start {nxt} -o OTHER)")
    return stop
