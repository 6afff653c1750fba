"""`prunecli anchor`: measure NAS's anchor (the norm every edit's target value gets) for `edit --nas`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from prunecli.commands._display import cli_progress
from prunecli.commands._errors import guarded
from prunecli.commands._options import Force, Load, Model, Out, OutputFile
from prunecli.evaluation.data import DEFAULT_DATA_DIR


@guarded
def main(model: Model, output: OutputFile, out: Out, load: Load,
         method: Annotated[str, typer.Option(
             "--method", help="The editor whose value optimisation and layer to measure with: rome, memit or "
             "alphaedit (its default hyper-parameters for the model, or --hparams / --set).")] = "alphaedit",
         hparams: Annotated[Path | None, typer.Option("--hparams", help="Hyper-parameters (YAML/JSON), as for edit.")]
         = None,
         set_: Annotated[list[str] | None, typer.Option("--set", help="Override a hyper-parameter: key=value "
                                                        "(repeatable), as for edit.")] = None,
         records: Annotated[Path | None, typer.Option(
             "--records", "-r", help="Rewrites to measure on, none of them to be edited later (default: "
             "counterfact/counterfact-train.json under --data-dir).")] = None,
         data_dir: Annotated[Path, typer.Option(
             "--data-dir", envvar="PRUNECLI_DATA_DIR", help="Folder of the data files ($PRUNECLI_DATA_DIR).")]
         = DEFAULT_DATA_DIR,
         count: Annotated[int, typer.Option("--count", "-n", min=1, help="Rewrites sampled from the file (all when "
                                            "it has fewer); the paper used 1000.")] = 1000,
         seed: Annotated[int, typer.Option("--seed", help="Seed of the sample.")] = 0,
         force: Force = False) -> None:
    """Measure NAS's anchor: the trimmed mean norm of the target values the method's value optimisation finds on the
    unedited model for rewrites that are not being edited. `edit --nas ANCHOR` then rescales every edit's target to
    that norm (dropping an edit whose target is far above it), which keeps long sequential runs from collapsing.

    Example: prunecli anchor smollm2 --method rome --count 4 -o smollm2.rome.anchor.safetensors

    The file records the model's edited weight (a different model, layer or method is refused by edit), the
    hyper-parameters and the sampled records. Measure with the hyper-parameters you edit with: the layer must match.
    On a CPU each rewrite costs about what one batched edit's value optimisation does; the paper's 1000 are minutes
    on SmolLM2.
    """
    from prunecli.api.anchor import AnchorOptions, run_anchor

    options = AnchorOptions(model, output, method, hparams, tuple(set_ or ()), records, data_dir, count, seed, load,
                            force)
    with cli_progress() as progress:
        result = run_anchor(options, progress)
    summary = result.to_json()

    def render() -> None:
        out.say(f"wrote {output}: {summary['method']} layer {summary['layer']}, anchor {summary['anchor']:.4g} "
                f"(trimmed mean of {summary['n']} target norms without the {summary['trimmed']} largest; median "
                f"{summary['norm_median']:.4g}, max {summary['norm_max']:.4g}); edits whose target norm exceeds "
                f"{summary['drop_at']:g}x the anchor are dropped; {summary['seconds_per_record']:.2f} s per rewrite")

    out.result(summary, render)
