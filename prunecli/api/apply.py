"""`prunecli apply` as a function: write BASE + DELTA... as a new checkpoint."""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from prunecli.core.applying import apply_deltas
from prunecli.core.atomic import check_output_path, labelled
from prunecli.core.checkpoint import Checkpoint
from prunecli.core.delta_files import load_deltas
from prunecli.core.selection import select_entries
from prunecli.errors import PruneCliError, PruneCliWarning
from prunecli.models.builtin import resolve_model_path
from prunecli.models.tokenizer import has_vocabulary_files, replacement_files
from prunecli.progress import Progress, no_progress


@dataclass(frozen=True)
class ApplyOptions:
    """What `prunecli apply` takes: BASE DELTA... -o OUTPUT."""

    base: str | Path
    deltas: tuple[str | Path, ...]
    output: str | Path
    select: tuple[str, ...] = ()  # only these entries are merged; the other tensors are written as the base has them
    tokenizer: str | None = None  # replaces the base's tokenizer files in the output (a folder base only)
    force: bool = False
    ignore_base_mismatch: bool = False
    allow_pickle: bool = False


@dataclass(frozen=True)
class ApplyResult:
    options: ApplyOptions
    base: Path
    tensors: list[str]
    rewritten_files: list[str]

    def to_json(self) -> dict[str, Any]:
        o = self.options
        return {"output": str(o.output), "base": str(self.base), "deltas": [str(p) for p in o.deltas],
                "tensors": self.tensors, "rewritten_files": self.rewritten_files, "tokenizer": o.tokenizer}


def run_apply(options: ApplyOptions, progress: Progress = no_progress) -> ApplyResult:
    """Merge the deltas into the base and write the checkpoint (only the shards holding changed tensors are
    rewritten; the others are hard-linked)."""
    o = options
    if not o.deltas:
        raise PruneCliError("give at least one delta to apply")
    base_path = resolve_model_path(str(o.base))
    output = Path(o.output)
    inputs = [("base checkpoint", base_path), *labelled("delta", o.deltas)]
    if o.tokenizer is not None and Path(o.tokenizer).exists():
        inputs.append(("tokenizer", Path(o.tokenizer)))
    check_output_path(output, o.force, is_dir=base_path.is_dir(), inputs=inputs)
    if o.tokenizer is not None and not base_path.is_dir():
        raise PruneCliError(f"--tokenizer needs a model folder base: {base_path} is a single file, and so is the "
                            "output, with no room for a tokenizer")
    base = Checkpoint(base_path, allow_pickle=o.allow_pickle)
    delta = load_deltas(o.deltas, base)
    assert delta is not None
    if o.select:
        delta = replace(delta, entries={n: delta.entries[n]
                                        for n in select_entries(delta.entries, o.select, delta.model_type)})
    if o.tokenizer is None and base_path.is_dir() and not has_vocabulary_files(base_path):
        warnings.warn(PruneCliWarning(f"{base_path} has no tokenizer files, so {output} will have none either: pass "
                                      "--tokenizer"), stacklevel=2)
    replacing = (replacement_files(base_path, base.config, o.tokenizer) if o.tokenizer is not None
                 else contextlib.nullcontext(None))
    with replacing as files:
        rewritten = apply_deltas(base, delta, output, o.force, provenance=[str(Path(p).resolve()) for p in o.deltas],
                                 files=files, ignore_base_mismatch=o.ignore_base_mismatch, progress=progress)
    return ApplyResult(o, base.path, list(delta.entries), rewritten)
