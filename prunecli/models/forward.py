"""What a transformers model's forward pass accepts and returns, across the versions prunecli supports.

transformers 5.x renamed the key/value cache argument and output `past_key_values` -> `cache` (the old name still
works there, with a deprecation warning per call site), and versions before 4.45 have no `logits_to_keep`. Every
caller asks here instead of guessing.
"""

from __future__ import annotations

import inspect
from typing import Any


def max_context(model: Any) -> int | None:
    """The model's context length from its config (None when the config does not say)."""
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def forward_keywords(model: Any) -> tuple[str, bool]:
    """(name of the key/value cache argument, whether `logits_to_keep` exists): transformers renamed
    `past_key_values` to `cache` in 5.x, and older versions have no `logits_to_keep`."""
    params = inspect.signature(model.forward).parameters
    return ("cache" if "cache" in params else "past_key_values"), "logits_to_keep" in params


def returned_cache(output: Any) -> Any:
    """The key/value cache a forward pass with use_cache=True returned."""
    return output["cache"] if "cache" in output else output["past_key_values"]
