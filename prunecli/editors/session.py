"""Sequential editing: requests (ROME) or batches (MEMIT) applied one after another to one model, as in the papers.

The driver starts from the *base* model. Context prefixes are generated on it (seeded) before any delta is applied,
then the previous deltas (`--delta PREV`) are added in memory. Each step computes its update on the model with every
earlier edit applied, adds it to the model and to the accumulated delta. So `edit --delta a -o b` over requests
N..M produces the same factors as one run over requests 0..M.

With a PRUNE schedule, after every K edits (counted over the whole delta, previous files included) and/or as soon as
kappa(W + D) of an edited matrix exceeds a threshold (checked after every edit, on W's Gram matrix formed once:
`BaseSpectra`), the accumulated delta is restrained against the base and the model is reset to base + restrained delta
before editing continues (the paper's "multiple" mode, appendix C.6, and an adaptive one). The delta's history records
each run of edits and each restraint in order; a restraint's entry says after how many edits it ran, why, and kappa
before/after per matrix. State an editor needs to continue later (AlphaEdit's edited keys, UltraEdit's normaliser)
travels in the delta's extra tensors.

A run can stop between steps and continue later with the same result, bit for bit: after every step the edited
weights are set to base + D (rounded once from the delta, not accumulated edit by edit), so the model depends only
on the delta file; a continued delta (its history ending in a `partial` entry, `core.history.PartialOp`) has its open
edit op extended rather than a new one started; prefixes are always generated on the base model, the restraint
schedule counts over the whole delta, and batches stop only at batch boundaries. The driver hands the finished
work to a checkpoint callback every K edits, and when Ctrl-C or SIGTERM stops it, returns that work with the
interrupt (`EditRun.stopped`) for the caller to write; it writes no file itself.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from prunecli.core.checkpoint import Checkpoint
from prunecli.core.delta import Delta, DeltaEntry, check_finite_weight
from prunecli.core.history import EditOp
from prunecli.core.restraint import BaseSpectra, RestraintSettings, TensorReport, restrain_delta
from prunecli.core.restraint_functions import SphereSettings
from prunecli.core.sphere import principal_directions, project_update
from prunecli.editors.base import EditContext, Editor, EditSettings
from prunecli.editors.keys import prefix_weights
from prunecli.editors.prompts import generate_prefixes
from prunecli.editors.success import TEACHER_FORCED, check_edits
from prunecli.errors import PruneCliError
from prunecli.models.adapters import resolve_adapter
from prunecli.models.placement import input_device, read_tensor, write_tensor
from prunecli.models.scoring import score_targets
from prunecli.progress import Progress, ProgressTask, no_progress
from prunecli.requests import EditRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PruneSchedule:
    """Restrain the accumulated delta with `restraint` after every `every` edits and/or whenever kappa(W + D) of an
    edited matrix exceeds `kappa_trigger` (at least one of the two is set)."""

    restraint: RestraintSettings = field(default_factory=RestraintSettings)
    every: int | None = None
    kappa_trigger: float | None = None

    def reason(self, edits_before: int, edits_after: int, kappas: dict[str, float]) -> str | None:
        """Why a restraint is due after edits `edits_before`..`edits_after` given the kappas (None: not due)."""
        if self.every is not None and edits_after // self.every > edits_before // self.every:
            return "every"
        if self.kappa_trigger is not None and max(kappas.values(), default=0.0) > self.kappa_trigger:
            return "kappa"
        return None


@dataclass(frozen=True)
class RequestReport:
    """What one edit did: probabilities of the whole target sequence on the edit prompt before and after, and the
    success check after it (`editors.success`: mean token probabilities of the new and true target, whether the
    edit took, and with the generation check what greedy decoding wrote)."""

    index: int
    case_id: Any
    prompt: str
    target_new: str
    loss: float  # mean target NLL reached by the value optimisation
    initial_loss: float
    steps: int
    prob_before: float
    prob_after: float
    seconds: float
    new_mean_prob: float
    true_mean_prob: float | None
    took: bool
    generated: str | None = None
    dropped: bool = False  # NAS dropped its change (`editors.nas`)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EditRun:
    """Result of a sequential run: the accumulated delta and per-request/per-restraint reports. When an interrupt
    stopped the run (`stopped`), they hold the steps that had finished."""

    delta: Delta
    reports: list[RequestReport] = field(default_factory=list)
    restraints: list[list[TensorReport]] = field(default_factory=list)
    restraint_points: list[dict[str, Any]] = field(default_factory=list)  # after_edits, trigger of each restraint
    seconds: float = 0.0  # the whole run: context prefixes, previous deltas, then the edits
    edit_seconds: float = 0.0  # the edits alone (what the progress line's s/item divides)
    stopped: KeyboardInterrupt | None = None  # Ctrl-C / SIGTERM, caught between steps

    @property
    def failed(self) -> list[RequestReport]:
        """The edits that did not take."""
        return [r for r in self.reports if not r.took]


def _target_probs(model: torch.nn.Module, tokenizer, requests: Sequence[EditRequest]) -> list[float]:  # noqa: ANN001
    scores = score_targets(model, tokenizer, [r.text for r in requests], [r.target_new for r in requests])
    return [math.exp(sum(s.token_logprobs)) for s in scores]


def _report(task: ProgressTask, reports: list[RequestReport]) -> None:
    """Progress after a step: the requests done, the last loss, and a warning line per edit that did not take."""
    for r in reports:
        if r.dropped:
            task.log(f"NAS dropped the change of record {r.index}: its target's norm was over the limit, so the "
                     "edit adds nothing", warning=True)
        elif not r.took:
            true = f", P(true) {r.true_mean_prob:.3g}" if r.true_mean_prob is not None else ""
            said = f"; greedy decoding wrote {r.generated!r}" if r.generated is not None else ""
            task.log(f"edit of record {r.index} did not take: P(new) {r.new_mean_prob:.3g}{true} on its prompt "
                     f"(mean token probability){said}", warning=True)
    task.advance(len(reports), loss=f"loss {reports[-1].initial_loss:.2f} -> {reports[-1].loss:.2f}")


def reset_to(model: torch.nn.Module, base: Checkpoint, delta: Delta, names: Iterable[str] | None = None) -> None:
    """Set every parameter the delta touches (or those of `names`) to base + D, undoing whatever was added before,
    offloaded ones too; a sum with NaN/Inf is refused, naming the tensor."""
    for name in delta.entries if names is None else names:
        weight = base.get(name)
        value = weight.float() + delta.entries[name].stored_update(torch.float32)
        check_finite_weight(name, value, weight)
        write_tensor(model, name, value)


def _copy(delta: Delta) -> Delta:
    return Delta(dict(delta.entries), dict(delta.fingerprints), delta.model_type, delta.source, list(delta.history),
                 dict(delta.extras))


def _difference(key: str, theirs: Any, mine: Any) -> str:
    if isinstance(theirs, dict) and isinstance(mine, dict):
        return f"{key} {', '.join(k for k in sorted(set(theirs) | set(mine)) if theirs.get(k) != mine.get(k))}"
    return f"{key} ({theirs!r} there, {mine!r} here)"


@dataclass
class OpenOp:
    """The edit op a run is extending (closed by a restraint or the run's end): its requests as the history stores
    them, and the records among them whose change NAS dropped."""

    requests: list[dict[str, Any]] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)

    def clear(self) -> None:
        self.requests.clear()
        self.dropped.clear()


def continue_partial(delta: Delta, op: EditOp) -> tuple[Delta, OpenOp]:
    """(`delta` ready to be continued, its open edit op): a delta whose history ends in a `partial` entry loses that
    entry and, when the entry before it is the stopped run's edit op, that op too, whose requests are returned to be
    extended, so the finished run has one edit op between restraints as if it never stopped. That op must have `op`'s
    method, hyper-parameters, seed and provenance. Any other delta is returned as it is."""
    if delta.partial is None:
        return delta, OpenOp()
    history = delta.history[:-1]
    if not history or history[-1].get("op") != "edit":  # stopped right after a restraint: no open op
        return replace(delta, history=history), OpenOp()
    theirs, mine = history[-1], json.loads(json.dumps(op.to_json()))  # as the file holds it
    differ = [_difference(k, theirs.get(k), mine.get(k))
              for k in sorted((set(theirs) | set(mine)) - {"requests", "nas_dropped"}) if theirs.get(k) != mine.get(k)]
    if differ:
        raise PruneCliError(f"cannot continue the unfinished edit run: it was made with other settings "
                            f"({'; '.join(differ)}); repeat its options")
    return replace(delta, history=history[:-1]), OpenOp(list(theirs["requests"]), list(theirs.get("nas_dropped", [])))


class SphereProjection:
    """SPHERE on every update an editor makes (`core.sphere`): each update is projected away from the principal
    directions of the weight it changes, read from the model as it is at that moment (`current`) or from the base
    checkpoint (`pretrained`, computed once per weight)."""

    def __init__(self, settings: SphereSettings, model: torch.nn.Module, base: Checkpoint) -> None:
        self.settings, self.model, self.base = settings, model, base
        self._pretrained: dict[str, torch.Tensor] = {}

    def basis(self, name: str) -> torch.Tensor:
        if self.settings.basis == "current":
            return principal_directions(read_tensor(self.model, name), self.settings.eta)
        if name not in self._pretrained:
            self._pretrained[name] = principal_directions(self.base.get(name), self.settings.eta)
        return self._pretrained[name]

    def __call__(self, name: str, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.settings.alpha is not None  # resolved for the method (`SphereSettings.for_method`)
        return project_update(a, b, self.base.layout(name), self.basis(name), self.settings.alpha)


def run_edits(model: torch.nn.Module, tokenizer, base: Checkpoint, requests: Sequence[EditRequest],  # noqa: ANN001
              editor: Editor, hparams: EditSettings, moments: dict[int, torch.Tensor] | None = None,
              prior: Delta | None = None, batch_size: int = 1, prune: PruneSchedule | None = None, seed: int = 0,
              provenance: dict[str, Any] | None = None, progress: Progress = no_progress,
              check: str = TEACHER_FORCED, checkpoint_every: int | None = None,
              on_checkpoint: Callable[[Delta, int], None] | None = None,
              sphere: SphereSettings | None = None, anchor: float | None = None) -> EditRun:
    """Edit `requests` into the base `model` (in place) after `prior`; returns the accumulated delta.

    `model` must be the base model as loaded (no delta applied): prefixes are generated on it first. Batched
    editors (MEMIT, AlphaEdit) edit `batch_size` requests at a time, the others one at a time. `provenance` is merged
    into each edit op of the history. `progress` gets two tasks: the requests (with the last value-optimisation
    loss; an edit that did not take is logged as a warning) and the steps of the value optimisation in progress.
    `check` is the rule that says whether an edit took (`editors.success`: teacher-forced or generation).
    `on_checkpoint(delta, edits)` receives the finished work after every `checkpoint_every` edits of this run (at
    the end of the step that reaches them; not after the last step). A KeyboardInterrupt (Ctrl-C, or SIGTERM as the
    CLI raises it) is caught: the run returns the steps that had finished, with the interrupt in `stopped`.
    `sphere` (settings with alpha resolved) projects every update the editor makes (`SphereProjection`). `anchor`
    (NAS, `editors.nas`) rescales every target value to that norm or drops its change; the edit ops list the
    records it dropped (`nas_dropped`).
    """
    started = time.perf_counter()
    adapter = resolve_adapter(model)
    model.requires_grad_(False)
    device = input_device(model)
    if hparams.context_template_length_params:
        count = sum(n for _, n in hparams.context_template_length_params)
        log.info(f"generating {count} context prefixes on the base model (seed {seed})")
    prefixes = generate_prefixes(model, tokenizer, hparams.context_template_length_params, seed)
    op = EditOp(editor.method, hparams.to_json(), seed, [], provenance or {})
    total, pending = continue_partial(_copy(prior), op) if prior is not None else (Delta.for_base(base), OpenOp())
    reset_to(model, base, total)
    ctx = EditContext(hparams, prefixes, {L: c.to(device) for L, c in (moments or {}).items()}, dict(total.extras),
                      prior is not None)
    if sphere is not None:
        ctx.restrain_update = SphereProjection(sphere, model, base)
    ctx.anchor = anchor
    ctx.key_weights = prefix_weights(hparams.context_template_length_params,
                                     getattr(hparams, "key_averaging", "prompts"))
    step = batch_size if editor.batched else 1
    run = EditRun(total)
    spectra = BaseSpectra(base)

    def finished() -> Delta:
        """The delta of the finished steps: its open edit op closed, the carried state as it is now (copies: the
        run goes on changing its own)."""
        closing = replace(op, requests=list(pending.requests), dropped=list(pending.dropped) if anchor else None)
        history = [*run.delta.history, *([closing.to_json()] if pending.requests else [])]
        return replace(run.delta, entries=dict(run.delta.entries), fingerprints=dict(run.delta.fingerprints),
                       history=history, extras=dict(ctx.carried))

    last = (finished(), 0, 0)  # (delta, reports, restraints) after the last finished step
    with progress("editing", len(requests)) as requests_task, \
            progress("  value optimisation (steps)") as ctx.value_task:
        editing = time.perf_counter()
        try:
            for start in range(0, len(requests), step):
                batch = requests[start:start + step]
                t0 = time.perf_counter()
                before = _target_probs(model, tokenizer, batch)
                updates, outcomes = editor.apply(model, tokenizer, adapter, batch, ctx)
                touched = [base.canonical(u.weight or adapter.weight_name(u.layer)) for u in updates]
                for name, u in zip(touched, updates):
                    run.delta.add(name, DeltaEntry.lowrank(u.a, u.b, base.layout(name)), base)
                reset_to(model, base, run.delta, dict.fromkeys(touched))  # base + D, however the editor rounded
                checks = check_edits(model, tokenizer, batch, check)
                edits_before = len(run.delta.requests) + len(pending.requests)
                pending.requests.extend(r.to_json() for r in batch)
                pending.dropped.extend(r.index for r, o in zip(batch, outcomes) if o.dropped)
                seconds = (time.perf_counter() - t0) / len(batch)
                reports = [RequestReport(r.index, r.case_id, r.text, r.target_new, o.loss, o.initial_loss, o.steps,
                                         p0, c.sequence_prob_new, seconds, c.prob_new, c.prob_true, c.took,
                                         c.generated, o.dropped)
                           for r, o, p0, c in zip(batch, outcomes, before, checks)]
                run.reports.extend(reports)
                if prune is not None:
                    _restrain_if_due(run, prune, spectra, model, base, edits_before, len(batch), finished, pending)
                last = (finished(), len(run.reports), len(run.restraints))
                _report(requests_task, reports)
                done = len(run.reports)
                if (on_checkpoint is not None and checkpoint_every and start + step < len(requests)
                        and done // checkpoint_every > (done - len(batch)) // checkpoint_every):
                    on_checkpoint(last[0], done)
        except KeyboardInterrupt as exc:
            run.stopped = exc
        run.edit_seconds = time.perf_counter() - editing
    run.delta, n_reports, n_restraints = last
    del run.reports[n_reports:], run.restraints[n_restraints:], run.restraint_points[n_restraints:]
    run.seconds = time.perf_counter() - started
    return run


def _restrain_if_due(run: EditRun, prune: PruneSchedule, spectra: BaseSpectra, model: torch.nn.Module,
                     base: Checkpoint, edits_before: int, batch: int, finished: Callable[[], Delta],
                     pending: OpenOp) -> None:
    """After a step: restrain the accumulated delta when the schedule says so (closing the open edit op first, so
    the history says after which edits it ran) and set the model to base + the restrained delta."""
    edits_after = edits_before + batch
    kappas = ({name: spectra.kappa(name, entry) for name, entry in run.delta.entries.items()}
              if prune.kappa_trigger is not None else {})
    reason = prune.reason(edits_before, edits_after, kappas)
    if reason is None:
        return
    run.delta = finished()
    pending.clear()
    record = {"after_edits": edits_after, "trigger": reason,
              **({"kappa_trigger": prune.kappa_trigger} if reason == "kappa" else {})}
    run.delta, tensor_reports = restrain_delta(run.delta, base, prune.restraint, spectra=spectra, record=record)
    run.restraints.append(tensor_reports)
    run.restraint_points.append(record)
    reset_to(model, base, run.delta)
