"""`prunecli edit`: sequential ROME / MEMIT / AlphaEdit / MEND / UltraEdit editing of a checkpoint into a factored
delta file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from prunecli.commands._common import (AllowPickleOpt, DebugOpt, DeviceMapOpt, DeviceOpt, ForceOpt,
                                       IgnoreBaseMismatchOpt, JsonOpt, MaxMemoryOpt, OffloadFolderOpt, TokenizerOpt,
                                       cell, cli_progress, emit_json, guarded, note, say, warn)
from prunecli.commands._restraint import (AlphaOpt, BetaOpt, ClampOpt, FnOpt, StrengthOpt, TargetKappaOpt,
                                          restraint_settings)
from prunecli.editors.registry import METHODS
from prunecli.errors import PruneCliError


def main(
    model: Annotated[str, typer.Argument(help="Base model folder (or `smollm2`).")],
    requests: Annotated[Path, typer.Option("--requests", help="Edit requests: JSON list or JSONL (CounterFact, "
                                           "zsRE MEND or minimal format); - reads standard input.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Delta file to write (.safetensors).")],
    method: Annotated[str | None, typer.Option("--method", help=f"{', '.join(METHODS)} (default: the --hparams "
                                               "file's alg_name, else rome).")] = None,
    archive: Annotated[Path | None, typer.Option("--archive", help="MEND: the trained networks (from `prunecli "
                                                 "train-mend` on this same base model).")] = None,
    start: Annotated[int, typer.Option("--start", help="First record to use (0-based).", min=0)] = 0,
    limit: Annotated[int | None, typer.Option("--limit", help="Number of records to use.", min=1)] = None,
    stats: Annotated[Path | None, typer.Option("--stats", help="Key statistics from `prunecli stats` (MEMIT, "
                                               "AlphaEdit: required; ROME: enables the C^-1 adjustment).")] = None,
    delta: Annotated[list[Path] | None, typer.Option("--delta", "-d", help="Previous delta(s) to continue from; the "
                                                     "output holds them plus the new edits.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="MEMIT, AlphaEdit, UltraEdit: facts per batch.",
                                            min=1)] = 10,
    hparams: Annotated[Path | None, typer.Option("--hparams", help="Hyper-parameters (YAML/JSON; EasyEdit keys "
                                                 "accepted).")] = None,
    layers: Annotated[str | None, typer.Option("--layers", help="Edited layers, e.g. 6, 3-7 or 3,4,5 (the same as "
                                               "--set layers=...; default: the method's layers for this model).")]
    = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a hyper-parameter: key=value "
                                                   "(repeatable).")] = None,
    prune_every: Annotated[int | None, typer.Option("--prune-every", help="Restrain the accumulated delta with "
                                                    "PRUNE after every K edits.", min=1)] = None,
    kappa_trigger: Annotated[float | None, typer.Option(
        "--kappa-trigger", help="Restrain the accumulated delta whenever kappa(W + D) of an edited matrix exceeds T "
        "(checked after every edit; with --prune-every, either triggers).")] = None,
    fn: FnOpt = None,
    alpha: AlphaOpt = 1.2,
    beta: BetaOpt = 2.0,
    strength: StrengthOpt = 0.5,
    clamp: ClampOpt = False,
    target_kappa: TargetKappaOpt = None,
    device: DeviceOpt = "auto",
    device_map: DeviceMapOpt = None,
    max_memory: MaxMemoryOpt = None,
    offload_folder: OffloadFolderOpt = None,
    tokenizer_ref: TokenizerOpt = None,
    allow_pickle: AllowPickleOpt = False,
    dtype: Annotated[str, typer.Option("--dtype", help="Model dtype: fp32 or bf16 (edits are computed in fp32).")]
    = "fp32",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the context-prefix sampler.")] = 0,
    strict: Annotated[bool, typer.Option("--strict", help="Exit 1 and write nothing if any edit did not take "
                                         "(P(new) <= P(true) on the edit prompt after it).")] = False,
    json_out: JsonOpt = False,
    force: ForceOpt = False,
    ignore_base_mismatch: IgnoreBaseMismatchOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Edit facts into a model, one after another (MEMIT: batch after batch), and write the accumulated edits as a
    low-rank delta; with --delta PREV it continues a previous run, so deltas chain like Makefile steps.

    Example: prunecli edit smollm2 --requests facts.jsonl --method rome --stats smollm2.stats.safetensors
    -o edits.delta.safetensors

    MEND: prunecli edit smollm2 --requests facts.jsonl --method mend --archive smollm2.mend.safetensors -o m.delta

    AlphaEdit (keys of earlier edits travel in the delta, so chains continue): prunecli edit smollm2 --requests cf.json
    --limit 10 --method alphaedit --stats smollm2.stats.safetensors -o a.delta; then --start 10 --delta a.delta

    UltraEdit (no statistics; its normaliser travels in the delta): prunecli edit smollm2 --requests cf.json
    --method ultraedit --batch-size 10 -o u.delta

    Keep kappa in budget: --kappa-trigger 60 --target-kappa 45 restrains (the mildest scale-free restraint reaching
    kappa 45) whenever an edit takes kappa(W + D) above 60; every restraint is recorded in the delta's history.

    Every edit is checked on its edit prompt right after it (MEMIT: after its batch): it took when the new target's
    mean token probability is above the true object's (or >= 0.1 for records without one). Failures are warned
    about, counted in --json (`failed_edits`) and the summary; --strict makes any failure an error, and a run in
    which no edit took is always an error (nothing is written).

    Big models: --device-map auto [--max-memory 0=20GiB,cpu=60GiB]; offloaded weights are edited too (only the
    edited matrices are materialised, in fp32, while an update is computed).
    """

    overrides = [*(set_ or []), *([f"layers={layers}"] if layers is not None else [])]

    def body() -> None:
        from prunecli.core.atomic import check_output_path, labelled
        from prunecli.core.checkpoint import Checkpoint
        from prunecli.core.peft_io import load_deltas
        from prunecli.editors.base import EditorInputs
        from prunecli.editors.hparams import file_method
        from prunecli.editors.registry import editor_for
        from prunecli.editors.session import PruneSchedule, run_edits
        from prunecli.editors.stats import KeyStats, load_moments
        from prunecli.models.adapters import resolve_adapter
        from prunecli.models.default_model import resolve_model_path
        from prunecli.models.loading import load_model
        from prunecli.requests import load_requests

        # Everything that can be checked without the model is checked before loading it.
        chosen = method or (file_method(hparams) if hparams is not None else None) or "rome"
        editor = editor_for(chosen, EditorInputs(hparams, overrides, archive))
        model_path = resolve_model_path(model)
        check_output_path(output, force, is_dir=False, inputs=[
            ("model", model_path), ("requests file", requests), ("statistics file", stats), ("archive", archive),
            ("hyper-parameter file", hparams), *labelled("delta", delta)])
        if editor.needs_stats and stats is None:
            raise PruneCliError(f"{chosen} needs key statistics: compute them with `prunecli stats {model} "
                                f"--method {chosen} --text FILE -o STATS` and pass --stats STATS")
        if stats is not None and not editor.uses_stats:
            note(f"--stats is not used: {chosen} needs no key statistics")
        stats_file = stats if editor.uses_stats else None
        settings = restraint_settings(fn, alpha, beta, strength, clamp, target_kappa)
        if prune_every is None and kappa_trigger is None and target_kappa is not None:
            raise typer.BadParameter("restrains only with --prune-every or --kappa-trigger",
                                     param_hint="--target-kappa")
        if kappa_trigger is not None and not kappa_trigger >= 1:
            raise PruneCliError(f"--kappa-trigger must be a number >= 1 (a condition number), got {kappa_trigger}")
        if kappa_trigger is not None and target_kappa is not None and target_kappa > kappa_trigger:
            raise PruneCliError(f"--target-kappa {target_kappa:g} above --kappa-trigger {kappa_trigger:g} would "
                                "restrain after every edit: choose a target at or below the trigger")
        if dtype.lower() not in ("fp32", "float32", "bf16", "bfloat16"):
            raise PruneCliError(f"--dtype must be fp32 or bf16, got {dtype!r}")
        edit_requests = load_requests(requests, start, limit)
        # PEFT adapters among the deltas are read against the base
        prior = load_deltas(delta or [], Checkpoint(model_path, allow_pickle) if delta else None)
        key_stats = KeyStats.load(stats_file) if stats_file is not None else None  # read before the model loads
        editor.check_base(Checkpoint(model_path, allow_pickle))

        lm, tokenizer, base = load_model(model, device, dtype, device_map=device_map, max_memory=max_memory,
                                         offload_folder=offload_folder, tokenizer=tokenizer_ref,
                                         allow_pickle=allow_pickle)
        if prior is not None:
            prior.check_base(base, ignore_base_mismatch)
        adapter = resolve_adapter(lm)
        hp = editor.resolve_hparams(lm, adapter, note)
        moments = load_moments(key_stats, base, adapter, hp.layers) if key_stats is not None else None
        for line in editor.notes(hp, moments is not None):
            note(line)
        provenance = {"stats": {"path": str(stats), "corpus": key_stats.corpus}} if key_stats is not None else {}
        if tokenizer_ref is not None:
            provenance["tokenizer"] = tokenizer_ref  # the edits were computed with this tokenizer
        schedule = (PruneSchedule(settings, prune_every, kappa_trigger)
                    if prune_every is not None or kappa_trigger is not None else None)
        with cli_progress() as progress:
            run = run_edits(lm, tokenizer, base, edit_requests, editor, hp, moments, prior, batch_size, schedule,
                            seed, provenance, progress)
        for tensor_reports in run.restraints:
            for w in {r.info.warning for r in tensor_reports if r.info.warning}:
                warn(w)
        n, failed = len(run.reports), [r.index for r in run.failed]
        if failed and (strict or len(failed) == n):
            why = "--strict" if len(failed) < n else "no edit took"
            raise PruneCliError(f"{len(failed)} of {n} edit(s) did not take (records {_ranges(failed)}); {why}: "
                                f"nothing written")
        run.delta.save(output, force)
        summary = {"output": str(output), "model": str(base.path), "method": chosen, "layers": list(hp.layers),
                   "hparams": hp.to_json(), "edits": n, "failed_edits": len(failed),
                   "failed_records": failed, "total_edits": len(run.delta.requests),
                   "seconds": run.seconds, "seconds_per_edit": run.seconds / n,
                   "restraints": [[r.to_json() for r in rs] for rs in run.restraints],
                   "restraint_points": run.restraint_points,
                   "requests": [r.to_json() for r in run.reports]}
        if json_out:
            emit_json(summary)
        else:
            _print_table(run.reports)
            say(f"wrote {output}: {n} new edit(s), {len(run.delta.requests)} in total, layers {list(hp.layers)}, "
                f"{run.seconds / n:.1f} s per edit"
                + (f"; {len(failed)} of {n} edit(s) did not take (records {_ranges(failed)})"
                   if failed else "; every edit took"))

    guarded(debug, body)


def _ranges(numbers: list[int]) -> str:
    """Sorted record numbers as short ranges: 0-3, 7, 9-10."""
    runs: list[list[int]] = []
    for n in numbers:
        if runs and runs[-1][-1] == n - 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


def _print_table(reports) -> None:  # noqa: ANN001
    from rich.console import Console
    from rich.table import Table

    table = Table(title="edits")
    for col in ("#", "prompt", "target", "P before", "P after", "loss", "s", "took"):
        table.add_column(col, justify="left" if col in ("prompt", "target") else "right")
    for r in reports:
        table.add_row(str(r.index), cell(r.prompt), cell(r.target_new), f"{r.prob_before:.3g}", f"{r.prob_after:.3g}",
                      f"{r.loss:.3f}", f"{r.seconds:.1f}", "yes" if r.took else "NO")
    Console().print(table)
