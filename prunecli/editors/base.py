"""The one interface every editor implements, and the records it returns.

An editor receives requests, computes its update on the *current* model (all earlier edits applied), adds the update
to the model's weights in memory, and returns it as low-rank factors in math orientation (D = a b^T, [out, in]), which
the sequential driver accumulates into the delta file.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from prunecli.editors.hparams import EditHParams
from prunecli.models.adapters import ModelAdapter
from prunecli.requests import EditRequest


@dataclass(frozen=True)
class LayerUpdate:
    """The update of one layer's weight: D = a @ b.T with a [out, r], b [in, r] (float32).

    `weight` names the parameter when it is not the layer's MLP output projection (MEND edits every MLP matrix)."""

    layer: int
    a: torch.Tensor
    b: torch.Tensor
    weight: str | None = None


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
    # State an editor carries from delta to delta (`Delta.extras`): editors read and update it in place, the driver
    # starts it from the previous deltas' extras and stores it in the output delta.
    carried: dict[str, torch.Tensor] = field(default_factory=dict)
    continues: bool = False  # True when editing continues previous deltas (`--delta`): `carried` came from them
    # Called after each step of a value optimisation with (step, steps planned, target NLL): progress within an edit.
    on_value_step: Callable[[int, int, float], None] | None = None


class Editor(ABC):
    """A knowledge-editing method."""

    method: str
    needs_stats: bool
    batched: bool = False  # edits a batch of requests at once (--batch-size) rather than one after another

    @abstractmethod
    def apply(self, model: torch.nn.Module, tokenizer, adapter: ModelAdapter,  # noqa: ANN001 - HF tokenizer
              requests: Sequence[EditRequest], ctx: EditContext) -> tuple[list[LayerUpdate], list[RequestOutcome]]:
        """Edit `requests` into `model` (in place) and return the updates and one outcome per request."""


def editor_for(method: str, archive: str | Path | None = None) -> Editor:
    """The editor of `method`; MEND's needs its trained `archive` (from `prunecli train-mend`), the others none."""
    from prunecli.editors.alphaedit import AlphaEditEditor
    from prunecli.editors.memit import MemitEditor
    from prunecli.editors.rome import RomeEditor
    from prunecli.errors import PruneCliError

    editors: dict[str, type[Editor]] = {"rome": RomeEditor, "memit": MemitEditor, "alphaedit": AlphaEditEditor}
    if method == "mend":
        if archive is None:
            raise PruneCliError("mend needs a trained archive: pass --archive FILE (made by `prunecli train-mend`)")
        from prunecli.editors.mend import MendEditor
        from prunecli.editors.mend_archive import MendArchive

        return MendEditor(MendArchive.load(archive))
    if method not in editors:
        raise PruneCliError(f"unknown editing method {method!r}; use one of {', '.join([*editors, 'mend'])}")
    if archive is not None:
        raise PruneCliError(f"--archive is only used by --method mend, not {method}")
    return editors[method]()
