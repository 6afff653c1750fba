"""NAS, norm-anchor scaling (arXiv 2602.02543): every edit's target value gets one fixed norm.

Sequential editing collapses through a feedback loop: edited weights raise the norm of later edits' target values,
whose updates raise the weights' norm further. NAS cuts the loop by giving every target value the same norm, the
anchor a of the edited layer, measured once on the unedited model. With v0 the current output of the edited layer's
MLP projection at the subject's last token and delta the optimised shift, v* = v0 + delta; then

    |v*| > drop x a  ->  the edit's change is dropped (v* = v0: the request stays in its batch with no shift)
    otherwise        ->  v* = a v* / (|v*| + 1e-10)

with drop = 2 for the batch editors (MEMIT, AlphaEdit) and 5 for ROME, whose target is its whole value W k* + delta.
The rest of each editor is unchanged: it receives the rescaled shift v* - v0.

For MEMIT and AlphaEdit, whose value optimisation shifts the residual stream after the layer (h, at the subject's last
token), the target becomes z = (h - v0) + v*, as in the official code; where the block normalises its MLP output
(Gemma-3) the shift is optimised on the projection output itself, so v0 is that output and v* replaces it.

The anchor is the upper-trimmed mean of |v0 + delta| over rewrites that are not being edited (CounterFact's training
split), computed with the editor's own value optimisation on the unedited model, on the bare prompts (no context
prefixes, as the official code): the floor(n / 20) largest norms are dropped (none when n < 20). It is kept as a
prunecli file (`ANCHOR` kind: the norms, the layer and the fingerprint of its weight, the method and its settings), so
`edit --nas ANCHOR` refuses an anchor of another model, layer or method.

One deviation: the official anchor optimises 16 rewrites at a time with one early stop for the batch (its mean loss);
here each rewrite stops on its own loss, as in an edit (`value.optimize_values`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from prunecli.core.artifacts import NAS_ANCHOR, read_artifact, write_artifact
from prunecli.core.checkpoint import Checkpoint
from prunecli.editors.keys import subject_keys
from prunecli.editors.value import ValueHParams, optimize_values
from prunecli.errors import PruneCliError
from prunecli.models.adapters import ModelAdapter
from prunecli.progress import ProgressTask
from prunecli.requests import EditRequest

DROP_AT = {"rome": 5.0}
"""How many anchors a target's norm may reach before the edit is dropped: 5 for ROME, DEFAULT_DROP_AT otherwise."""
DEFAULT_DROP_AT = 2.0
EPS = 1e-10


def trimmed_mean(norms: torch.Tensor) -> float:
    """The mean of `norms` without its floor(n / 20) largest values (all of them when n < 20)."""
    values = norms.double().flatten().sort().values
    drop = len(values) // 20
    kept = values[: len(values) - drop] if drop else values
    if not len(kept):
        raise PruneCliError("no target norms to anchor on")
    return float(kept.mean())


