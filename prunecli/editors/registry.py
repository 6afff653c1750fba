"""Which editing methods exist: one line each, the only list the `edit` and `stats` commands consult.

Adding an editor is a module with an `Editor` subclass (and its `HParams` class), its packaged defaults
`hparams/<method>.yaml`, plus one line here. Entries name their class by module and attribute, so listing the methods
(e.g. for `--help`) imports neither torch nor the editors.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prunecli.errors import PruneCliError

if TYPE_CHECKING:
    from prunecli.editors.base import Editor, EditorInputs
    from prunecli.editors.hparams import HParams, ModelModules


@dataclass(frozen=True)
class Method:
    """A registered method: its editor class ("module:Class"), whether it reads key statistics (`prunecli stats`,
    whose `--method` then takes the method's default layers), and the EasyEdit `alg_name` values that select it."""

    editor: str
    uses_stats: bool
    alg_names: tuple[str, ...] = ()


_METHODS: dict[str, Method] = {
    "rome": Method("prunecli.editors.rome:RomeEditor", True, ("rome", "r-rome", "r_rome")),
    "memit": Method("prunecli.editors.memit:MemitEditor", True, ("memit",)),
    "alphaedit": Method("prunecli.editors.alphaedit:AlphaEditEditor", True, ("alphaedit",)),
    "mend": Method("prunecli.editors.mend.editor:MendEditor", False),
    "ultraedit": Method("prunecli.editors.ultraedit:UltraEditEditor", False, ("ultraedit",)),
}

METHODS: tuple[str, ...] = tuple(_METHODS)
STATS_METHODS: tuple[str, ...] = tuple(m for m, e in _METHODS.items() if e.uses_stats)
ALG_NAMES: dict[str, str] = {alg: m for m, e in _METHODS.items() for alg in e.alg_names}
"""EasyEdit's `alg_name` (lower case) -> the method it selects (prunecli's ROME is R-ROME: one averaged key)."""


def editor_class(method: str) -> type[Editor]:
    """The class of `method` (a one-line error naming the methods for an unknown one)."""
    if method not in _METHODS:
        raise PruneCliError(f"unknown editing method {method!r}; use one of {', '.join(METHODS)}")
    module, name = _METHODS[method].editor.split(":")
    return getattr(importlib.import_module(module), name)


def editor_for(method: str, inputs: EditorInputs | None = None) -> Editor:
    """An editor of `method` for the user's inputs, checked as far as they can be without the model (each editor
    checks the ones it accepts; a hyper-parameter file must be for this method)."""
    from prunecli.editors.base import EditorInputs

    inputs = inputs or EditorInputs()
    _import_all()  # so a key of another method's hyper-parameters is named as such
    if inputs.hparams_file is not None:
        check_alg_name(method, inputs.hparams_file)
    return editor_class(method).from_inputs(inputs)


def _import_all() -> None:
    for method in METHODS:
        editor_class(method)


def file_method(path: str | Path) -> str | None:
    """The prunecli method an EasyEdit file's `alg_name` names (None without one); an unknown one is an error."""
    from prunecli.editors.hparams import read_hparams_file

    user = read_hparams_file(path)
    if "alg_name" not in user:
        return None
    name = str(user["alg_name"]).strip().lower()
    if name not in ALG_NAMES:
        raise PruneCliError(f"{path} holds {user['alg_name']} hyper-parameters; prunecli edits with "
                            f"{', '.join(sorted(set(ALG_NAMES.values())))} (alg_name {', '.join(sorted(ALG_NAMES))})")
    return ALG_NAMES[name]


# ------------------------------------------------------------------------------------ hyper-parameters by name
def hparams_class(method: str) -> type[HParams]:
    """The hyper-parameter class of a registered method (a method without one, such as MEND, is an error)."""
    _import_all()
    cls = editor_class(method).hparams
    if cls is None:
        raise PruneCliError(f"{method} has no hyper-parameters of its own (its settings come with its inputs)")
    return cls


def default_values(method: str, family: str, num_layers: int) -> dict[str, Any]:
    """`method`'s packaged defaults for a family and model depth (layers resolved to numbers)."""
    return hparams_class(method).defaults(family, num_layers)


def resolve_hparams(method: str, family: str, num_layers: int, file: str | Path | None = None,
                    sets: Sequence[str] = (), on_note: Callable[[str], None] | None = None,
                    modules: ModelModules | None = None) -> HParams:
    """`method`'s hyper-parameters: packaged defaults < file < overrides (`HParams.resolve`)."""
    if file is not None:
        check_file(method, file)
    return hparams_class(method).resolve(family, num_layers, file, sets, on_note, modules)


def check_file(method: str, path: str | Path) -> None:
    """A hyper-parameter file for `method`: its alg_name (if any) names this method, its keys are known."""
    check_alg_name(method, path)
    editor_class(method).check_hparams_file(path)


def check_alg_name(method: str, path: str | Path) -> None:
    """Fail when the file's EasyEdit `alg_name` names another method than `method`."""
    from prunecli.editors.hparams import read_hparams_file

    if file_method(path) not in (None, method):
        raise PruneCliError(f"{path} holds {read_hparams_file(path)['alg_name']} hyper-parameters, but the method "
                            f"is {method} (drop --method to use the file's)")
