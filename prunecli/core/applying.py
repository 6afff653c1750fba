"""Merge a delta into a checkpoint on disk: W' = W + D for each touched tensor, written atomically.

The sum is formed in float32 (float64 for float64 weights) and rounded once to the stored dtype, exactly as
`prunecli.models.loading.add_delta_to_model` does in memory, so an applied checkpoint and an in-memory edit give the
same model. Each merged tensor is computed only when the writer reaches it: memory stays at one tensor.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch

from prunecli.core.atomic import labelled
from prunecli.core.checkpoint import APPLIED_KEY, Checkpoint
from prunecli.core.delta import Delta, merged_weight
from prunecli.progress import Progress, ProgressTask, no_progress


class MergedTensors(Mapping[str, torch.Tensor]):
    """W + D for every tensor a delta touches, computed on access (in the stored layout and dtype)."""

    def __init__(self, base: Checkpoint, delta: Delta, task: ProgressTask | None = None) -> None:
        self.base = base
        self.delta = delta
        self.task = task  # advanced once per merged tensor

    def __getitem__(self, name: str) -> torch.Tensor:
        merged = merged_weight(name, self.base.get(name), self.delta.entries[name])
        if self.task is not None:
            self.task.advance()
        return merged

    def __iter__(self) -> Iterator[str]:
        return iter(self.delta.entries)

    def __len__(self) -> int:
        return len(self.delta.entries)


def apply_deltas(base: Checkpoint, delta: Delta, out: Path, force: bool = False,
                 provenance: Sequence[str] = (), files: Mapping[str, Path | None] | None = None,
                 ignore_base_mismatch: bool = False, progress: Progress = no_progress) -> list[str]:
    """Write `base` + `delta` to `out`; returns the rewritten weight files (the others are hard-linked).

    The delta must fit the base: every target present with its shape, and (unless `ignore_base_mismatch`) the very
    bytes the delta was computed on. `force` only allows replacing an earlier output at `out`; `out` may never be,
    hold or sit inside the base or a delta file of `provenance`, which is recorded under `prunecli.applied` in the
    rewritten files. No tensor with NaN/Inf is written (checked in the stored dtype). `files` replaces non-weight
    files of a folder base (name -> file to copy instead, or None to leave it out), e.g. to ship another tokenizer.
    `progress` gets one task, advanced per merged tensor.
    """
    delta.check_base(base, ignore_base_mismatch)
    metadata = {APPLIED_KEY: json.dumps([str(p) for p in provenance])}
    with progress("apply (merged tensors)", len(delta.entries)) as task:
        return base.write_updated(Path(out), MergedTensors(base, delta, task), force=force, metadata=metadata,
                                  files=files, inputs=labelled("delta", provenance))
