"""The keys of earlier edits, per edited layer, kept so that later batches can preserve those edits' outputs.

AlphaEdit always preserves them (its `cache_c`); MEMIT does when `prior_edit_weight` is set. Each layer's keys
K_p [rows, d_in] are read again on the edited model after all layers of a batch are written (the edits' keys as the
next batch will see them) and appended: one row per edit (the subject's last token, averaged over the context
prefixes) and, where `whole_prompts` is set (MEMIT), one row per token of each bare edit prompt as well: later
batches also undo earlier edits through those other tokens (docs/ARCHITECTURES.md, Gemma-3). They travel in the delta as
extra tensors `<prefix><weight name>` (see `core/delta.py`), so `edit --delta a -o b` preserves the same keys as one
run over all requests. Continuing a delta that lacks them (made by another method, or by `diff`) is refused: the
earlier edits could not be preserved.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from prunecli.editors.base import EditContext
from prunecli.editors.keys import prompt_token_keys, subject_keys
from prunecli.errors import PruneCliError
from prunecli.models.adapters import ModelAdapter
from prunecli.requests import EditRequest

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class KeyMemory:
    """Where one method keeps its edited keys in `EditContext.carried` (and so in delta files)."""

    prefix: str  # extra-tensor name prefix, e.g. "alphaedit.keys::"
    method: str  # the method that writes it
    what: str  # how the refusal names the missing cache, e.g. "AlphaEdit key cache"
    remedy: str  # what the user can do instead, appended to the refusal
    whole_prompts: bool = False  # also keep the key of every token of the bare edit prompts

    def name(self, adapter: ModelAdapter, layer: int) -> str:
        return self.prefix + adapter.weight_name(layer)

    def prepare(self, ctx: EditContext, adapter: ModelAdapter, layers: Sequence[int]) -> None:
        """Start an empty memory per layer, or refuse to continue previous deltas that carry none."""
        missing = [self.name(adapter, L) for L in layers if self.name(adapter, L) not in ctx.carried]
        if ctx.continues and missing:
            raise PruneCliError(f"the previous delta carries no {self.what} ({missing[0]}): it was not made by "
                                f"{self.method} on these layers (or lost its extra tensors), so the keys of its edits "
                                f"cannot be preserved; {self.remedy}")
        for layer in layers:
            ctx.carried.setdefault(self.name(adapter, layer), torch.zeros(0, adapter.key_size(layer)))

    def keys(self, ctx: EditContext, adapter: ModelAdapter, layer: int) -> torch.Tensor:
        """K_p [rows so far, d_in] of `layer`."""
        return ctx.carried[self.name(adapter, layer)]

    def remember(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, adapter: ModelAdapter,
                 requests: Sequence[EditRequest], ctx: EditContext, layers: Sequence[int]) -> None:
        """Append the batch's keys, read on the edited model (the subjects' averaged over the context prefixes, then
        with `whole_prompts` every bare prompt token's), to each layer's."""
        for layer in layers:
            keys, _ = subject_keys(model, tokenizer, adapter.projection(layer), requests, ctx.prefixes,
                                   weights=ctx.key_weights)
            if self.whole_prompts:
                keys = torch.cat([keys, prompt_token_keys(model, tokenizer, adapter.projection(layer), requests)])
            name = self.name(adapter, layer)
            ctx.carried[name] = torch.cat([ctx.carried[name], keys.float().cpu()])
