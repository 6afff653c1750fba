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
from typing import Any, ClassVar, Protocol

import torch

from prunecli.core.checkpoint import Checkpoint
from prunecli.editors.hparams import HParams, ModelModules
from prunecli.errors import PruneCliError
from prunecli.models.adapters import ModelAdapter
from prunecli.progress import ProgressTask, silent_task
from prunecli.requests import EditRequest


@dataclass(frozen=True)
class LayerUpdate:
    """The update of one layer's weight: D = a @ b.T with a [out, r], b [in, r] (float32).

    `weight` names the parameter when it is not the layer's MLP output projection (MEND and UltraEdit edit others)."""

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
    dropped: bool = False  # NAS dropped the edit's change: its target's norm exceeded the limit (`editors.nas`)


class EditSettings(Protocol):
    """What the sequential driver reads of an editor's hyper-parameters (an `hparams.HParams` subclass, or MEND's
    settings from its archive)."""

    layers: tuple[int, ...]
    context_template_length_params: tuple[tuple[int, int], ...]  # context prefixes to generate; () for none

    def to_json(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class EditorInputs:
    """What the user gave an editor besides requests and statistics: a hyper-parameter file, `--set` overrides,
    a trained archive (MEND). Each editor says which of them it accepts."""

    hparams_file: Path | None = None
    overrides: Sequence[str] = ()
    archive: Path | None = None


UpdateRestraint = Callable[[str, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class EditContext:
    """Everything an editor needs besides the model and the requests."""

    hparams: Any  # the editor's own hyper-parameters (its `Editor.hparams` class)
    prefixes: list[str]  # context prefixes; prefixes[0] == "" (the bare prompt)
    moments: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> C = E[k k^T] (float64)
    # State an editor carries from delta to delta (`Delta.extras`): editors read and update it in place, the driver
    # starts it from the previous deltas' extras and stores it in the output delta.
    carried: dict[str, torch.Tensor] = field(default_factory=dict)
    continues: bool = False  # True when editing continues previous deltas (`--delta`): `carried` came from them
    # The steps of the value optimisation in progress (`update(completed=step, total=steps, ...)`).
    value_task: ProgressTask = field(default_factory=silent_task)
    # What every update goes through before it is added to the model (SPHERE's projection while editing; the driver
    # sets it): (weight name, a [out, r], b [in, r]) -> the factors to add and return.
    restrain_update: UpdateRestraint = field(default=lambda name, a, b: (a, b))
    # NAS (`editors.nas`): every target value is rescaled to this norm, or its change dropped (the driver sets it).
    anchor: float | None = None
    # Each prefix's weight in a key's average (`keys.prefix_weights`); None: a plain mean.
    key_weights: list[float] | None = None


class Editor(ABC):
    """A knowledge-editing method. The `edit` command and the sequential driver know editors only through this
    class: adding one is a module with a subclass plus a line in `editors.registry`."""

    method: ClassVar[str]
    hparams: ClassVar[type[HParams] | None] = None  # its hyper-parameter class (None: settings come otherwise)
    needs_stats: ClassVar[bool] = False  # key statistics (`prunecli stats`) are required
    uses_stats: ClassVar[bool] = True  # key statistics are read when given (False: `--stats` is not used)
    batched: ClassVar[bool] = False  # edits a batch of requests at once (--batch-size) rather than one after another
    nas: ClassVar[bool] = False  # optimises target values, which NAS can anchor (`value_site`, `editors.nas`)

    inputs: EditorInputs = EditorInputs()

    @classmethod
    def from_inputs(cls, inputs: EditorInputs) -> Editor:
        """The editor for the user's inputs, checked as far as they can be without the model (the hyper-parameter
        file is parsed; an archive is refused: only MEND takes one)."""
        if inputs.archive is not None:
            raise PruneCliError(f"--archive is only used by --method mend, not {cls.method}")
        if inputs.hparams_file is not None:
            cls.check_hparams_file(inputs.hparams_file)
        editor = cls()
        editor.inputs = inputs
        return editor

    @classmethod
    def check_hparams_file(cls, path: Path) -> None:
        """Everything about a hyper-parameter file that needs no model (by default: the keys of `hparams`)."""
        if cls.hparams is None:
            raise PruneCliError(f"--hparams does not apply to {cls.method}")
        cls.hparams.check_file(path)

    def check_base(self, base: Checkpoint) -> None:  # noqa: B027 - a hook most editors leave empty
        """Checks of the editor's own inputs against the base checkpoint, before the model loads (none by default)."""

    def resolve_hparams(self, model: torch.nn.Module, adapter: ModelAdapter,
                        on_note: Callable[[str], None] | None = None) -> EditSettings:
        """Packaged defaults for this model < the hyper-parameter file < overrides, checked against the model."""
        assert self.hparams is not None, f"{self.method} resolves its own settings"
        modules = ModelModules(frozenset(n for n, _ in model.named_modules()), adapter.module_name,
                               adapter.num_layers, adapter.model_type)
        return self.hparams.resolve(adapter.family, adapter.num_layers, self.inputs.hparams_file,
                                    self.inputs.overrides, on_note, modules)

    def value_site(self, adapter: ModelAdapter, hparams: EditSettings) -> tuple[int, torch.nn.Module]:
        """(layer, module) whose output the value optimisation shifts: where NAS measures its anchor."""
        raise PruneCliError(f"{self.method} optimises no target value, so NAS does not apply to it (ROME, MEMIT and "
                            "AlphaEdit do)")

    def notes(self, hparams: EditSettings, has_moments: bool) -> list[str]:
        """Lines worth telling the user about this configuration before editing (none by default)."""
        return []

    @abstractmethod
    def apply(self, model: torch.nn.Module, tokenizer, adapter: ModelAdapter,  # noqa: ANN001 - HF tokenizer
              requests: Sequence[EditRequest], ctx: EditContext) -> tuple[list[LayerUpdate], list[RequestOutcome]]:
        """Edit `requests` into `model` (in place) and return the updates and one outcome per request."""
