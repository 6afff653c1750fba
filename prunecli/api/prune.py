"""`prunecli prune` as a function: restrain a delta file against its base checkpoint and write the result."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from prunecli.core.atomic import check_output_path
from prunecli.core.checkpoint import Checkpoint
from prunecli.core.delta import Delta
from prunecli.core.delta_files import load_delta
from prunecli.core.restraint import RestraintSettings, TensorReport, restrain_delta
from prunecli.core.selection import select_entries
from prunecli.errors import PruneCliWarning
from prunecli.models.builtin import resolve_model_path
from prunecli.models.loading import resolve_device
from prunecli.progress import Progress, no_progress


@dataclass(frozen=True)
class PruneOptions:
    """What `prunecli prune` takes: BASE DELTA -o OUTPUT and the restraint."""

    base: str | Path
    delta: str | Path
    output: str | Path
    restraint: RestraintSettings = field(default_factory=RestraintSettings)
    select: tuple[str, ...] = ()  # globs: only these entries are restrained, the others are kept as they were
    kappa: bool = True  # report kappa of W, W + D, W + D' (one Gram matrix of W per matrix)
    device: str = "auto"
    force: bool = False
    ignore_base_mismatch: bool = False
    allow_pickle: bool = False


@dataclass(frozen=True)
class PruneResult:
    options: PruneOptions
    delta: Delta  # the restrained delta, as written
    reports: list[TensorReport]

    def to_json(self) -> dict[str, Any]:
        return {"delta": str(self.options.delta), "base": str(self.delta.source), **self.options.restraint.to_json(),
                "output": str(self.options.output), "tensors": [r.to_json() for r in self.reports]}


def run_prune(options: PruneOptions, progress: Progress = no_progress) -> PruneResult:
    """Restrain the delta's entries (the selected ones) against the base, write the restrained delta, return the
    per-tensor reports. Every input is checked before any matrix is read."""
    o = options
    o.restraint.check()
    if not o.kappa and o.restraint.target_kappa is not None:
        raise ValueError("a kappa target needs the condition numbers (kappa=True)")
    base_path = resolve_model_path(str(o.base))
    check_output_path(Path(o.output), o.force, is_dir=False,
                      inputs=[("delta", o.delta), ("base checkpoint", base_path)])
    device = resolve_device(o.device)
    base = Checkpoint(base_path, allow_pickle=o.allow_pickle)
    delta = load_delta(o.delta, base)  # a PEFT adapter folder is read against the base it names
    delta.check_base(base, o.ignore_base_mismatch)
    if delta.restraints:
        warnings.warn(PruneCliWarning(
            f"{o.delta} was already restrained {len(delta.restraints)} time(s) (its history records prune with "
            f"fn={delta.restraints[-1].get('fn')}); restraining it again"), stacklevel=2)
    chosen = select_entries(delta.entries, o.select, delta.model_type)
    pruned, reports = restrain_delta(replace(delta, entries={n: delta.entries[n] for n in chosen}), base,
                                     o.restraint, kappa=o.kappa, progress=progress, device=device,
                                     record={"select": list(o.select)} if o.select else None)
    if o.select:  # the entries not selected are kept as they were
        pruned = replace(pruned, entries={n: pruned.entries.get(n, e) for n, e in delta.entries.items()})
    for r in reports:
        if r.info.warning:
            warnings.warn(PruneCliWarning(f"{r.name}: {r.info.warning}"), stacklevel=2)
    pruned.save(o.output, o.force)
    return PruneResult(o, pruned, reports)
