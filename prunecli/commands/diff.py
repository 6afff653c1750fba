"""`prunecli diff`: turn an edited checkpoint into a delta file against its base."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from prunecli.commands._common import (AllowPickleOpt, DebugOpt, ForceOpt, JsonOpt, cell, emit_json, guarded, note,
                                       cli_progress, warn)


def main(
    base: Annotated[str, typer.Argument(help="Base checkpoint: model folder, .safetensors file, or `smollm2`.")],
    edited: Annotated[str, typer.Argument(help="Edited checkpoint with the same tensor names and shapes.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Delta file to write (.safetensors).")],
    select: Annotated[list[str] | None, typer.Option(
        "--select", help="Compare only tensors whose name matches this glob (repeatable), "
        "e.g. 'transformer.h.*.mlp.c_proj.weight'.")] = None,
    rank: Annotated[int | None, typer.Option("--rank", min=1, help="Keep this many singular directions per "
                                             "matrix (truncated SVD).")] = None,
    tol: Annotated[float | None, typer.Option("--tol", help="Keep the fewest singular directions whose relative "
                                              "Frobenius error is at most this (0 < tol < 1).")] = None,
    json_out: JsonOpt = False,
    force: ForceOpt = False,
    allow_pickle: AllowPickleOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Write the delta that turns BASE into EDITED: D = EDITED - BASE for each changed matrix, kept low rank.

    By default each D keeps its numerical rank (rounding noise of the checkpoint's dtype does not count), so a model
    saved after ROME/MEMIT edits diffs to the rank of its edits; --rank or --tol truncate further. Matrices whose rank
    exceeds half their size are stored dense. Deltas hold 2-D updates only: changed biases or norms are reported and
    skipped. Nothing changed is an error (no empty delta is written).

    Example: prunecli diff gpt2-base/ gpt2-edited/ -o edits.safetensors --select 'transformer.h.*.mlp.c_proj.weight'
    """
    if rank is not None and tol is not None:
        raise typer.BadParameter("--rank and --tol cannot be used together", param_hint="--rank/--tol")
    if tol is not None and not 0.0 < tol < 1.0:
        raise typer.BadParameter(f"{tol} is not between 0 and 1 (exclusive)", param_hint="--tol")

    def body() -> None:
        from prunecli.core.atomic import check_output_path
        from prunecli.core.checkpoint import Checkpoint
        from prunecli.core.diffing import diff_checkpoints
        from prunecli.models.default_model import resolve_model_path

        base_path, edited_path = resolve_model_path(base), resolve_model_path(edited)
        check_output_path(output, force, is_dir=False,
                          inputs=[("base checkpoint", base_path), ("edited checkpoint", edited_path)])
        base_ckpt = Checkpoint(base_path, allow_pickle=allow_pickle)
        edited_ckpt = Checkpoint(edited_path, allow_pickle=allow_pickle)
        with cli_progress() as progress:
            delta = diff_checkpoints(base_ckpt, edited_ckpt, select or (), rank, tol, progress=progress)
        op = delta.history[-1]
        if op["skipped"]:
            warn(f"{len(op['skipped'])} changed tensor(s) are not 2-D and are not in the delta "
                 f"(deltas hold 2-D updates only): {', '.join(op['skipped'])}")
        delta.save(output, force)
        summary = {"output": str(output), "base": str(base_ckpt.path), "edited": str(edited_ckpt.path),
                   "rank": rank, "tol": tol, "tensors": op["per_tensor"], "skipped": op["skipped"]}
        if json_out:
            emit_json(summary)
        else:
            _print_table(summary["tensors"])
            note(f"wrote {output} ({len(delta.entries)} tensor(s))")

    guarded(debug, body)


def _print_table(per_tensor: dict[str, dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("tensor", "shape", "kind", "rank", "rel. error")
    for name, t in per_tensor.items():
        table.add_row(cell(name), "x".join(map(str, t["shape"])), t["kind"], str(t["rank"]), f"{t['rel_error']:.2e}")
    Console().print(table)