def anchored(v0: torch.Tensor, v_star: torch.Tensor, anchor: float,
             drop_at: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(the anchored targets [n, d], which edits were dropped [n]) for current values v0 and targets v* [n, d]."""
    norms = v_star.norm(dim=-1, keepdim=True)
    dropped = norms > drop_at * anchor
    scaled = anchor * v_star / (norms + EPS)
    return torch.where(dropped, v0.to(v_star.dtype), scaled), dropped[:, 0]


def drop_at(method: str) -> float:
    """How many anchors a target's norm may reach before `method`'s edit is dropped."""
    return DROP_AT.get(method, DEFAULT_DROP_AT)


def rescale(v0: torch.Tensor, shift: torch.Tensor, anchor: float, method: str) -> tuple[torch.Tensor, list[bool]]:
    """(the shifts [n, d] that give the anchored targets, which edits were dropped) for current values v0 [n, d] and
    optimised shifts [n, d]: v0 + result = `anchored(v0, v0 + shift)`, computed in float64."""
    v0 = v0.double()
    targets, dropped = anchored(v0, v0 + shift.to(v0.device, torch.float64), anchor, drop_at(method))
    return (targets - v0).to(shift.dtype), dropped.tolist()


def projection_outputs(model: torch.nn.Module, tokenizer, adapter: ModelAdapter, layer: int,  # noqa: ANN001
                       requests: Sequence[EditRequest]) -> torch.Tensor:
    """v0 [n, d]: the MLP output projection's output at each subject's last token of the bare edit prompts."""
    projection = adapter.projection(layer)
    _, bare = subject_keys(model, tokenizer, projection, requests, [""], {"m": (projection, "output")})
    return bare["m"]


def target_norms(model: torch.nn.Module, tokenizer, adapter: ModelAdapter, layer: int,  # noqa: ANN001
                 site: torch.nn.Module, requests: Sequence[EditRequest], hparams: ValueHParams,
                 task: ProgressTask | None = None) -> torch.Tensor:
    """|v0 + delta| [n] (float32) of each request on the model as it is: delta from the value optimisation at `site`
    on the bare prompts, v0 the projection's output (`projection_outputs`; the site's own initial output when the
    site is the projection)."""
    values = optimize_values(model, tokenizer, adapter, layer, site, requests, [""], hparams, task)
    shifts = torch.stack([v.delta for v in values])
    v0 = (torch.stack([v.initial for v in values]) if site is adapter.projection(layer)
          else projection_outputs(model, tokenizer, adapter, layer, requests))
    return (v0.to(shifts.device) + shifts).norm(dim=1).float().cpu()


@dataclass(frozen=True)
class Anchor:
    """A measured anchor: the norms it came from and where (layer, weight, its fingerprint, the method)."""

    norms: torch.Tensor  # [n] float32: |v0 + delta| of each rewrite
    layer: int
    weight: str
    fingerprint: str
    method: str
    settings: dict[str, Any]  # the value optimisation it was measured with, and the records
    model_type: str | None = None
    source: str | None = None

    @property
    def value(self) -> float:
        return trimmed_mean(self.norms)

    def to_json(self) -> dict[str, Any]:
        return {"anchor": self.value, "layer": self.layer, "weight": self.weight, "method": self.method,
                "n": len(self.norms), "trimmed": len(self.norms) // 20}

    def save(self, path: str | os.PathLike[str], force: bool = False) -> None:
        doc = {"layer": self.layer, "weight": self.weight, "fingerprint": self.fingerprint, "method": self.method,
               "settings": self.settings, "model_type": self.model_type, "source": self.source,
               "anchor": self.value}
        write_artifact(path, NAS_ANCHOR, doc, {"norms": self.norms.float()}, force)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Anchor:
        doc, tensors = read_artifact(path, NAS_ANCHOR)
        norms = tensors.get("norms")
        if norms is None or norms.ndim != 1 or not len(norms) or not bool(torch.isfinite(norms).all()):
            raise PruneCliError(f"invalid NAS anchor {path}: its norms are missing, empty or not finite")
        try:
            return cls(norms, int(doc["layer"]), str(doc["weight"]), str(doc["fingerprint"]), str(doc["method"]),
                       dict(doc.get("settings") or {}), doc.get("model_type"), doc.get("source"))
        except (KeyError, TypeError, ValueError) as exc:
            raise PruneCliError(f"invalid NAS anchor {path}: {exc}") from None

    def check(self, base: Checkpoint, method: str, layer: int, path: Path | str) -> None:
        """Refuse an anchor measured on another model, layer or method (one line naming what differs)."""
        if self.method != method or self.layer != layer:
            raise PruneCliError(f"NAS anchor {path} was measured for {self.method} at layer {self.layer}, not "
                                f"{method} at layer {layer}: measure one with `prunecli anchor --method {method}`")
        try:
            same = base.fingerprint(self.weight) == self.fingerprint
        except PruneCliError:
            same = False
        if not same:
            raise PruneCliError(f"NAS anchor {path} was measured on another model ({self.source or 'unknown'}): "
                                f"{self.weight} of {base.path} differs from the weight it was measured on")
