"""`prunecli diff` as a function: the delta that turns one checkpoint into another, kept low rank."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prunecli.core.atomic import check_output_path
from prunecli.core.checkpoint import Checkpoint
from prunecli.core.delta import Delta
from prunecli.core.diffing import diff_checkpoints
from prunecli.errors import PruneCliError, PruneCliWarning
from prunecli.models.builtin import resolve_model_path
from prunecli.progress import Progress, no_progress


@dataclass(frozen=True)
class DiffOptions:
    """What `prunecli diff` takes: BASE EDITED -o OUTPUT, and how far to truncate each D."""

    base: str | Path
    edited: str | Path
    output: str | Path
    select: tuple[str, ...] = ()
    rank: int | None = None  # keep this many singular directions per matrix
    tol: float | None = None  # keep the fewest directions whose relative Frobenius error is at most this
    force: bool = False
    allow_pickle: bool = False


@dataclass(frozen=True)
class DiffResult:
    options: DiffOptions
    delta: Delta

    def to_json(self) -> dict[str, Any]:
        o, op = self.options, self.delta.history[-1]
        return {"output": str(o.output), "base": str(self.delta.source), "edited": op["edited"], "rank": o.rank,
                "tol": o.tol, "tensors": op["per_tensor"], "skipped": op["skipped"]}


def run_diff(options: DiffOptions, progress: Progress = no_progress) -> DiffResult:
    """Compare the two checkpoints tensor by tensor and write the delta (changed non-matrices are reported and left
    out: deltas hold 2-D updates only)."""
    o = options
    if o.rank is not None and o.tol is not None:
        raise PruneCliError("give a rank or a tolerance, not both")
    if o.tol is not None and not 0.0 < o.tol < 1.0:
        raise PruneCliError(f"the tolerance must be between 0 and 1 (exclusive), got {o.tol}")
    base_path, edited_path = resolve_model_path(str(o.base)), resolve_model_path(str(o.edited))
    check_output_path(Path(o.output), o.force, is_dir=False,
                      inputs=[("base checkpoint", base_path), ("edited checkpoint", edited_path)])
    base = Checkpoint(base_path, allow_pickle=o.allow_pickle)
    edited = Checkpoint(edited_path, allow_pickle=o.allow_pickle)
    delta = diff_checkpoints(base, edited, o.select, o.rank, o.tol, progress=progress)
    skipped = delta.history[-1]["skipped"]
    if skipped:
        warnings.warn(PruneCliWarning(f"{len(skipped)} changed tensor(s) are not 2-D and are not in the delta (deltas "
                                      f"hold 2-D updates only): {', '.join(skipped)}"), stacklevel=2)
    delta.save(o.output, o.force)
    return DiffResult(o, delta)
