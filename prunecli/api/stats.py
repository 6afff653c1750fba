"""`prunecli stats` as a function: key second moments of the edited layers, one pass over a corpus."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunecli.core.atomic import check_output_path
from prunecli.distributed import SINGLE, Workers
from prunecli.editors import corpus as corpora
from prunecli.editors.registry import METHODS, STATS_METHODS, default_values
from prunecli.editors.stats import STATS_DTYPES, KeyStats, collect_key_stats
from prunecli.errors import PruneCliError
from prunecli.models.adapters import resolve_adapter
from prunecli.models.builtin import resolve_model_path
from prunecli.models.forward import max_context
from prunecli.models.loading import load_model
from prunecli.models.options import LoadOptions
from prunecli.progress import Progress, no_progress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StatsOptions:
    """What `prunecli stats` takes: MODEL -o OUTPUT, the layers (or a method whose layers to take), the corpus (a
    text file or a `datasets` source) and the budget."""

    model: str | Path
    output: str | Path
    layers: tuple[int, ...] | None = None
    method: str | None = None
    text: Path | None = None
    dataset: str | None = None
    subset: str | None = None
    split: str = "train"
    column: str | None = None
    tokens: int = 100_000
    batch_size: int = 8
    seq_len: int = 256
    accum_dtype: str = "float64"
    load: LoadOptions = field(default_factory=LoadOptions)
    force: bool = False


@dataclass(frozen=True)
class StatsResult:
    options: StatsOptions
    stats: KeyStats
    seconds: float

    def to_json(self) -> dict[str, Any]:
        s = self.stats
        return {"output": str(self.options.output), "model": s.source, "layers": sorted(s.layers),
                "modules": [v["module"] for _, v in sorted(s.layers.items())], "corpus": s.corpus,
                "tokens": s.tokens, "dtype": s.dtype, "seconds": self.seconds,
                "tokens_per_second": s.tokens / self.seconds if self.seconds > 0 else None}


def check_stats_options(o: StatsOptions) -> None:
    """What can be checked without the model, before it loads."""
    if (o.layers is None) == (o.method is None):
        raise PruneCliError("give exactly one of --layers and --method")
    if o.method is not None and o.method not in STATS_METHODS:
        what = "uses no key statistics" if o.method in METHODS else "is not an editing method"
        raise PruneCliError(f"{o.method} {what}; --method takes {', '.join(STATS_METHODS)}")
    if (o.text is None) == (o.dataset is None):
        raise PruneCliError("give exactly one of --text and --dataset")
    if o.accum_dtype not in STATS_DTYPES:
        raise PruneCliError(f"--accum-dtype must be one of {', '.join(STATS_DTYPES)}, got {o.accum_dtype!r}")
    if o.load.dtype.lower() == "float64":
        raise PruneCliError("--dtype is the model dtype (fp32, bf16, fp16), as in edit and evaluate; the dtype of the "
                            "accumulated sums is --accum-dtype (float64 by default)")


def collect_stats(options: StatsOptions, progress: Progress = no_progress,
                  workers: Workers = SINGLE) -> StatsResult | None:
    """Collect the statistics and write the file; in a parallel run every process takes a share of the batches and
    the main process writes (the others return None)."""
    o = options
    check_stats_options(o)
    local_dataset = o.dataset if o.dataset is not None and Path(o.dataset).exists() else None
    check_output_path(Path(o.output), o.force, is_dir=False, inputs=[
        ("model", resolve_model_path(str(o.model))), ("text file", o.text), ("dataset", local_dataset)])
    source = corpora.text_file(o.text) if o.text is not None else corpora.dataset(o.dataset, o.split, o.column,
                                                                                    o.subset)
    say = log.info if workers.is_main else (lambda message: None)  # rank 0 speaks for every process
    lm, tokenizer, base = load_model(o.model, o.load, device=workers.resolve_device(o.load.device))
    adapter = resolve_adapter(lm)
    layers = o.layers
    if layers is None:
        assert o.method is not None
        layers = tuple(default_values(o.method, adapter.family, adapter.num_layers)["layers"])
        say(f"layers {list(layers)} (default {o.method} layers for this {adapter.model_type} model of "
            f"{adapter.num_layers} layers)")
    limit = max_context(lm)
    length = min(o.seq_len, limit) if limit else o.seq_len
    if length < o.seq_len:
        say(f"--seq-len {o.seq_len} exceeds the model's {limit} positions; using {length}")
    chunks = corpora.token_chunks(tokenizer, source.texts, length, o.tokens)
    started = time.perf_counter()
    stats = collect_key_stats(lm, tokenizer, base, adapter, layers, chunks, source.description, o.batch_size,
                              STATS_DTYPES[o.accum_dtype], length, o.tokens, progress, workers)
    seconds = time.perf_counter() - started
    if not workers.is_main:
        return None
    stats.save(o.output, o.force)
    if stats.tokens < o.tokens:
        log.info(f"the corpus ran out after {stats.tokens:,} of the {o.tokens:,} requested tokens")
    return StatsResult(o, stats, seconds)
