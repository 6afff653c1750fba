"""`prunecli stats`: key second moments of the edited layers, computed once and reused by every edit."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from prunecli.commands._display import cli_progress
from prunecli.commands._errors import guarded
from prunecli.commands._options import Force, Load, Model, Out, OutputFile, layer_list
from prunecli.commands._output import cell
from prunecli.editors.registry import STATS_METHODS


@guarded
def main(model: Model, output: OutputFile, out: Out, load: Load,
         layers: Annotated[str | None, typer.Option("--layers", help="Layers, e.g. 4,5,6 or 4-8.")] = None,
         method: Annotated[str | None, typer.Option(
             "--method", help=f"Take the layers from this method's default hyper-parameters for the model: "
             f"{', '.join(STATS_METHODS)}.")] = None,
         text: Annotated[Path | None, typer.Option("--text", help="Plain text file (paragraphs).")] = None,
         dataset: Annotated[str | None, typer.Option(
             "--dataset", help="`datasets` source: a local .json/.jsonl/.csv/.parquet/.txt file or folder, or a hub "
             "name (downloaded).")] = None,
         subset: Annotated[str | None, typer.Option("--subset", help="Dataset configuration name.")] = None,
         split: Annotated[str, typer.Option("--split", help="Dataset split.")] = "train",
         column: Annotated[str | None, typer.Option("--column", help="Dataset text column (default: text).")] = None,
         tokens: Annotated[int, typer.Option("--tokens", help="Token budget.", min=1)] = 100_000,
         batch_size: Annotated[int, typer.Option("--batch-size", help="Sequences per forward pass.", min=1)] = 8,
         seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per sequence.", min=2)] = 256,
         accum_dtype: Annotated[str, typer.Option("--accum-dtype", help="Dtype of the accumulated sums: float64 or "
                                                  "float32.")] = "float64",
         force: Force = False) -> None:
    """Collect uncentred second moments of the keys (inputs of the edited MLP projections) of several layers in one
    pass over a text corpus, with a token budget; the file records the model fingerprint, layers and corpus.

    Example: prunecli stats smollm2 --method rome --text "$PRUNECLI_DATA_DIR/wikitext/wiki.test.raw" --tokens 4000 -o smollm2.stats.safetensors

    Under `accelerate launch` (or torchrun) each process runs every N-th batch and the sums and counts are added
    over processes; rank 0 writes the file: accelerate launch --multi_gpu --num_processes 4 -m prunecli stats ...
    """  # noqa: E501 - an example is one line, as a user pastes it
    from prunecli.api.stats import StatsOptions, check_stats_options, collect_stats
    from prunecli.distributed import workers

    options = StatsOptions(model, output, layer_list(layers), method, text, dataset, subset, split, column, tokens,
                           batch_size, seq_len, accum_dtype, load, force)
    check_stats_options(options)
    with workers(load.device, load.device_map) as group, cli_progress() as progress:
        result = collect_stats(options, progress, group)
    if result is None:
        return  # rank 0 reports for every process
    stats = result.stats

    def render() -> None:
        out.table(cell(f"key statistics: {stats.corpus}"), ["layer", "module", "tokens", "dtype"],
                  [[str(layer), info["module"], f"{stats.counts[layer]:,}", stats.dtype]
                   for layer, info in sorted(stats.layers.items())], right=["tokens"])
        out.say(f"wrote {output} ({result.to_json()['tokens_per_second']:,.0f} tokens/s)")

    out.result(result.to_json(), render)
