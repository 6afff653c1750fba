"""`prunecli evaluate`: editing metrics and general abilities of a model + deltas, every metric with its protocol."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.text import Text

from prunecli.commands._display import cli_progress
from prunecli.commands._errors import guarded
from prunecli.commands._options import Deltas, IgnoreBaseMismatch, Load, Out, Requests, Start
from prunecli.errors import PruneCliError
from prunecli.evaluation.data import DEFAULT_DATA_DIR, DEFAULT_PPL_TOKENS


@guarded
def main(targets: Annotated[list[str] | None, typer.Argument(
             metavar="MODEL | REPORT.json...",
             help="Model folder (or a built-in name such as smollm2) to evaluate; with --compare, the report files "
             "to compare.")] = None,
         *, out: Out, load: Load, requests: Requests, deltas: Deltas = None, start: Start = 0,
         limit: Annotated[int | None, typer.Option(
             "--limit", "-n", min=1, help="Use this many requests, and at most this many examples per general "
             "task.")] = None,
         tasks: Annotated[str | None, typer.Option(
             "--tasks", "-t", help="Comma-separated tasks, each optionally =SOURCE: counterfact, zsre (teacher "
             "forced), "
             "counterfact-gen, zsre-gen (greedy generation), perplexity, gsm8k, rte, nq, samsum, "
             "glue:sst2|mrpc|cola|rte|mmlu; groups glue, general. Default: the edit metrics of --requests (+ "
             "perplexity with --text).")] = None,
         text: Annotated[Path | None, typer.Option(
             "--text", help="Text file for `perplexity` (default task source: DATA_DIR/wikitext/wiki.test.raw).")]
         = None,
         window: Annotated[int | None, typer.Option(
             "--window", min=2, help="Perplexity window in tokens (default min(1024, model context)).")] = None,
         stride: Annotated[int | None, typer.Option("--stride", min=1, help="Perplexity stride (default "
                                                    "window/2).")] = None,
         max_tokens: Annotated[int, typer.Option(
             "--max-tokens", min=2, help="Score the first N tokens of the perplexity text (the report states the count "
             "and the seconds it took).")] = DEFAULT_PPL_TOKENS,
         data_dir: Annotated[Path, typer.Option(
             "--data-dir", envvar="PRUNECLI_DATA_DIR", help="Folder of the task data files ($PRUNECLI_DATA_DIR).")]
         = DEFAULT_DATA_DIR,
         seed: Annotated[int | None, typer.Option(
             "--seed", help="With --limit: a seeded random sample of each general task instead of its first N.")]
         = None,
         batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Sequences per forward pass.")]
         = 16,
         locality_reference: Annotated[str | None, typer.Option(
             "--locality-reference", help="Model whose predictions zsRE locality agreement is measured against "
             "(default: MODEL without the deltas).")] = None,
         output: Annotated[Path | None, typer.Option("-o", "--output", help="Also write the report (JSON) here.")]
         = None,
         compare: Annotated[bool, typer.Option(
             "--compare", help="Compare report files (from -o) side by side instead of evaluating.")] = False,
         force: Annotated[bool, typer.Option("--force", help="Replace an existing report (never an input).")] = False,
         ignore_base_mismatch: IgnoreBaseMismatch = False) -> None:
    """Evaluate MODEL + deltas: CounterFact/zsRE editing metrics and general abilities, each with its protocol named.

    Every request is judged on the final model (all deltas added in memory; nothing is written to disk). Reports
    give each metric's value, 95 % interval, case count, NaN/Inf count and protocol, and its per-record outcomes;
    `--compare` lines reports up side by side, warns when their protocols differ, and tests the differences record
    by record when the reports scored the same records. `counterfact-gen` / `zsre-gen` judge what greedy decoding
    writes instead of teacher-forced scores (docs/EVALUATION.md). Task data come from --data-dir
    ($PRUNECLI_DATA_DIR).

    Example: prunecli evaluate smollm2 -r "$PRUNECLI_DATA_DIR/counterfact/counterfact-edit.json" --limit 2 -t
    counterfact,counterfact-gen -o base.json

    Example: prunecli evaluate smollm2 -d pruned.safetensors -t counterfact,perplexity --max-tokens 512 -o pruned.json

    Example: prunecli evaluate --compare base.json pruned.json

    Big models: --device-map auto [--max-memory 0=20GiB,cpu=60GiB]. Several GPUs or machines: run it under
    `accelerate launch --multi_gpu --num_processes 4 -m prunecli evaluate ...` (or torchrun); each process scores a
    share of every task, rank 0 reports.
    """
    paths = list(targets or [])
    if compare:
        if not paths:
            raise typer.BadParameter("--compare needs one or more REPORT.json files")
        if deltas or requests or tasks or text or output:
            raise typer.BadParameter("--compare only reads reports; drop --delta/--requests/--tasks/--text/-o")
        from prunecli.commands.compare import compare_files

        compare_files([Path(p) for p in paths], out)
        return
    if len(paths) != 1:
        raise typer.BadParameter("give exactly one MODEL (or --compare REPORT.json...)")
    from prunecli.core.atomic import check_output_path, labelled
    from prunecli.distributed import workers
    from prunecli.evaluation.base import EvalOptions
    from prunecli.evaluation.report import write_report
    from prunecli.evaluation.runner import run_evaluation
    from prunecli.models.builtin import resolve_model_path

    if output is not None:
        check_output_path(output, force, is_dir=False, inputs=[
            ("model", resolve_model_path(paths[0])), *labelled("delta", deltas), ("requests file", requests),
            ("text file", text), ("locality reference", locality_reference)])
    options = EvalOptions(tuple(deltas or ()), requests, start, limit, tasks, text, window, stride, max_tokens, seed,
                          batch_size, locality_reference, data_dir, ignore_base_mismatch, load)
    with workers(load.device, load.device_map) as group, cli_progress() as progress:
        report = run_evaluation(paths[0], options, progress, group)
        if not group.is_main:
            return  # rank 0 reports for every process
    for task, t in report["timing"].items():
        rate = f" ({t['per_second']:.1f} {t['unit']}/s)" if t["per_second"] else ""
        out.note(f"{task}: {t['count']} {t['unit']} in {t['seconds']:.1f} s{rate}")
    for name, bad in report["n_nonfinite"].items():
        if bad:
            out.warn(f"{name}: {bad} of {report['n'][name]} cases had NaN/Inf scores (counted, not dropped)")
    if output is not None:
        write_report(report, output, force)
        out.note(f"wrote {output}")
    out.result(report, lambda: _metrics_table(out, report))
    if report["failed_tasks"]:
        failures = "; ".join(f"{name}: {why}" for name, why in report["failed_tasks"].items())
        raise PruneCliError(f"{len(report['failed_tasks'])} of {len(report['tasks'])} tasks failed (the others' "
                            f"results are {'in ' + str(output) if output else 'above'}): {failures}")


def _metrics_table(out: Out, report: dict[str, Any]) -> None:
    from prunecli.evaluation.counterfact import fewer_scored
    from prunecli.evaluation.report import format_interval, format_value
    from prunecli.evaluation.uncertainty import INTERVALS_TEXT

    deltas = f" + {len(report['deltas'])} delta(s)" if report["deltas"] else ""
    out.table(Text(f"{report['model']}{deltas}"), ["metric", "value", "95 % interval", "n", "NaN/Inf", "protocol"],
              [[name, format_value(value), format_interval(report["interval"].get(name)), str(report["n"][name]),
                Text(str(report["n_nonfinite"][name]), style="red" if report["n_nonfinite"][name] else ""),
                report["metric_group"][name]] for name, value in report["metrics"].items()],
              right=["value", "95 % interval", "n", "NaN/Inf"])
    for group, text in report["protocol"].items():
        out.say(f"{group}: {text}")
    if (why := fewer_scored(report["n"])) is not None:
        out.note(why)
    if report["interval"]:
        out.say(f"95 % intervals: {INTERVALS_TEXT}")
