"""The one interface every editor implements, and the records it returns.

An editor receives requests, computes its update on the *current* model (all earlier edits applied), adds the update
to the model's weights in memory, and returns it as low-rank factors in math orientation (D = a b^T, [out, in]), which
the sequential driver accumulates into the delta file.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from prunecli.editors.hparams import EditHParams
from prunecli.models.adapters import ModelAdapter
from prunecli.requests import EditRequest


@dataclass(frozen=True)
class LayerUpdate:
    """The update of one layer's projection: D = a @ b.T with a [out, r], b [in, r] (float32)."""

    layer: int
    a: torch.Tensor
    b: torch.Tensor


@dataclass(frozen=True)
class RequestOutcome:
    """How the value optimisation went for one request (mean target NLL with and without the shift)."""

    loss: float
    initial_loss: float
    steps: int


@dataclass
class EditContext:
    """Everything an editor needs besides the model and the requests."""

    hparams: EditHParams
    prefixes: list[str]  # context prefixes; prefixes[0] == "" (the bare prompt)
    moments: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> C = E[k k^T] (float64)


class Editor(ABC):
    """A knowledge-editing method."""

    method: str
    needs_stats: bool

    @abstractmethod
    def apply(self, model: torch.nn.Module, tokenizer, adapter: ModelAdapter,  # noqa: ANN001 - HF tokenizer
              requests: Sequence[EditRequest], ctx: EditContext) -> tuple[list[LayerUpdate], list[RequestOutcome]]:
        """Edit `requests` into `model` (in place) and return the updates and one outcome per request."""


def editor_for(method: str) -> Editor:
    from prunecli.editors.memit import MemitEditor
    from prunecli.editors.rome import RomeEditor

    editors: dict[str, Editor] = {"rome": RomeEditor(), "memit": MemitEditor()}
    if method not in editors:
        from prunecli.errors import PruneCliError

        raise PruneCliError(f"unknown editing method {method!r}; use one of {', '.join(editors)}")
    return editors[method]
