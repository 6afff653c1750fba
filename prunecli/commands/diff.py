"""`prunecli diff`: turn an edited checkpoint into a delta file against its base."""

from __future__ import annotations

from typing import Annotated

import typer

from prunecli.commands._display import cli_progress
from prunecli.commands._errors import guarded
from prunecli.commands._options import AllowPickle, Base, Force, Out, OutputFile, Select


@guarded
def main(base: Base,
         edited: Annotated[str, typer.Argument(metavar="EDITED", help="Edited checkpoint with the same tensor "
                                               "names and shapes.")],
         output: OutputFile, out: Out, select: Select = None,
         rank: Annotated[int | None, typer.Option("--rank", min=1, help="Keep this many singular directions per "
                                                  "matrix (truncated SVD).")] = None,
         tol: Annotated[float | None, typer.Option("--tol", help="Keep the fewest singular directions whose "
                                                   "relative Frobenius error is at most this (0 < tol < 1).")] = None,
         force: Force = False, allow_pickle: AllowPickle = False) -> None:
    """Write the delta that turns BASE into EDITED: D = EDITED - BASE for each changed matrix, kept low rank.

    By default each D keeps its numerical rank (rounding noise of the checkpoint's dtype does not count), so a model
    saved after ROME/MEMIT edits diffs to the rank of its edits; --rank or --tol truncate further. Matrices whose
    rank exceeds half their size are stored dense. Deltas hold 2-D updates only: changed biases or norms are
    reported and skipped. Nothing changed is an error (no empty delta is written).

    Example: prunecli diff smollm2 edited-model -o recovered.safetensors --select '*.mlp.down_proj.weight'
    """
    from prunecli.api.diff import DiffOptions, run_diff

    if rank is not None and tol is not None:
        raise typer.BadParameter("--rank and --tol cannot be used together", param_hint="--rank/--tol")
    if tol is not None and not 0.0 < tol < 1.0:
        raise typer.BadParameter(f"{tol} is not between 0 and 1 (exclusive)", param_hint="--tol")
    with cli_progress() as progress:
        result = run_diff(DiffOptions(base, edited, output, tuple(select or ()), rank, tol, force, allow_pickle),
                          progress)
    summary = result.to_json()

    def render() -> None:
        out.table(None, ["tensor", "shape", "kind", "rank", "rel. error"],
                  [[name, "x".join(map(str, t["shape"])), t["kind"], str(t["rank"]), f"{t['rel_error']:.2e}"]
                   for name, t in summary["tensors"].items()], right=["rank", "rel. error"])
        out.note(f"wrote {output} ({len(result.delta.entries)} tensor(s))")

    out.result(summary, render)
