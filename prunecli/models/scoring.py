"""Teacher-forced scoring of target continuations, batched: the one primitive editing metrics and editors share.

For each (prompt, target) pair the model reads prompt + target and we collect, at every target position, the token's
log-probability and whether it is the argmax. Pairs that share a prompt (CounterFact: the new and the true object)
read the prompt once: a batch of distinct prompts runs left-padded with a key/value cache, whose rows are then
repeated once per target of two or more tokens, and only those targets' tokens (all but the last) run a second,
right-padded pass (a one-token target is read off the prompt pass). Pads are masked and position ids count real
tokens only, so a score does not depend on the batch it was computed in; the
vocabulary projection is only computed where a target token is predicted.

Prompts and targets are tokenised by `models.tokens.encode_pair`, the convention every part of prunecli shares.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from prunecli.models.forward import forward_keywords
from prunecli.models.placement import input_device
from prunecli.models.tokens import encode_pair, pad_id

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


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


@torch.no_grad()
def score_targets(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                  targets: Sequence[str], batch_size: int = 16,
                  on_batch: Callable[[int], None] | None = None) -> list[TargetScore]:
    """Teacher-forced scores of targets[i] after prompts[i]; `batch_size` distinct prompts (with all their targets)
    per forward pass, prompts of similar length and longest target together."""
    if len(prompts) != len(targets):
        raise ValueError("prompts and targets differ in length")
    device = input_device(model)
    cache_kw, can_trim = forward_keywords(model)
    last_only = {"logits_to_keep": 1} if can_trim else {}
    pairs = [encode_pair(tokenizer, p, t) for p, t in zip(prompts, targets)]
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for i, (prompt_ids, _) in enumerate(pairs):
        by_prompt.setdefault(tuple(prompt_ids), []).append(i)
    # Prompts whose targets need the same continuation length batch together, shortest prompts first: the second
    # pass (a forward of the whole model for a few tokens) then runs for few batches, with little padding.
    distinct = sorted(by_prompt, key=lambda p: (max(len(pairs[i][1]) for i in by_prompt[p]), len(p)))
    results: list[TargetScore | None] = [None] * len(pairs)
    pid = pad_id(tokenizer)
    for start in range(0, len(distinct), batch_size):
        batch = distinct[start:start + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.full((len(batch), width), pid, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, p in enumerate(batch):
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **last_only)
        first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # predicts every target's first token
        rows = [(g, i) for g, p in enumerate(batch) for i in by_prompt[p]]
        longer = [(g, i) for g, i in rows if len(pairs[i][1]) > 1]
        later = _continuation_logits(model, out, cache_kw, mask, positions, [(g, pairs[i][1]) for g, i in longer],
                                     pid) if longer else None
        later_row = {i: r for r, (_, i) in enumerate(longer)}
        for g, i in rows:
            target = pairs[i][1]
            dists = first[g:g + 1]
            if len(target) > 1:
                assert later is not None
                dists = torch.cat([dists, torch.log_softmax(later[later_row[i], : len(target) - 1].float(), dim=-1)])
            tgt = torch.tensor(target, device=dists.device)
            lp = dists.gather(1, tgt[:, None])[:, 0]
            top = dists.argmax(-1)
            correct = (top == tgt) & torch.isfinite(lp)  # NaN rows have an arbitrary argmax: never "correct"
            results[i] = TargetScore(lp.tolist(), correct.tolist(), top.tolist())
        if on_batch is not None:
            on_batch(len(rows))
    return [r for r in results if r is not None]


def _continuation_logits(model: torch.nn.Module, out: Any, cache_kw: str, mask: torch.Tensor, positions: torch.Tensor,
                         rows: Sequence[tuple[int, list[int]]], pid: int) -> torch.Tensor:
    """Logits after each of rows' target tokens but the last ([rows, longest - 1, vocabulary]), fed right-padded
    after the cached prompt `g` of each (g, target) row. Only targets of two or more tokens are passed: a
    one-token target is scored from the prompt pass alone, and feeding it here would cost a padded row of the
    model and of the vocabulary projection for nothing."""
    cache = getattr(out, cache_kw, None)
    if cache is None:
        raise ValueError(f"{type(model).__name__} returned no key/value cache; cannot score targets")
    device = mask.device
    prompt_of = torch.tensor([g for g, _ in rows], device=device)
    cache.reorder_cache(prompt_of)
    rest = max(len(target) for _, target in rows) - 1
    tids = torch.full((len(rows), rest), pid, dtype=torch.long)
    tmask = torch.zeros((len(rows), rest), dtype=torch.long)
    for r, (_, target) in enumerate(rows):
        tids[r, : len(target) - 1] = torch.tensor(target[:-1], dtype=torch.long)
        tmask[r, : len(target) - 1] = 1
    full_mask = torch.cat([mask[prompt_of], tmask.to(device)], dim=1)
    tpos = positions[prompt_of, -1:] + 1 + torch.arange(rest, device=device)
    return model(input_ids=tids.to(device), attention_mask=full_mask, position_ids=tpos, use_cache=True,
                 **{cache_kw: cache}).logits
