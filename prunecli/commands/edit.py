"""`prunecli edit`: sequential ROME / MEMIT / AlphaEdit / MEND / UltraEdit editing of a checkpoint into a factored
delta file."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from prunecli.commands._display import cli_progress
from prunecli.commands._errors import guarded
from prunecli.commands._options import (
    Deltas,
    Force,
    IgnoreBaseMismatch,
    Load,
    Model,
    Out,
    OutputFile,
    Requests,
    Restraint,
    Sphere,
    Start,
)
from prunecli.editors.registry import METHODS

Check = Enum("Check", {"teacher_forced": "teacher-forced", "generation": "generation"}, type=str)  # type: ignore[misc]
"""`--check`'s choices: the rules of `editors.success` (its CHECKS)."""

if TYPE_CHECKING:
    from prunecli.api.edit import EditResult


@guarded
def main(model: Model, requests: Requests, output: OutputFile, out: Out, load: Load, restraint: Restraint,
         sphere: Sphere,
         method: Annotated[str | None, typer.Option(
             "--method", help=f"{', '.join(METHODS)} (default: the --hparams file's alg_name, else rome).")] = None,
         start: Start = 0,
         limit: Annotated[int | None, typer.Option("--limit", min=1, help="Number of records to use.")] = None,
         stats: Annotated[Path | None, typer.Option(
             "--stats", help="Key statistics from `prunecli stats` (MEMIT, AlphaEdit: required; ROME: enables the "
             "C^-1 adjustment).")] = None,
         deltas: Deltas = None,
         nas: Annotated[Path | None, typer.Option(
             "--nas", metavar="ANCHOR", help="NAS: rescale every target value (ROME, MEMIT, AlphaEdit) to the norm "
             "measured by `prunecli anchor` for this model and method, dropping an edit whose target is far above "
             "it (docs/METHODS.md#nas).")] = None,
         batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Batched methods (MEMIT, AlphaEdit, "
                                                 "UltraEdit): facts per batch.")] = 10,
         hparams: Annotated[Path | None, typer.Option("--hparams", help="Hyper-parameters (YAML/JSON; EasyEdit "
                                                      "files accepted).")] = None,
         layers: Annotated[str | None, typer.Option(
             "--layers", help="Edited layers, e.g. 6, 3-7 or 3,4,5 (the same as --set layers=...; default: the "
             "method's layers for this model).")] = None,
         set_: Annotated[list[str] | None, typer.Option("--set", help="Override a hyper-parameter: key=value "
                                                        "(repeatable).")] = None,
         archive: Annotated[Path | None, typer.Option("--archive", help="MEND: the trained networks (from `prunecli "
                                                      "train-mend` on this same base model).")] = None,
         prune_every: Annotated[int | None, typer.Option(
             "--prune-every", min=1, help="Restrain the accumulated delta after every K edits.")] = None,
         kappa_trigger: Annotated[float | None, typer.Option(
             "--kappa-trigger", help="Restrain the accumulated delta whenever kappa(W + D) of an edited matrix "
             "exceeds T (checked after every edit; with --prune-every, either triggers).")] = None,
         seed: Annotated[int, typer.Option("--seed", help="Seed of the context-prefix sampler.")] = 0,
         strict: Annotated[bool, typer.Option("--strict", help="Exit 1 and write nothing if any edit did not take "
                                              "(by --check, on the edit prompt after it).")] = False,
         check: Annotated[Check, typer.Option(  # type: ignore[valid-type]
             "--check", help="When an edit took: teacher-forced (fast): the new target's mean token probability beats "
             "the true object's; generation: greedy decoding of the edit prompt starts with the new target "
             "(normalised, the rule of `evaluate -t counterfact-gen`).")] = Check("teacher-forced"),
         checkpoint_every: Annotated[int, typer.Option(
             "--checkpoint-every", min=0, metavar="K",
             help="Also write the finished edits to -o (marked partial) after every K edits, so a run killed without "
             "warning (out of memory, kill -9, power cut) loses at most K; 0: only on Ctrl-C/SIGTERM, which always "
             "write them. Default 50: writing the delta takes a second or two even after hundreds of edits, 50 edits "
             "take minutes.")] = 50,
         resume: Annotated[bool, typer.Option(
             "--resume", help="Continue the unfinished run in -o (written by Ctrl-C, SIGTERM or --checkpoint-every) "
             "where it stopped, given the same options; the result is what an uninterrupted run writes. Without a "
             "partial -o the run starts at --start. The same as --delta PARTIAL --start NEXT -o OTHER.")] = False,
         force: Force = False, ignore_base_mismatch: IgnoreBaseMismatch = False) -> None:
    """Edit facts into a model, one after another (batched methods: batch after batch), and write the accumulated
    edits as a low-rank delta; with --delta PREV it continues a previous run, so deltas chain like Makefile steps.

    Example: prunecli edit smollm2 -r "$PRUNECLI_DATA_DIR/counterfact/counterfact-edit.json" --limit 2 --stats
    smollm2.stats.safetensors -o edits.safetensors

    Example: prunecli edit smollm2 -r "$PRUNECLI_DATA_DIR/counterfact/counterfact-edit.json" --start 2 --limit 2
    --stats smollm2.stats.safetensors -d edits.safetensors -o more-edits.safetensors

    UltraEdit needs no statistics (its normaliser travels in the delta, so chains continue exactly):

    Example: prunecli edit smollm2 -r "$PRUNECLI_DATA_DIR/counterfact/counterfact-edit.json" --limit 2 --method
    ultraedit -o ultraedit-edits.safetensors

    Keep kappa in budget: --kappa-trigger 60 --target-kappa 45 restrains (the mildest scale-free restraint reaching
    kappa 45) whenever an edit takes kappa(W + D) above 60; every restraint is recorded in the delta's history.
    MEND needs --archive (from train-mend); MEMIT and AlphaEdit need --stats for their layers (stats --method).

    NAS rescales every target value to the norm `prunecli anchor` measured for the same model and method:
    add --nas smollm2.rome.anchor.safetensors (from the anchor command's example) to the first example.

    Ctrl-C or SIGTERM (a job scheduler's) stops after the last finished edit (batch) and writes the edits done so far
    to -o, marked partial in its history; the same command with --resume continues where it stopped.

    Every edit is checked on its edit prompt right after it (batched methods: after its batch): by default it took
    when the new target's mean token probability is above the true object's (or >= 0.1 for records without one);
    --check generation asks what greedy decoding writes instead. Failures are warned about, counted in --json
    (`failed_edits`) and the summary; --strict makes any failure an error, and a run in which no edit took is always
    an error (nothing is written).
    """
    from prunecli.api.edit import EditOptions, run_edit_job

    if requests is None:
        raise typer.BadParameter("give the edit requests with --requests FILE (or - for standard input)",
                                 param_hint="--requests")
    if prune_every is None and kappa_trigger is None and restraint.target_kappa is not None:
        raise typer.BadParameter("restrains only with --prune-every or --kappa-trigger", param_hint="--target-kappa")
    overrides = (*(set_ or ()), *((f"layers={layers}",) if layers is not None else ()))
    options = EditOptions(model, requests, output, method=method, start=start, limit=limit, stats=stats,
                          deltas=tuple(deltas or ()), batch_size=batch_size, hparams=hparams, overrides=overrides,
                          archive=archive, prune_every=prune_every, kappa_trigger=kappa_trigger, restraint=restraint,
                          sphere=sphere, nas=nas, seed=seed, strict=strict, check=check.value, load=load, force=force,
                          ignore_base_mismatch=ignore_base_mismatch, checkpoint_every=checkpoint_every, resume=resume)
    with cli_progress() as progress:
        result = run_edit_job(options, progress)
    for tensor_reports in result.run.restraints:
        for w in {r.info.warning for r in tensor_reports if r.info.warning}:
            out.warn(w)
    out.result(result.to_json(), lambda: _render(out, result))


