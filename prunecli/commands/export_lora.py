"""`prunecli export-lora`: write a delta as a PEFT LoRA adapter folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from prunecli.commands._errors import guarded
from prunecli.commands._options import AllowPickle, BaseDelta, Force, IgnoreBaseMismatch, Out, Select


@guarded
def main(base_delta: BaseDelta,
         output: Annotated[Path, typer.Option("-o", "--output", help="Adapter folder to write.")],
         out: Out, select: Select = None, force: Force = False, ignore_base_mismatch: IgnoreBaseMismatch = False,
         allow_pickle: AllowPickle = False) -> None:
    """Export a delta as a PEFT LoRA adapter (scale 1, uneven ranks via rank_pattern; GPT-2 Conv1D exact).

    The adapter loads with `peft.PeftModel.from_pretrained(base_model, ADAPTER_DIR)`; merging it gives base + delta.
    Every command that takes a delta also takes such an adapter folder.

    Example: prunecli export-lora smollm2 pruned.safetensors -o pruned-lora
    """
    from prunecli.api.export_lora import ExportLoraOptions, run_export_lora

    base, delta = base_delta
    summary = run_export_lora(ExportLoraOptions(base, delta, output, tuple(select or ()), force, ignore_base_mismatch,
                                                allow_pickle))
    out.result(summary, lambda: out.say(f"wrote LoRA adapter {output}: {len(summary['ranks'])} module(s), "
                                        f"r={summary['r']}, fan_in_fan_out={summary['fan_in_fan_out']}"))
