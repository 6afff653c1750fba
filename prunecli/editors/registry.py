"""Which editing methods exist: the one list the `edit` command and `stats --method` consult.

Adding an editor is a module with an `Editor` subclass plus one line here. Entries name their class by module and
attribute so that listing the methods (e.g. for `--help`) imports neither torch nor the editors.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from prunecli.errors import PruneCliError

if TYPE_CHECKING:
    from prunecli.editors.base import Editor, EditorInputs

_EDITORS: dict[str, str] = {
    "rome": "prunecli.editors.rome:RomeEditor",
    "memit": "prunecli.editors.memit:MemitEditor",
    "alphaedit": "prunecli.editors.alphaedit:AlphaEditEditor",
    "mend": "prunecli.editors.mend_editor:MendEditor",
    "ultraedit": "prunecli.editors.ultraedit:UltraEditEditor",
}

METHODS: tuple[str, ...] = tuple(_EDITORS)


def editor_class(method: str) -> type[Editor]:
    """The class of `method` (a one-line error naming the methods for an unknown one)."""
    if method not in _EDITORS:
        raise PruneCliError(f"unknown editing method {method!r}; use one of {', '.join(METHODS)}")
    module, name = _EDITORS[method].split(":")
    return getattr(importlib.import_module(module), name)


def editor_for(method: str, inputs: EditorInputs | None = None) -> Editor:
    """An editor of `method` for the user's inputs (each editor checks the ones it accepts)."""
    from prunecli.editors.base import EditorInputs

    return editor_class(method).from_inputs(inputs or EditorInputs())