def _render(out: Out, result: EditResult) -> None:
    from prunecli.api.edit import ranges

    run, failed = result.run, result.failed_records
    if not run.reports:  # --resume of a finished run: the library's note said so
        return
    generated = result.options.check == "generation"
    out.table("edits", ["#", "prompt", "target", "P before", "P after", "loss", "s",
                        *(["generated"] if generated else []), "took"],
              [[str(r.index), r.prompt, r.target_new, f"{r.prob_before:.3g}", f"{r.prob_after:.3g}", f"{r.loss:.3f}",
                f"{r.seconds:.1f}", *([r.generated or ""] if generated else []), "yes" if r.took else "NO"]
               for r in run.reports],
              right=["#", "P before", "P after", "loss", "s"])
    n = len(run.reports)
    dropped = [r.index for r in run.reports if r.dropped]
    continued = f" (continuing at record {result.continued_from})" if result.continued_from is not None else ""
    out.say(f"wrote {result.options.output}: {n} new edit(s){continued}, {len(run.delta.requests)} in total, layers "
            f"{result.layers}, {run.edit_seconds / n:.1f} s per edit ({run.edit_seconds:.1f} s editing after "
            f"{run.seconds - run.edit_seconds:.1f} s for context prefixes and earlier deltas)"
            + (f"; {len(failed)} of {n} edit(s) did not take (records {ranges(failed)})" if failed
               else "; every edit took")
            + (f"; NAS dropped {len(dropped)} (records {ranges(dropped)})" if dropped else ""))
