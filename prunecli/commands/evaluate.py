"""`prunecli evaluate`: editing metrics and general abilities of a model + deltas, every metric with its protocol."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from prunecli.commands._common import (AllowPickleOpt, DebugOpt, DeviceMapOpt, DeviceOpt, IgnoreBaseMismatchOpt,
                                       JsonOpt, MaxMemoryOpt, OffloadFolderOpt, TokenizerOpt, cell, either, emit_json,
                                       cli_progress, guarded, note, warn)
from prunecli.errors import PruneCliError
from prunecli.evaluation.data import DEFAULT_DATA_DIR, DEFAULT_PPL_TOKENS

def _metrics_table(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    from prunecli.evaluation.report import format_interval, format_value
    from prunecli.evaluation.uncertainty import INTERVALS_TEXT

    deltas = f" + {len(report['deltas'])} delta(s)" if report["deltas"] else ""
    table = Table(title=cell(f"{report['model']}{deltas}"))
    for col in ("metric", "value", "95 % interval", "n", "NaN/Inf", "protocol"):
        table.add_column(col, justify="left" if col in ("metric", "protocol") else "right",
                         no_wrap=col in ("metric", "95 % interval"))
    for name, value in report["metrics"].items():
        bad = report["n_nonfinite"][name]
        table.add_row(name, format_value(value), format_interval(report["interval"].get(name)),
                      str(report["n"][name]), f"[red]{bad}[/]" if bad else "0", report["metric_group"][name])
    console = Console()
    console.print(table)
    for group, text in report["protocol"].items():
        console.print(f"[bold]{escape(group)}[/]: {escape(text)}", highlight=False)
    if report["interval"]:
        console.print(f"[bold]95 % intervals[/]: {INTERVALS_TEXT}", highlight=False)


def main(
    targets: Annotated[list[str] | None, typer.Argument(
        metavar="MODEL | REPORT.json...",
        help="Model folder (or `smollm2`) to evaluate; with --compare, the report files to compare.")] = None,
    deltas: Annotated[list[Path] | None, typer.Option(
        "--delta", "-d", help="Delta file added in memory to the touched tensors (repeatable, composed in order).")] = None,
    requests: Annotated[Path | None, typer.Option(
        "--requests", "-r", help="Edit requests (CounterFact, zsRE or minimal JSON/JSONL; - reads standard input). "
        "Default: the requests recorded in the deltas.")] = None,
    edits_old: Annotated[Path | None, typer.Option("--edits", "-e", hidden=True)] = None,
    start: Annotated[int, typer.Option("--start", min=0, help="First request record to use.")] = 0,
    limit: Annotated[int | None, typer.Option(
        "--limit", "-n", min=1, help="Use this many requests, and at most this many examples per general task.")] = None,
    tasks: Annotated[str | None, typer.Option(
        "--tasks", "-t", help="Comma-separated tasks, each optionally =SOURCE: counterfact, zsre (teacher forced), "
        "counterfact-gen, zsre-gen (greedy generation), perplexity, gsm8k, "
        "rte, nq, samsum, glue:sst2|mrpc|cola|rte|mmlu; groups glue, general. Default: the edit metrics of --requests "
        "(+ perplexity with --text).")] = None,
    text: Annotated[Path | None, typer.Option(
        "--text", help="Text file for `perplexity` (default task source: DATA_DIR/wikitext/wiki.test.raw).")] = None,
    window: Annotated[int | None, typer.Option(
        "--window", min=2, help="Perplexity window in tokens (default min(1024, model context)).")] = None,
    stride: Annotated[int | None, typer.Option("--stride", min=1, help="Perplexity stride (default window/2).")] = None,
    max_tokens: Annotated[int, typer.Option(
        "--max-tokens", min=2, help="Score the first N tokens of the perplexity text (the report states the "
        "count and the seconds it took).")] = DEFAULT_PPL_TOKENS,
    data_dir: Annotated[Path, typer.Option(
        "--data-dir", envvar="PRUNECLI_DATA_DIR", help="Folder of the task data files.")] = DEFAULT_DATA_DIR,
    seed: Annotated[int | None, typer.Option(
        "--seed", help="With --limit: a seeded random sample of each general task instead of its first N.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Sequences per forward pass.")] = 16,
    device: DeviceOpt = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help="fp32, bf16 or fp16.")] = "fp32",
    device_map: DeviceMapOpt = None,
    max_memory: MaxMemoryOpt = None,
    offload_folder: OffloadFolderOpt = None,
    tokenizer_ref: TokenizerOpt = None,
    allow_pickle: AllowPickleOpt = False,
    locality_reference: Annotated[str | None, typer.Option(
        "--locality-reference", help="Model whose predictions zsRE locality agreement is measured against "
        "(default: MODEL without the deltas).")] = None,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Also write the report (JSON) here.")] = None,
    compare: Annotated[bool, typer.Option(
        "--compare", help="Compare report files (from -o) side by side instead of evaluating.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing report (never an input).")] = False,
    ignore_base_mismatch: IgnoreBaseMismatchOpt = False,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Evaluate MODEL + deltas: CounterFact/zsRE editing metrics and general abilities, each with its protocol named.

    Every request is judged on the final model (all deltas added in memory; nothing is written to disk). Reports
    give each metric's value, 95 % interval, case count, NaN/Inf count and protocol, and its per-record outcomes;
    `--compare` lines reports up side by side, warns when their protocols differ, and tests the differences record by
    record when the reports scored the same records. `counterfact-gen` / `zsre-gen` judge what greedy decoding
    writes instead of teacher-forced scores (docs/EVALUATION.md).

    Example: prunecli evaluate smollm2 -d edits.safetensors -r counterfact.json --limit 50 -t counterfact,perplexity -o edited.json

    Example: prunecli evaluate --compare base.json edited.json pruned.json

    Big models: --device-map auto [--max-memory 0=20GiB,cpu=60GiB]. Several GPUs or machines: run it under
    `accelerate launch` (or torchrun); each process scores a share of every task, rank 0 reports.

    Example: accelerate launch --multi_gpu --num_processes 4 -m prunecli evaluate smollm2 -r cf.json -o r.json
    """

    edits = either(requests, edits_old, "--requests", "--edits")
    paths = list(targets or [])
    if compare and not paths:
        raise typer.BadParameter("--compare needs one or more REPORT.json files")
    if compare and (deltas or edits or tasks or text or output):
        raise typer.BadParameter("--compare only reads reports; drop --delta/--requests/--tasks/--text/-o")
    if not compare and len(paths) != 1:
        raise typer.BadParameter("give exactly one MODEL (or --compare REPORT.json...)")

    def body() -> None:
        if compare:
            from prunecli.commands.compare import compare_files

            compare_files([Path(p) for p in paths], json_out)
            return
        from prunecli.core.atomic import check_output_path, labelled
        from prunecli.models.default_model import resolve_model_path
        from prunecli.distributed import workers
        from prunecli.evaluation.report import write_report
        from prunecli.evaluation.base import EvalOptions
        from prunecli.evaluation.runner import run_evaluation

        if output is not None:
            inputs = [("model", resolve_model_path(paths[0])), *labelled("delta", deltas), ("requests file", edits),
                      ("text file", text), ("locality reference", locality_reference)]
            check_output_path(output, force, is_dir=False, inputs=inputs)
        options = EvalOptions(deltas=list(deltas or []), edits=edits, start=start, limit=limit, tasks=tasks,
                              text=text, window=window, stride=stride, max_tokens=max_tokens, seed=seed,
                              batch_size=batch_size, device=device, dtype=dtype,
                              locality_reference=locality_reference, data_dir=data_dir,
                              ignore_base_mismatch=ignore_base_mismatch,
                              device_map=device_map, max_memory=max_memory, offload_folder=offload_folder,
                              tokenizer=tokenizer_ref, allow_pickle=allow_pickle)
        with workers(device, device_map) as group, cli_progress() as progress:
            report = run_evaluation(paths[0], options, progress, group)
            if not group.is_main:
                return  # rank 0 reports for every process
        for task, t in report["timing"].items():
            rate = f" ({t['per_second']:.1f} {t['unit']}/s)" if t["per_second"] else ""
            note(f"{task}: {t['count']} {t['unit']} in {t['seconds']:.1f} s{rate}")
        for name, bad in report["n_nonfinite"].items():
            if bad:
                warn(f"{name}: {bad} of {report['n'][name]} cases had NaN/Inf scores (counted, not dropped)")
        if output is not None:
            write_report(report, output, force)
            note(f"wrote {output}")
        if json_out:
            emit_json(report)
        else:
            _metrics_table(report)
        if report["failed_tasks"]:
            failures = "; ".join(f"{name}: {why}" for name, why in report["failed_tasks"].items())
            raise PruneCliError(f"{len(report['failed_tasks'])} of {len(report['tasks'])} tasks failed (the others' "
                                f"results are {'in ' + str(output) if output else 'above'}): {failures}")

    guarded(debug, body)
