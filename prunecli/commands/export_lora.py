"""`prunecli export-lora`: write a delta as a PEFT LoRA adapter folder."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from prunecli.commands._common import (AllowPickleOpt, BaseDeltaArgs, BaseOldOpt, DebugOpt, ForceOpt,
                                       IgnoreBaseMismatchOpt, JsonOpt, SelectOpt, base_and_delta, emit_json, guarded,
                                       say)


def main(
    paths: BaseDeltaArgs,
    output: Annotated[Path, typer.Option("-o", "--output", help="Adapter folder to write.")],
    select: SelectOpt = None,
    base_old: BaseOldOpt = None,
    force: ForceOpt = False,
    ignore_base_mismatch: IgnoreBaseMismatchOpt = False,
    json_out: JsonOpt = False,
    allow_pickle: AllowPickleOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Export a delta as a PEFT LoRA adapter (scale 1, uneven ranks via rank_pattern; GPT-2 Conv1D exact).

    The adapter loads with `peft.PeftModel.from_pretrained(base_model, ADAPTER_DIR)`; merging it gives base + delta.

    Example: prunecli export-lora smollm2 edits.safetensors -o edits-lora/
    """
    base, delta = base_and_delta(paths, base_old)

    def body() -> None:
        from prunecli.core.atomic import check_output_path
        from prunecli.core.checkpoint import Checkpoint
        from prunecli.core.peft_io import export_lora, load_delta
        from prunecli.core.selection import select_entries
        from prunecli.models.default_model import resolve_model_path

        base_path = resolve_model_path(base)
        inputs = [("delta", delta), ("base checkpoint", base_path)]
        check_output_path(output, force, is_dir=True, inputs=inputs)
        ckpt = Checkpoint(base_path, allow_pickle=allow_pickle)
        d = load_delta(delta, ckpt)
        if select:
            names = select_entries(d.entries, select, d.model_type)
            d = replace(d, entries={n: d.entries[n] for n in names})
        d.check_base(ckpt, ignore_base_mismatch)
        summary = export_lora(d, ckpt, output, force, inputs=inputs)
        if json_out:
            emit_json(summary)
        else:
            say(f"wrote LoRA adapter {output}: {len(summary['ranks'])} module(s), r={summary['r']}, "
                              f"fan_in_fan_out={summary['fan_in_fan_out']}")

    guarded(debug, body)
