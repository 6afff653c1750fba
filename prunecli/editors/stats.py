"""Key statistics: uncentred second moments C = E[k k^T] of the edited projections' inputs over a text corpus.

All requested layers are collected in ONE forward pass per batch (input hooks on every layer's projection), and the
pass stops right after the deepest of them, so statistics of early layers never pay for the rest of the model. Padding
is excluded by the attention mask; a token budget bounds the work. Each batch's k^T k is formed in float32 (the keys'
own precision) and accumulated in float64 (or float32 on request); the file stores the *sum* and the *count* (no
sum-vs-mean confusion: the moment is sum / count, computed by `KeyStats.moment`).

Data parallel (`accelerate launch`): every process reads the same token stream and runs the forward passes of every
W-th batch; the per-layer sums and counts are then added over processes, so the file equals a single process's up to
the order of float64 additions (the batches themselves are identical).

File: safetensors with `layer.{L}.sum` [d, d] and `layer.{L}.count` [1] (int64), plus JSON metadata under
`prunecli.stats`: format/version, model type and source, per layer the module, weight name and the fingerprint of the
weight (so statistics of another model or layer are refused), corpus description, token count, dtype, sequence length.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from prunecli.core.artifacts import STATS, read_artifact, write_artifact
from prunecli.core.checkpoint import Checkpoint
from prunecli.distributed import SINGLE, Workers
from prunecli.editors.prompts import right_pad
from prunecli.editors.tracing import Kind, record
from prunecli.errors import PruneCliError
from prunecli.models.adapters import ModelAdapter
from prunecli.models.placement import input_device
from prunecli.models.tokens import pad_id
from prunecli.progress import Advance, Progress, no_progress

STATS_DTYPES = {"float64": torch.float64, "float32": torch.float32}

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class KeyStats:
    """Sums of k k^T and token counts per layer, with what they were computed on."""

    sums: dict[int, torch.Tensor]
    counts: dict[int, int]
    layers: dict[int, dict[str, str]]  # layer -> {"module", "weight", "fingerprint"}
    corpus: str
    model_type: str | None = None
    source: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # seq_len, batch size, ...
    path: Path | None = field(default=None, compare=False)  # the file it was read from, for messages

    @property
    def tokens(self) -> int:
        return max(self.counts.values(), default=0)

    @property
    def dtype(self) -> str:
        return "float64" if next(iter(self.sums.values())).dtype == torch.float64 else "float32"

    def moment(self, layer: int) -> torch.Tensor:
        """C = sum / count in float64."""
        if layer not in self.sums:
            raise PruneCliError(f"statistics have no layer {layer} (they cover layers {sorted(self.sums)})")
        return self.sums[layer].double() / self.counts[layer]

    def metadata(self) -> dict[str, Any]:
        return {"model_type": self.model_type, "source": self.source,
                "layers": {str(k): v for k, v in sorted(self.layers.items())}, "corpus": self.corpus,
                "tokens": self.tokens, "dtype": self.dtype, **self.extra}

    def save(self, path: str | os.PathLike[str], force: bool = False) -> None:
        tensors: dict[str, torch.Tensor] = {}
        for layer in sorted(self.sums):
            tensors[f"layer.{layer}.sum"] = self.sums[layer].contiguous()
            tensors[f"layer.{layer}.count"] = torch.tensor([self.counts[layer]], dtype=torch.int64)
        write_artifact(path, STATS, self.metadata(), tensors, force)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> KeyStats:
        path = Path(path)
        meta, tensors = read_artifact(path, STATS)
        layers = {int(k): v for k, v in (meta.get("layers") or {}).items()}
        sums, counts = {}, {}
        for layer in layers:
            s, c = tensors.get(f"layer.{layer}.sum"), tensors.get(f"layer.{layer}.count")
            if s is None or c is None or s.ndim != 2 or s.shape[0] != s.shape[1] or int(c.reshape(-1)[0]) <= 0:
                raise PruneCliError(f"{path}: layer {layer} is missing or malformed")
            sums[layer], counts[layer] = s, int(c.reshape(-1)[0])
        known = {"format", "version", "model_type", "source", "layers", "corpus", "tokens", "dtype"}
        return cls(sums, counts, layers, str(meta.get("corpus")), meta.get("model_type"), meta.get("source"),
                   {k: v for k, v in meta.items() if k not in known}, path)


def load_moments(stats: KeyStats, base: Checkpoint, adapter: ModelAdapter,
                 layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """C per edited layer from loaded statistics (read once: a MEMIT file of GPT-2 XL is 1.6 GB), refusing
    statistics of another model or another layer."""
    path = stats.path or "(in memory)"
    moments = {}
    for layer in layers:
        if layer not in stats.layers:
            raise PruneCliError(f"statistics {path} cover layers {sorted(stats.layers)}, not layer {layer}; "
                                f"compute them with: prunecli stats MODEL --layers "
                                f"{','.join(str(x) for x in layers)} ...")
        weight = adapter.weight_name(layer)
        if stats.layers[layer].get("fingerprint") != base.fingerprint(weight):
            raise PruneCliError(f"statistics {path} were computed on another model: layer {layer}'s weight {weight} "
                                f"differs from the one in {base.path}")
        size = adapter.key_size(layer)
        if tuple(stats.sums[layer].shape) != (size, size):
            raise PruneCliError(f"statistics {path}: layer {layer} is {list(stats.sums[layer].shape)}, keys have "
                                f"{size}")
        moments[layer] = stats.moment(layer)
    return moments


@torch.no_grad()
def accumulate(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, adapter: ModelAdapter, layers: Sequence[int],
               chunks: Iterable[list[int]], batch_size: int = 8, dtype: torch.dtype = torch.float64,
               on_batch: Advance | None = None,
               workers: Workers = SINGLE) -> tuple[dict[int, torch.Tensor], dict[int, int]]:
    """Sum of k k^T and token count per layer over the chunks (one forward pass per batch, padding excluded); in a
    parallel run each process takes every W-th batch and the sums and counts are added over processes."""
    device = input_device(model)
    sites: dict[str, tuple[torch.nn.Module, Kind]] = {str(L): (adapter.projection(L), "input") for L in layers}
    sums = {L: torch.zeros(adapter.key_size(L), adapter.key_size(L), dtype=dtype, device=device) for L in layers}
    counts = dict.fromkeys(layers, 0)

    def flush(batch: list[list[int]]) -> None:
        ids, mask = right_pad(batch, pad_id(tokenizer), device)
        seen = record(model, sites, input_ids=ids, attention_mask=mask)
        real = mask.bool()
        for L in layers:
            keys = seen[str(L)].to(device)[real].float()  # [tokens, d]; pads dropped
            sums[L] += (keys.T @ keys).to(dtype)
            counts[L] += keys.shape[0]
        if on_batch is not None:
            on_batch(int(real.sum()))

    batch: list[list[int]] = []
    index = 0
    for chunk in chunks:
        batch.append(chunk)
        if len(batch) == batch_size:
            if workers.owns(index):
                flush(batch)
            batch, index = [], index + 1
    if batch and workers.owns(index):
        flush(batch)
    if workers.parallel:
        totals = workers.sum([*(sums[L] for L in layers), torch.tensor([counts[L] for L in layers])])
        sums = dict(zip(layers, totals[:-1]))
        counts = dict(zip(layers, (int(c) for c in totals[-1])))
    if not any(counts.values()):
        raise PruneCliError("the corpus yielded no tokens")
    return {L: s.cpu() for L, s in sums.items()}, counts


def collect_key_stats(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, base: Checkpoint,
                      adapter: ModelAdapter, layers: Sequence[int], chunks: Iterable[list[int]], corpus: str,
                      batch_size: int = 8,
                      dtype: torch.dtype = torch.float64, seq_len: int | None = None,
                      tokens: int | None = None, progress: Progress = no_progress,
                      workers: Workers = SINGLE) -> KeyStats:
    """Statistics of `layers` over the chunks, tied to the base checkpoint by the edited weights' fingerprints (in a
    parallel run: over all processes' batches, the same on every process). `tokens`, the chunks' token budget, is
    the progress total."""
    layers = sorted(set(layers))
    for L in layers:
        adapter.check_layer(L)
    with workers.progress(progress)("key statistics (tokens)", tokens) as task:
        sums, counts = accumulate(model, tokenizer, adapter, layers, chunks, batch_size, dtype, task.advance, workers)
    described = {L: {"module": adapter.module_name(L), "weight": adapter.weight_name(L),
                     "fingerprint": base.fingerprint(adapter.weight_name(L))} for L in layers}
    return KeyStats(sums, counts, described, corpus, base.model_type, str(base.path),
                    {"seq_len": seq_len, "batch_size": batch_size})
