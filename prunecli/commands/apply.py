"""`prunecli apply`: merge delta files into a base checkpoint and write the edited checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from prunecli.commands._display import cli_progress
from prunecli.commands._errors import guarded
from prunecli.commands._options import AllowPickle, Base, Force, IgnoreBaseMismatch, Out, Select


@guarded
def main(base: Base,
         deltas: Annotated[list[Path], typer.Argument(metavar="DELTA...", help="Delta file(s) or PEFT adapter "
                                                      "folder(s), composed in the order given.")],
         output: Annotated[Path, typer.Option("-o", "--output", help="Checkpoint to write (a folder for a folder "
                                              "base, a .safetensors file for a file base).")],
         out: Out, select: Select = None,
         tokenizer: Annotated[str | None, typer.Option(
             "--tokenizer", metavar="PATH_OR_ALIAS", help="Write this tokenizer (a folder, a tokenizer.json file or "
             "a built-in name) into the output instead of the base's, so a base saved without one still gives a "
             "complete checkpoint.")] = None,
         force: Force = False, ignore_base_mismatch: IgnoreBaseMismatch = False,
         allow_pickle: AllowPickle = False) -> None:
    """Write BASE + DELTA... as a new checkpoint, in the base's dtype, loadable with `from_pretrained`.

    Each delta must have been computed on these exact base weights (checked by fingerprint; a model that already
    holds the delta is named as such). Only shards holding changed tensors are rewritten, and they record the delta
    files under the `prunecli.applied` metadata key; the others are hard-linked, and config, tokenizer and index
    are copied, so the output costs little extra disk. No weight with NaN/Inf is written.

    Example: prunecli apply smollm2 pruned.safetensors -o edited-model
    """
    from prunecli.api.apply import ApplyOptions, run_apply

    options = ApplyOptions(base, tuple(deltas), output, tuple(select or ()), tokenizer, force, ignore_base_mismatch,
                           allow_pickle)
    with cli_progress() as progress:
        result = run_apply(options, progress)
    out.result(result.to_json(), lambda: out.say(
        f"wrote {output}: {len(result.tensors)} tensor(s) updated in {len(result.rewritten_files)} rewritten "
        f"file(s) ({', '.join(result.rewritten_files)})"))
