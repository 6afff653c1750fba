"""Forward hooks: read module inputs/outputs during a forward pass, or shift a module's output at chosen positions.

Decoder layers return a tensor in some transformers versions and a tuple whose first element is the hidden state in
others (and GPT-2 blocks differ from LLaMA layers); `_hidden` / `_with_hidden` handle both, so editors never depend
on the output format.

`record` stops the forward pass as soon as every requested site has been seen (by raising a private exception from
the last hook): statistics and keys of early layers then cost only the layers up to the deepest one, not the whole
model and its vocabulary projection. `run_from_layer` is the converse: a forward pass that starts at a given layer
from a hidden state recorded before (the value optimisation re-runs only the layers above what it shifts).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import torch

Kind = Literal["input", "output"]


class _AllRecorded(Exception):
    """Raised inside a hook to end a forward pass whose remaining layers nobody needs."""


def _hidden(value: Any) -> torch.Tensor:
    return value[0] if isinstance(value, (tuple, list)) else value


def _with_hidden(value: Any, hidden: torch.Tensor) -> Any:
    if isinstance(value, tuple):
        return (hidden, *value[1:])
    if isinstance(value, list):
        return [hidden, *value[1:]]
    return hidden


def record(model: torch.nn.Module, sites: Mapping[str, tuple[torch.nn.Module, Kind]], stop_early: bool = True,
           **inputs: Any) -> dict[str, torch.Tensor]:
    """Run `model(**inputs)` and return the input or output hidden tensor of each named site (detached)."""
    seen: dict[str, torch.Tensor] = {}
    handles = []

    def store(key: str, value: Any) -> None:
        seen[key] = _hidden(value).detach()
        if stop_early and len(seen) == len(sites):
            raise _AllRecorded

    for key, (module, kind) in sites.items():
        if kind == "input":
            handles.append(module.register_forward_pre_hook(lambda m, args, key=key: store(key, args)))
        else:
            handles.append(module.register_forward_hook(lambda m, args, out, key=key: store(key, out)))
    try:
        model(**inputs)
    except _AllRecorded:
        pass
    finally:
        for h in handles:
            h.remove()
    missing = sorted(set(sites) - set(seen))
    if missing:
        raise RuntimeError(f"forward pass never reached site(s) {missing}")
    return seen


@contextlib.contextmanager
def shifted_output(module: torch.nn.Module, rows: torch.Tensor, positions: torch.Tensor,
                   shift: torch.Tensor) -> Iterator[None]:
    """Within the block, add `shift` ([d], or [len(rows), d]: one per row) to the module's output hidden state at
    (rows[i], positions[i]). The addition is out of place, so gradients flow to `shift`."""

    def hook(module: torch.nn.Module, args: Any, out: Any) -> Any:
        h = _hidden(out)
        at = (rows.to(h.device), positions.to(h.device))
        values = shift.to(h.device, h.dtype).expand(len(rows), -1)
        return _with_hidden(out, h.index_put(at, values, accumulate=True))

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class _Skipped(torch.nn.Module):
    """Stands in for a decoder layer that need not run: passes its input hidden state on."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


@contextlib.contextmanager
def run_from_layer(layers: torch.nn.ModuleList, start: int, hidden: torch.Tensor) -> Iterator[None]:
    """Within the block, forward passes do not run `layers[:start]` and give `layers[start]` the input `hidden`
    instead: the caller computed it once (with `record`) for the same inputs.

    The model's own forward still prepares everything the layers from `start` on need (position embeddings, rotary
    tables, the attention masks of every layer type, the cache's bookkeeping), so this holds for every architecture
    whose decoder loop feeds each layer's output to the next. What the skipped layers return is discarded (the hook
    replaces whatever reaches `layers[start]`), so their output format does not matter; they leave their cache
    entries alone.
    """
    saved = [layers[i] for i in range(start)]
    skipped = _Skipped()
    for i in range(start):
        layers[i] = skipped
    handle = layers[start].register_forward_pre_hook(lambda module, args: (hidden, *args[1:]))
    try:
        yield
    finally:
        handle.remove()
        for i, layer in enumerate(saved):
            layers[i] = layer
