"""`prunecli export-lora` as a function: a delta as a PEFT LoRA adapter folder."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from prunecli.core.atomic import check_output_path
from prunecli.core.checkpoint import Checkpoint
from prunecli.core.delta_files import load_delta
from prunecli.core.peft_io import export_lora
from prunecli.core.selection import select_entries
from prunecli.models.builtin import resolve_model_path


@dataclass(frozen=True)
class ExportLoraOptions:
    """What `prunecli export-lora` takes: BASE DELTA -o ADAPTER_DIR."""

    base: str | Path
    delta: str | Path
    output: str | Path
    select: tuple[str, ...] = ()
    force: bool = False
    ignore_base_mismatch: bool = False
    allow_pickle: bool = False


def run_export_lora(options: ExportLoraOptions) -> dict[str, Any]:
    """Write the adapter; returns its summary (output, r, per-module ranks, fan_in_fan_out)."""
    o = options
    base_path = resolve_model_path(str(o.base))
    inputs = [("delta", o.delta), ("base checkpoint", base_path)]
    check_output_path(Path(o.output), o.force, is_dir=True, inputs=inputs)
    base = Checkpoint(base_path, allow_pickle=o.allow_pickle)
    delta = load_delta(o.delta, base)
    if o.select:
        delta = replace(delta, entries={n: delta.entries[n]
                                        for n in select_entries(delta.entries, o.select, delta.model_type)})
    delta.check_base(base, o.ignore_base_mismatch)
    return export_lora(delta, base, Path(o.output), o.force, inputs=inputs)
