"""KV-cache plumbing across transformers versions: the argument and output were renamed `past_key_values` ->
`cache` in transformers 5.x (the old name still works there, with a deprecation warning per call site)."""

from __future__ import annotations

import inspect
from typing import Any

import torch


def cache_argument(model: torch.nn.Module) -> str:
    """The keyword the model's forward takes its KV cache under."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def returned_cache(output: Any) -> Any:
    """The KV cache a forward pass with use_cache=True returned."""
    return output["cache"] if "cache" in output else output["past_key_values"]
