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
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from prunecli.core.checkpoint import Checkpoint
from prunecli.core.delta import Delta, DeltaEntry
from prunecli.core.history import EditOp
from prunecli.core.restraint import BaseSpectra, RestraintSettings, TensorReport, restrain_delta
from prunecli.editors.base import EditContext, Editor, HParams
from prunecli.editors.prompts import generate_prefixes
from prunecli.editors.success import check_edits
from prunecli.models.scoring import score_targets
from prunecli.models.adapters import resolve_adapter
from prunecli.models.loading import add_delta_to_model
from prunecli.models.placement import input_device, write_tensor
from prunecli.progress import Progress, ProgressTask, no_progress
from prunecli.requests import EditRequest


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
    success check after it (`editors.success`: mean token probabilities of the new and true target, and whether
    the edit took)."""

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

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EditRun:
    """Result of a sequential run: the accumulated delta and per-request/per-restraint reports."""

    delta: Delta
    reports: list[RequestReport] = field(default_factory=list)
    restraints: list[list[TensorReport]] = field(default_factory=list)
    restraint_points: list[dict[str, Any]] = field(default_factory=list)  # after_edits, trigger of each restraint
    seconds: float = 0.0

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
        if not r.took:
            true = f", P(true) {r.true_mean_prob:.3g}" if r.true_mean_prob is not None else ""
            task.log(f"edit of record {r.index} did not take: P(new) {r.new_mean_prob:.3g}{true} on its prompt "
                     "(mean token probability)", warning=True)
    task.advance(len(reports), loss=f"loss {reports[-1].initial_loss:.2f} -> {reports[-1].loss:.2f}")


def reset_to(model: torch.nn.Module, base: Checkpoint, delta: Delta) -> None:
    """Set every parameter the delta touches to base + D (undoing whatever was added before), offloaded ones too."""
    for name, entry in delta.entries.items():
        write_tensor(model, name, base.get(name).float() + entry.stored_update(torch.float32))


def _copy(delta: Delta) -> Delta:
    return Delta(dict(delta.entries), dict(delta.fingerprints), delta.model_type, delta.source, list(delta.history),
                 dict(delta.extras))


def run_edits(model: torch.nn.Module, tokenizer, base: Checkpoint, requests: Sequence[EditRequest],  # noqa: ANN001
              editor: Editor, hparams: HParams, moments: dict[int, torch.Tensor] | None = None,
              prior: Delta | None = None, batch_size: int = 1, prune: PruneSchedule | None = None, seed: int = 0,
              provenance: dict[str, Any] | None = None, progress: Progress = no_progress) -> EditRun:
    """Edit `requests` into the base `model` (in place) after `prior`; returns the accumulated delta.

    `model` must be the base model as loaded (no delta applied): prefixes are generated on it first. Batched
    editors (MEMIT, AlphaEdit) edit `batch_size` requests at a time, the others one at a time. `provenance` is merged
    into each edit op of the history. `progress` gets two tasks: the requests (with the last value-optimisation
    loss; an edit that did not take is logged as a warning) and the steps of the value optimisation in progress.
    """
    started = time.perf_counter()
    adapter = resolve_adapter(model)
    model.requires_grad_(False)
    device = input_device(model)
    prefixes = generate_prefixes(model, tokenizer, hparams.context_template_length_params, seed)
    total = _copy(prior) if prior is not None else Delta.for_base(base)
    if prior is not None:
        add_delta_to_model(model, prior)
    ctx = EditContext(hparams, prefixes, {L: c.to(device) for L, c in (moments or {}).items()},
                      dict(prior.extras) if prior is not None else {}, prior is not None)
    step = batch_size if editor.batched else 1
    run = EditRun(total)
    pending: list[dict[str, Any]] = []
    spectra = BaseSpectra(base)

    def flush() -> None:
        if pending:
            op = EditOp(editor.method, hparams.to_json(), seed, list(pending), provenance or {})
            run.delta = run.delta.with_entries(run.delta.entries, op)
            pending.clear()

    with progress("editing", len(requests)) as requests_task, \
            progress("  value optimisation (steps)") as ctx.value_task:
        for start in range(0, len(requests), step):
            batch = requests[start:start + step]
            t0 = time.perf_counter()
            before = _target_probs(model, tokenizer, batch)
            updates, outcomes = editor.apply(model, tokenizer, adapter, batch, ctx)
            checks = check_edits(model, tokenizer, batch)
            for u in updates:
                name = u.weight or adapter.weight_name(u.layer)
                run.delta.add(name, DeltaEntry.lowrank(u.a, u.b, base.layout(name)), base)
            edits_before = len(run.delta.requests) + len(pending)
            pending.extend(r.to_json() for r in batch)
            seconds = (time.perf_counter() - t0) / len(batch)
            reports = [RequestReport(r.index, r.case_id, r.text, r.target_new, o.loss, o.initial_loss, o.steps, p0,
                                     c.sequence_prob_new, seconds, c.prob_new, c.prob_true, c.took)
                       for r, o, p0, c in zip(batch, outcomes, before, checks)]
            run.reports.extend(reports)
            if prune is not None:
                edits_after = edits_before + len(batch)
                kappas = ({name: spectra.kappa(name, entry) for name, entry in run.delta.entries.items()}
                          if prune.kappa_trigger is not None else {})
                reason = prune.reason(edits_before, edits_after, kappas)
                if reason is not None:
                    flush()
                    record = {"after_edits": edits_after, "trigger": reason,
                              **({"kappa_trigger": prune.kappa_trigger} if reason == "kappa" else {})}
                    run.delta, tensor_reports = restrain_delta(run.delta, base, **prune.restraint.kwargs(),
                                                               spectra=spectra, record=record)
                    run.restraints.append(tensor_reports)
                    run.restraint_points.append(record)
                    reset_to(model, base, run.delta)
            _report(requests_task, reports)
    flush()
    run.delta.extras = dict(ctx.carried)
    run.seconds = time.perf_counter() - started
    return run
