"""`prunecli apply`: merge delta files into a base checkpoint and write the edited checkpoint."""

from __future__ import annotations

import contextlib
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from prunecli.commands._common import (AllowPickleOpt, DebugOpt, ForceOpt, IgnoreBaseMismatchOpt, JsonOpt,
                                       SelectOpt, TokenizerOpt, emit_json, guarded, note, cli_progress, warn)
from prunecli.errors import PruneCliError


def main(
    base: Annotated[str, typer.Argument(help="Base checkpoint: model folder, .safetensors file, or `smollm2`.")],
    deltas: Annotated[list[Path], typer.Argument(help="Delta file(s), composed in the order given.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Checkpoint to write (a folder for a folder "
                                         "base, a .safetensors file for a file base).")],
    select: SelectOpt = None,
    force: ForceOpt = False,
    ignore_base_mismatch: IgnoreBaseMismatchOpt = False,
    tokenizer_ref: TokenizerOpt = None,
    json_out: JsonOpt = False,
    allow_pickle: AllowPickleOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Write BASE + DELTA... as a new checkpoint, in the base's dtype, loadable with `from_pretrained`.

    Each delta must have been computed on these exact base weights (checked by fingerprint;
    --ignore-base-mismatch accepts a mismatch with a warning). --force only replaces an earlier output; OUT may never
    be, hold or sit inside BASE or a DELTA. No weight with NaN/Inf is written. Only shards holding changed tensors
    are rewritten; the others are hard-linked, and config, tokenizer and
    index are copied, so the output costs little extra disk. Rewritten shards record the delta files under the
    `prunecli.applied` metadata key. With --tokenizer the given tokenizer replaces the base's tokenizer files, so a
    base saved without one still gives a complete checkpoint.

    Example: prunecli apply gpt2-base/ edits.safetensors pruned.safetensors -o gpt2-edited/

    Example: prunecli apply checkpoint-500/ edits.safetensors --tokenizer smollm2 -o edited/
    """

    def body() -> None:
        from prunecli.core.applying import apply_deltas
        from prunecli.core.atomic import check_output_path, labelled
        from prunecli.core.checkpoint import Checkpoint
        from prunecli.core.peft_io import load_deltas
        from prunecli.core.selection import select_entries
        from prunecli.models.default_model import resolve_model_path
        from prunecli.models.tokenizer import has_vocabulary_files, replacement_files

        base_path = resolve_model_path(base)
        inputs = [("base checkpoint", base_path), *labelled("delta", deltas)]
        if tokenizer_ref is not None and Path(tokenizer_ref).exists():
            inputs.append(("tokenizer", Path(tokenizer_ref)))
        check_output_path(output, force, is_dir=base_path.is_dir(), inputs=inputs)
        if tokenizer_ref is not None and not base_path.is_dir():
            raise PruneCliError(f"--tokenizer needs a model folder base: {base_path} is a single file, and so is the "
                                "output, with no room for a tokenizer")
        base_ckpt = Checkpoint(base_path, allow_pickle=allow_pickle)
        delta = load_deltas(deltas, base_ckpt)
        assert delta is not None  # typer requires at least one DELTA
        if select:  # only the matching entries are merged; the other tensors are written as the base has them
            delta = replace(delta, entries={n: delta.entries[n]
                                            for n in select_entries(delta.entries, select, delta.model_type)})
        provenance = [str(p.resolve()) for p in deltas]
        if tokenizer_ref is None and base_path.is_dir() and not has_vocabulary_files(base_path):
            warn(f"{base_path} has no tokenizer files, so {output} will have none either: pass --tokenizer")
        replacing = (replacement_files(base_path, base_ckpt.config, tokenizer_ref) if tokenizer_ref is not None
                     else contextlib.nullcontext(None))
        with replacing as files, cli_progress() as progress:
            rewritten = apply_deltas(base_ckpt, delta, output, force, provenance=provenance, files=files,
                                     ignore_base_mismatch=ignore_base_mismatch, progress=progress)
        summary = {"output": str(output), "base": str(base_ckpt.path), "deltas": [str(p) for p in deltas],
                   "tensors": list(delta.entries), "rewritten_files": rewritten, "tokenizer": tokenizer_ref}
        if json_out:
            emit_json(summary)
        else:
            note(f"wrote {output}: {len(delta.entries)} tensor(s) updated in {len(rewritten)} rewritten file(s) "
                 f"({', '.join(rewritten)})")

    guarded(debug, body)
