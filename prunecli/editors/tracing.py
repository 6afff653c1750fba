"""Forward hooks: read module inputs/outputs during a forward pass, or shift a module's output at chosen positions.

Decoder layers return a tensor in some transformers versions and a tuple whose first element is the hidden state in
others (and GPT-2 blocks differ from LLaMA layers); `_hidden` / `_with_hidden` handle both, so editors never depend
on the output format.

`record` stops the forward pass as soon as every requested site has been seen (by raising a private exception from
the last hook): statistics and keys of early layers then cost only the layers up to the deepest one, not the whole
model and its vocabulary projection.
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
def shifted_output(module: torch.nn.Module, rows: torch.Tensor, positions: torch.Tensor, shift: torch.Tensor,
                   original: dict[str, torch.Tensor] | None = None) -> Iterator[None]:
    """Within the block, add `shift` [d] to the module's output hidden state at (rows[i], positions[i]).

    The addition is out of place, so gradients flow to `shift`. When `original` is given, the first call stores the
    unshifted values at those positions under key "value" ([len(rows), d], detached, on `shift`'s device: the module
    may run on another GPU when a device map spreads the model).
    """

    def hook(module: torch.nn.Module, args: Any, out: Any) -> Any:
        h = _hidden(out)
        at = (rows.to(h.device), positions.to(h.device))
        if original is not None and "value" not in original:
            original["value"] = h[at].detach().float().to(shift.device)
        values = shift.to(h.device, h.dtype).expand(len(rows), -1)
        return _with_hidden(out, h.index_put(at, values, accumulate=True))

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
