"""`--select`: which tensors a list of globs picks, decided the same way by every command (inspect, diff, prune,
apply, export-lora).

A glob may be written against any name of a tensor: its canonical name (the parameter name `transformers` uses), the
name stored in the file, and for GPT-2 the canonical name without its `transformer.` prefix, since GPT-2 checkpoints
are saved both ways: `h.3.mlp.c_proj.weight`, `transformer.h.3.*` and `*.c_proj.*` all pick
`transformer.h.3.mlp.c_proj.weight`, in a checkpoint as in a delta of it. Every glob must match something.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from fnmatch import fnmatchcase

from prunecli.errors import PruneCliError

_GPT2_PREFIX = "transformer."


def tensor_aliases(canonical: str, stored: str | None = None, model_type: str | None = None) -> tuple[str, ...]:
    """The names a glob may match for one tensor, canonical name first."""
    names = [canonical, stored or canonical]
    if model_type == "gpt2":
        names.append(canonical.removeprefix(_GPT2_PREFIX))
    return tuple(dict.fromkeys(names))


def select_names(candidates: Sequence[Sequence[str]], globs: Sequence[str] | None,
                 ignored: Sequence[str] = ()) -> list[str]:
    """Canonical names of `candidates` (each `tensor_aliases` of one tensor) matched by any glob on any of their
    names, in candidate order; all of them when there is no glob (None or empty).

    `ignored` are names that exist but cannot be selected (e.g. 1-D tensors), so a glob matching only those gets a
    message saying why.
    """
    if not globs:
        return [names[0] for names in candidates]
    chosen: set[str] = set()
    for pattern in globs:
        hits = {names[0] for names in candidates if any(fnmatchcase(n, pattern) for n in names)}
        if not hits:
            if any(fnmatchcase(n, pattern) for n in ignored):
                raise PruneCliError(f"--select {pattern!r} matches only tensors that are not 2-D matrices")
            raise PruneCliError(f"no tensor matches --select {pattern!r}")
        chosen |= hits
    return [names[0] for names in candidates if names[0] in chosen]


def select_entries(names: Iterable[str], globs: Sequence[str] | None, model_type: str | None) -> list[str]:
    """The canonical names (a delta's entries) picked by `globs`, for a model of `model_type`."""
    return select_names([tensor_aliases(n, model_type=model_type) for n in names], globs)


def numeric_order(name: str) -> tuple[str | int, ...]:
    """Sort key that orders the numbers inside tensor names as numbers: layers 0, 1, 2, ..., 10, not 0, 1, 10, 11."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))
