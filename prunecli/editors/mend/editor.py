"""`edit --method mend`: the MEND editor, applying a trained archive's networks (`editors.mend`) to each request.

Separate from the networks' module because it needs the archive file format (`editors.mend_archive`), which itself
builds on the networks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from prunecli.core.checkpoint import Checkpoint
from prunecli.editors.base import EditContext, Editor, EditorInputs, LayerUpdate, RequestOutcome
from prunecli.editors.mend.archive import MendArchive
from prunecli.editors.mend.networks import add_to_weight, edit_factors, encode_targets, sequence_nll
from prunecli.errors import PruneCliError
from prunecli.models.adapters import ModelAdapter
from prunecli.models.placement import input_device
from prunecli.requests import EditRequest


@dataclass(frozen=True)
class MendHParams:
    """What `edit --method mend` records in the delta history (an `editors.base.EditSettings`: the edited layers, no
    context prefixes, a JSON form)."""

    layers: tuple[int, ...]
    archive: str
    archive_info: dict[str, Any] = field(default_factory=dict)
    method: str = "mend"
    context_template_length_params: tuple[tuple[int, int], ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "layers": list(self.layers), "archive": self.archive, **self.archive_info}


class MendEditor(Editor):
    """Edits one request at a time with a trained archive's networks (on the model with earlier edits applied).

    Its settings are the archive's: a hyper-parameter file or overrides are refused."""

    method = "mend"
    uses_stats = False

    def __init__(self, archive: MendArchive, inputs: EditorInputs = EditorInputs()) -> None:
        self.archive, self.inputs = archive, inputs
        self.networks = archive.networks.eval()

    @classmethod
    def from_inputs(cls, inputs: EditorInputs) -> MendEditor:
        if inputs.archive is None:
            raise PruneCliError("mend needs a trained archive: pass --archive FILE (made by `prunecli train-mend`)")
        if inputs.hparams_file is not None or inputs.overrides:
            raise PruneCliError("--hparams/--set do not apply to mend: its settings are in the archive")
        return cls(MendArchive.load(inputs.archive), inputs)

    def check_base(self, base: Checkpoint) -> None:
        self.archive.check_base(base, self.inputs.archive)

    def resolve_hparams(self, model: nn.Module, adapter: ModelAdapter,
                        on_note: Callable[[str], None] | None = None) -> MendHParams:
        info = {"trained_steps": self.archive.training.get("steps"), "rank": self.networks.config.rank,
                "weights": [t.name for t in self.networks.targets]}
        return MendHParams(self.archive.layers, str(self.inputs.archive), info)

    def apply(self, model: nn.Module, tokenizer, adapter: ModelAdapter,  # noqa: ANN001
              requests: Sequence[EditRequest], ctx: EditContext) -> tuple[list[LayerUpdate], list[RequestOutcome]]:
        device = input_device(model)
        self.networks.to(device)
        updates, outcomes = [], []
        for request in requests:
            loss, factors = edit_factors(model, tokenizer, self.networks, [request])
            with torch.no_grad():
                per_weight = self.networks.updates(factors)
            for t in self.networks.targets:
                a, b = ctx.restrain_update(t.name, *per_weight[t.name])
                add_to_weight(model, t, a, b)
                updates.append(LayerUpdate(t.layer, a.float(), b.float(), weight=t.name))
            with torch.no_grad():
                batch = encode_targets(tokenizer, [request.text], [request.target_new], device)
                after = float(sequence_nll(model(**batch.inputs()).logits, batch)[0])
            outcomes.append(RequestOutcome(after, loss, 1))
        return updates, outcomes
