"""Logits at chosen positions from the decoder's last hidden states, without the full [tokens, vocabulary] tensor.

A causal LM's forward pass returns fp32 logits for every position: tokens x vocabulary x 4 bytes, 4.3 GB for 4,096
tokens of a 262k-vocabulary model (Gemma-3). Scoring needs them only a few hundred positions at a time, so the
decoder runs once (its last hidden state captured by a hook) and the output layer is applied to chunks of positions.
The value optimisation of the editors uses the same split (decoder once, head only where its loss reads).
`OutputHead.check` compares the result with the model's own logits at the last position (asked for with
`logits_to_keep=1`, which costs one position), so an architecture whose output layer does more than we reproduce
(a scale we do not know of) is detected instead of silently mis-scored.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


class OutputHead:
    """A causal LM split into its decoder (`base_model`, ending in the final norm) and its output layer (lm_head,
    then Gemma-2/3's final logit soft-capping when the config sets it; computed in fp32)."""

    def __init__(self, model: Any, head: torch.nn.Module) -> None:
        self.decoder = model.base_model
        self.head = head
        self.softcap = getattr(model.config, "final_logit_softcapping", None)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def check(self, hidden_last: torch.Tensor, model_logits_last: torch.Tensor) -> bool:
        """Whether our logits at the last position equal the model's (fp32 rounding of a different kernel order)."""
        ours = self(hidden_last)
        ref = model_logits_last.float()
        return bool(torch.allclose(ours, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()) + 1e-6))


def output_head(model: Any) -> OutputHead | None:
    """The decoder/output-layer split of a transformers causal LM; None for a model without one (no output
    embeddings, or no base model distinct from the model): callers then use the model's full logits."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    decoder = getattr(model, "base_model", None)
    if not isinstance(head, torch.nn.Module) or decoder is None or decoder is model:
        return None
    return OutputHead(model, head)


@contextmanager
def capture_last_hidden(model: Any) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, every forward pass of `model` stores its decoder's last hidden state (after the final norm)
    under the key "hidden"."""
    store: dict[str, torch.Tensor] = {}

    def hook(_module: torch.nn.Module, _inputs: Any, output: Any) -> None:
        store["hidden"] = output[0] if isinstance(output, tuple) else output.last_hidden_state

    handle = model.base_model.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()
