"""The tokenisation convention every part of prunecli shares (editors, statistics, evaluation, MEND).

The prompt is encoded with the tokenizer's special tokens (e.g. LLaMA's BOS), the target without them and with one
leading space unless the prompt already ends in whitespace. Editing and scoring must tokenise the same way, or an
edit would be optimised for token ids that evaluation never reads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def encode_pair(tokenizer: PreTrainedTokenizerBase, prompt: str, target: str) -> tuple[list[int], list[int]]:
    """Token ids of the prompt (with special tokens) and of the target (without, leading space added)."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    sep = "" if (not prompt or prompt[-1].isspace()) else " "
    target_ids = tokenizer(sep + target.strip(), add_special_tokens=False)["input_ids"]
    if not target_ids:
        raise ValueError(f"target {target!r} tokenizes to nothing")
    if not prompt_ids:
        raise ValueError(f"prompt {prompt!r} tokenizes to nothing (nothing to predict the target from)")
    return list(prompt_ids), list(target_ids)


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id batches are padded with: the pad token, else EOS, else 0 (pads are always masked out)."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if tid is not None:
            return int(tid)
    return 0
