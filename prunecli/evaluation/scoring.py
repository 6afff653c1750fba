"""Teacher-forced scoring of target continuations, batched: the one primitive editing metrics and editors share.

For each (prompt, target) pair the model reads prompt + target and we collect, at every target position, the token's
log-probability and whether it is the argmax. Sequences are right-padded (pads after the text, masked out), so a
causal model's scores do not depend on the batch they were computed in.

Tokenisation convention (used everywhere in prunecli): the prompt is encoded with the tokenizer's special tokens
(e.g. LLaMA's BOS), the target without them and with one leading space unless the prompt already ends in whitespace.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class TargetScore:
    """Scores of one target after one prompt."""

    token_logprobs: list[float]
    token_correct: list[bool]  # target token is the argmax at its position
    token_argmax: list[int] = field(default_factory=list)  # the model's top token at each target position

    @property
    def finite(self) -> bool:
        """False when any target log-probability is NaN/Inf (a collapsed or overflowing model): such a score must
        be counted, never silently averaged in or dropped."""
        return all(math.isfinite(x) for x in self.token_logprobs)

    @property
    def nll(self) -> float:
        """Mean token negative log-likelihood (the ROME/CounterFact protocol's quantity)."""
        return -sum(self.token_logprobs) / len(self.token_logprobs)

    @property
    def all_correct(self) -> bool:
        """Argmax protocol: every target token is the model's top prediction."""
        return all(self.token_correct)

    @property
    def token_accuracy(self) -> float:
        return sum(self.token_correct) / len(self.token_correct)


def encode_pair(tokenizer, prompt: str, target: str) -> tuple[list[int], list[int]]:  # noqa: ANN001 - HF tokenizer
    """Token ids of the prompt (with special tokens) and of the target (without, leading space added)."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    sep = "" if (not prompt or prompt[-1].isspace()) else " "
    target_ids = tokenizer(sep + target.strip(), add_special_tokens=False)["input_ids"]
    if not target_ids:
        raise ValueError(f"target {target!r} tokenizes to nothing")
    if not prompt_ids:
        raise ValueError(f"prompt {prompt!r} tokenizes to nothing (nothing to predict the target from)")
    return list(prompt_ids), list(target_ids)


def pad_id(tokenizer) -> int:  # noqa: ANN001
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if tid is not None:
            return int(tid)
    return 0


def max_context(model: Any) -> int | None:
    """The model's context length from its config (None when the config does not say)."""
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


@torch.no_grad()
def score_targets(model: torch.nn.Module, tokenizer, prompts: Sequence[str], targets: Sequence[str],  # noqa: ANN001
                  batch_size: int = 16, on_batch: Callable[[int], None] | None = None) -> list[TargetScore]:
    """Teacher-forced scores of targets[i] after prompts[i], computed in length-sorted right-padded batches."""
    if len(prompts) != len(targets):
        raise ValueError("prompts and targets differ in length")
    device = next(model.parameters()).device
    pairs = [encode_pair(tokenizer, p, t) for p, t in zip(prompts, targets)]
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    results: list[TargetScore | None] = [None] * len(pairs)
    pid = pad_id(tokenizer)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        seqs = [pairs[i][0] + pairs[i][1] for i in idx]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pid, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, s in enumerate(seqs):
            ids[row, : len(s)] = torch.tensor(s)
            mask[row, : len(s)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        for row, i in enumerate(idx):
            n_prompt, target = len(pairs[i][0]), pairs[i][1]
            # Only the target positions need a softmax (the full [batch, length, vocab] one costs more than the model).
            logprobs = torch.log_softmax(logits[row, n_prompt - 1:n_prompt - 1 + len(target)].float(), dim=-1)
            tgt = torch.tensor(target, device=logprobs.device)
            lp = logprobs.gather(1, tgt[:, None])[:, 0]
            top = logprobs.argmax(-1)
            correct = (top == tgt) & torch.isfinite(lp)  # NaN rows have an arbitrary argmax: never "correct"
            results[i] = TargetScore(lp.tolist(), correct.tolist(), top.tolist())
        if on_batch is not None:
            on_batch(len(idx))
    return [r for r in results if r is not None]
