"""`prunecli edit`: sequential ROME / MEMIT / MEND editing of a checkpoint into a factored delta file."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from prunecli.commands._common import (DebugOpt, DeviceMapOpt, ForceOpt, JsonOpt, MaxMemoryOpt, OffloadFolderOpt,
                                       emit_json, err_console, guarded, note, progress_bar, warn)
from prunecli.errors import PruneCliError


def main(
    model: Annotated[str, typer.Argument(help="Base model folder (or `smollm2`).")],
    requests: Annotated[Path, typer.Option("--requests", help="Edit requests: JSON list or JSONL (CounterFact, "
                                           "zsRE MEND or minimal format).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Delta file to write (.safetensors).")],
    method: Annotated[str, typer.Option("--method", help="rome, memit or mend.")] = "rome",
    archive: Annotated[Path | None, typer.Option("--archive", help="MEND: the trained networks (from `prunecli "
                                                 "train-mend` on this same base model).")] = None,
    start: Annotated[int, typer.Option("--start", help="First record to use (0-based).", min=0)] = 0,
    limit: Annotated[int | None, typer.Option("--limit", help="Number of records to use.", min=1)] = None,
    stats: Annotated[Path | None, typer.Option("--stats", help="Key statistics from `prunecli stats` (MEMIT: "
                                               "required; ROME: enables the C^-1 adjustment).")] = None,
    delta: Annotated[list[Path] | None, typer.Option("--delta", help="Previous delta(s) to continue from; the "
                                                     "output holds them plus the new edits.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="MEMIT: facts per batch.", min=1)] = 10,
    hparams: Annotated[Path | None, typer.Option("--hparams", help="Hyper-parameters (YAML/JSON; EasyEdit keys "
                                                 "accepted).")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a hyper-parameter: key=value "
                                                   "(repeatable).")] = None,
    prune_every: Annotated[int | None, typer.Option("--prune-every", help="Restrain the accumulated delta with "
                                                    "PRUNE after every K edits.", min=1)] = None,
    fn: Annotated[str, typer.Option("--fn", help="Restraint function for --prune-every: log or linear.")] = "log",
    alpha: Annotated[float, typer.Option("--alpha", help="Base of log F.")] = 1.2,
    beta: Annotated[float, typer.Option("--beta", help="Divisor of linear F.")] = 2.0,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N or auto.")] = "cpu",
    device_map: DeviceMapOpt = None,
    max_memory: MaxMemoryOpt = None,
    offload_folder: OffloadFolderOpt = None,
    dtype: Annotated[str, typer.Option("--dtype", help="Model dtype: fp32 or bf16 (edits are computed in fp32).")]
    = "fp32",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the context-prefix sampler.")] = 0,
    strict: Annotated[bool, typer.Option("--strict", help="Exit 1 and write nothing if any edit did not take "
                                         "(P(new) <= P(true) on the edit prompt after it).")] = False,
    json_out: JsonOpt = False,
    force: ForceOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Edit facts into a model, one after another (MEMIT: batch after batch), and write the accumulated edits as a
    low-rank delta; with --delta PREV it continues a previous run, so deltas chain like Makefile steps.

    Example: prunecli edit smollm2 --requests facts.jsonl --method rome --stats smollm2.stats.safetensors
    -o edits.delta.safetensors

    MEND: prunecli edit smollm2 --requests facts.jsonl --method mend --archive smollm2.mend.safetensors -o m.delta

    Every edit is checked on its edit prompt right after it (MEMIT: after its batch): it took when the new target's
    mean token probability is above the true object's (or >= 0.1 for records without one). Failures are warned
    about, counted in --json (`failed_edits`) and the summary; --strict makes any failure an error, and a run in
    which no edit took is always an error (nothing is written).

    Big models: --device-map auto [--max-memory 0=20GiB,cpu=60GiB]; offloaded weights are edited too (only the
    edited matrices are materialised, in fp32, while an update is computed).
    """

    def body() -> None:
        from prunecli.core.atomic import check_output_path
        from prunecli.core.checkpoint import Checkpoint
        from prunecli.core.delta import load_deltas
        from prunecli.core.restraint import check_params
        from prunecli.editors.base import editor_for
        from prunecli.editors.hparams import resolve_hparams
        from prunecli.editors.session import PruneSchedule, run_edits
        from prunecli.editors.stats import KeyStats, load_moments
        from prunecli.models.adapters import resolve_adapter
        from prunecli.models.default_model import resolve_model_path
        from prunecli.models.loading import load_model
        from prunecli.requests import load_requests

        # Everything that can be checked without the model is checked before loading it.
        editor = editor_for(method, archive)
        check_output_path(output, force)
        if editor.needs_stats and stats is None:
            raise PruneCliError(f"{method} needs key statistics: compute them with `prunecli stats {model} "
                                f"--method {method} --text FILE -o STATS` and pass --stats STATS")
        if prune_every is not None:
            check_params(fn, alpha, beta)
        if dtype.lower() not in ("fp32", "float32", "bf16", "bfloat16"):
            raise PruneCliError(f"--dtype must be fp32 or bf16, got {dtype!r}")
        edit_requests = load_requests(requests, start, limit)
        prior = load_deltas(delta or [])
        if stats is not None:
            KeyStats.load(stats)  # a bad file fails now, not after the model is loaded
        if method == "mend":
            if hparams is not None or set_:
                raise PruneCliError("--hparams/--set do not apply to mend: its settings are in the archive")
            editor.archive.check_base(Checkpoint(resolve_model_path(model)), archive)  # type: ignore[attr-defined]

        lm, tokenizer, base = load_model(model, device, dtype, device_map=device_map, max_memory=max_memory,
                                         offload_folder=offload_folder)
        if prior is not None:
            prior.check_base(base, force)
        adapter = resolve_adapter(lm)
        hp = (editor.hparams(str(archive)) if method == "mend"  # type: ignore[attr-defined]
              else resolve_hparams(method, adapter.family, adapter.num_layers, hparams, set_ or [], note))
        moments = load_moments(stats, base, adapter, hp.layers) if stats is not None else None
        if method == "rome" and hp.mom2_adjustment and moments is None:
            note("no --stats: ROME uses C = I (no second-moment adjustment); pass --stats for the full method")
        if method == "rome" and not hp.mom2_adjustment and moments is not None:
            note("mom2_adjustment is false: the statistics are not used")
        provenance = {"stats": {"path": str(stats), "corpus": KeyStats.load(stats).corpus}} if stats else {}
        schedule = PruneSchedule(prune_every, fn, alpha, beta) if prune_every is not None else None

        run = _with_progress(len(edit_requests), lambda on_step: run_edits(
            lm, tokenizer, base, edit_requests, method, hp, moments, prior, batch_size, schedule, seed, provenance,
            on_step, editor))
        for tensor_reports in run.restraints:
            for w in {r.info.warning for r in tensor_reports if r.info.warning}:
                warn(w)
        n, failed = len(run.reports), [r.index for r in run.failed]
        if failed and (strict or len(failed) == n):
            why = "--strict" if len(failed) < n else "no edit took"
            raise PruneCliError(f"{len(failed)} of {n} edit(s) did not take (records {_ranges(failed)}); {why}: "
                                f"nothing written")
        run.delta.save(output, force)
        summary = {"output": str(output), "model": str(base.path), "method": method, "layers": list(hp.layers),
                   "hparams": hp.to_json(), "edits": n, "failed_edits": len(failed),
                   "failed_records": failed, "total_edits": len(run.delta.requests),
                   "seconds": run.seconds, "seconds_per_edit": run.seconds / n,
                   "restraints": [[r.to_json() for r in rs] for rs in run.restraints],
                   "requests": [r.to_json() for r in run.reports]}
        if json_out:
            emit_json(summary)
        else:
            _print_table(run.reports)
            err_console.print(f"wrote {output}: {n} new edit(s), {len(run.delta.requests)} in total, layers "
                              f"{list(hp.layers)}, {run.seconds / n:.1f} s per edit"
                              + (f"; {len(failed)} of {n} edit(s) did not take (records {_ranges(failed)})"
                                 if failed else "; every edit took"), highlight=False)

    guarded(debug, body)


def _with_progress(total: int, run: Callable[[Callable[[int, list[Any]], None]], Any]) -> Any:
    """Call `run(on_step)` under a progress bar over the requests that shows the last value-optimisation loss."""
    from rich.progress import TextColumn

    with progress_bar([TextColumn("{task.fields[loss]}")]) as bar:
        task = bar.add_task("editing", total=total, loss="")

        def on_step(done: int, reports: list[Any]) -> None:
            for r in reports:
                if not r.took:
                    true = f", P(true) {r.true_mean_prob:.3g}" if r.true_mean_prob is not None else ""
                    warn(f"edit of record {r.index} did not take: P(new) {r.new_mean_prob:.3g}{true} on its prompt "
                         f"(mean token probability)")
            last = reports[-1]
            bar.update(task, completed=done, loss=f"loss {last.initial_loss:.2f} -> {last.loss:.2f}")

        return run(on_step)


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
        table.add_row(str(r.index), r.prompt, r.target_new, f"{r.prob_before:.3g}", f"{r.prob_after:.3g}",
                      f"{r.loss:.3f}", f"{r.seconds:.1f}", "yes" if r.took else "NO")
    Console().print(table)
