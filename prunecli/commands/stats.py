"""`prunecli stats`: key second moments of the edited layers, computed once and reused by every edit."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from prunecli.commands._common import (AllowPickleOpt, DebugOpt, DeviceMapOpt, DeviceOpt, ForceOpt, JsonOpt,
                                       MaxMemoryOpt, OffloadFolderOpt, TokenizerOpt, cell, emit_json, guarded, note,
                                       cli_progress)
from prunecli.errors import PruneCliError


def _parse_layers(text: str) -> list[int]:
    from prunecli.editors.hparams import coerce

    return list(coerce("layers", text))


def main(
    model: Annotated[str, typer.Argument(help="Model folder (or `smollm2`).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Statistics file to write (.safetensors).")],
    layers: Annotated[str | None, typer.Option("--layers", help="Layers, e.g. 4,5,6 or 4-8.")] = None,
    method: Annotated[str | None, typer.Option("--method", help="Take the layers from this method's default "
                                               "hyper-parameters for the model: rome, memit or alphaedit.")] = None,
    text: Annotated[Path | None, typer.Option("--text", help="Plain text file (paragraphs).")] = None,
    dataset: Annotated[str | None, typer.Option("--dataset", help="`datasets` source: a local .json/.jsonl/.csv/"
                                                ".parquet/.txt file or folder, or a hub name (downloaded).")] = None,
    subset: Annotated[str | None, typer.Option("--subset", help="Dataset configuration name.")] = None,
    split: Annotated[str, typer.Option("--split", help="Dataset split.")] = "train",
    column: Annotated[str | None, typer.Option("--column", help="Dataset text column (default: text).")] = None,
    tokens: Annotated[int, typer.Option("--tokens", help="Token budget.", min=1)] = 100_000,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Sequences per forward pass.", min=1)] = 8,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per sequence.", min=2)] = 256,
    model_dtype: Annotated[str, typer.Option("--dtype", "--model-dtype", help="Model dtype: fp32, bf16 or fp16 "
                                             "(as in edit and evaluate).")] = "fp32",
    dtype: Annotated[str, typer.Option("--accum-dtype", help="Dtype of the accumulated sums: float64 or float32.")]
    = "float64",
    device: DeviceOpt = "auto",
    device_map: DeviceMapOpt = None,
    max_memory: MaxMemoryOpt = None,
    offload_folder: OffloadFolderOpt = None,
    tokenizer_ref: TokenizerOpt = None,
    allow_pickle: AllowPickleOpt = False,
    json_out: JsonOpt = False,
    force: ForceOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Collect uncentred second moments of the keys (inputs of the edited MLP projections) of several layers in one
    pass over a text corpus, with a token budget; the file records the model fingerprint, layers and corpus.

    Example: prunecli stats smollm2 --method memit --text ../shared/data/wikitext/wiki.test.raw --tokens 50000
    -o smollm2-memit.stats.safetensors

    Under `accelerate launch` (or torchrun) each process runs every N-th batch and the sums and counts are added
    over processes; rank 0 writes the file.

    Example: accelerate launch --multi_gpu --num_processes 4 -m prunecli stats smollm2 --method memit --text wiki.txt
    --device auto -o smollm2-memit.stats.safetensors
    """

    def body() -> None:
        from prunecli.core.atomic import check_output_path
        from prunecli.models.default_model import resolve_model_path
        from prunecli.distributed import workers
        from prunecli.editors import corpus as corpora
        from prunecli.editors.hparams import METHODS as STATS_METHODS, default_values
        from prunecli.editors.registry import METHODS
        from prunecli.editors.stats import STATS_DTYPES, collect_key_stats
        from prunecli.models.adapters import resolve_adapter
        from prunecli.models.forward import max_context
        from prunecli.models.loading import load_model

        if (layers is None) == (method is None):
            raise PruneCliError("give exactly one of --layers and --method")
        if method in METHODS and method not in STATS_METHODS:
            raise PruneCliError(f"{method} uses no key statistics; --method takes {', '.join(STATS_METHODS)}")
        if (text is None) == (dataset is None):
            raise PruneCliError("give exactly one of --text and --dataset")
        if dtype not in STATS_DTYPES:
            raise PruneCliError(f"--accum-dtype must be one of {', '.join(STATS_DTYPES)}, got {dtype!r}")
        if model_dtype.lower() == "float64":
            raise PruneCliError("--dtype is the model dtype (fp32, bf16, fp16), as in edit and evaluate; the dtype of "
                                "the accumulated sums is --accum-dtype (float64 by default)")
        wanted = _parse_layers(layers) if layers is not None else None
        local_dataset = dataset if dataset is not None and Path(dataset).exists() else None
        check_output_path(output, force, is_dir=False, inputs=[
            ("model", resolve_model_path(model)), ("text file", text), ("dataset", local_dataset)])
        source = corpora.text_file(text) if text is not None else corpora.dataset(dataset, split, column, subset)
        with workers(device, device_map) as group:
            say = note if group.is_main else (lambda message: None)  # rank 0 speaks for every process
            lm, tokenizer, base = load_model(model, group.resolve_device(device), model_dtype, device_map=device_map,
                                             max_memory=max_memory, offload_folder=offload_folder,
                                             tokenizer=tokenizer_ref, allow_pickle=allow_pickle)
            adapter = resolve_adapter(lm)
            if wanted is None:
                assert method is not None
                wanted = list(default_values(method, adapter.family, adapter.num_layers)["layers"])
                say(f"layers {wanted} (default {method} layers for this {adapter.model_type} model of "
                    f"{adapter.num_layers} layers)")
            limit = max_context(lm)
            length = min(seq_len, limit) if limit else seq_len
            if length < seq_len:
                say(f"--seq-len {seq_len} exceeds the model's {limit} positions; using {length}")
            chunks = corpora.token_chunks(tokenizer, source.texts, length, tokens)
            started = time.perf_counter()
            with cli_progress() as progress:
                stats = collect_key_stats(lm, tokenizer, base, adapter, wanted, chunks, source.description,
                                          batch_size, STATS_DTYPES[dtype], length, tokens, progress, group)
            seconds = time.perf_counter() - started
            if not group.is_main:
                return
        stats.save(output, force)
        summary = {"output": str(output), "model": str(base.path), "layers": sorted(stats.layers),
                   "modules": [v["module"] for _, v in sorted(stats.layers.items())], "corpus": stats.corpus,
                   "tokens": stats.tokens, "dtype": stats.dtype, "seconds": seconds,
                   "tokens_per_second": stats.tokens / seconds if seconds > 0 else None}
        if stats.tokens < tokens:
            note(f"the corpus ran out after {stats.tokens:,} of the {tokens:,} requested tokens")
        if json_out:
            emit_json(summary)
        else:
            from rich.console import Console
            from rich.table import Table

            table = Table(title=cell(f"key statistics: {stats.corpus}"))
            for col in ("layer", "module", "tokens", "dtype"):
                table.add_column(col)
            for layer, info in sorted(stats.layers.items()):
                table.add_row(str(layer), cell(info["module"]), f"{stats.counts[layer]:,}", stats.dtype)
            Console().print(table)
            say(f"wrote {output} ({summary['tokens_per_second']:,.0f} tokens/s)")

    guarded(debug, body)
