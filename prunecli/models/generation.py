"""Batched greedy decoding with left padding, explicit attention masks and explicit position ids.

Prompts of a batch are left-padded so every row's next token is predicted at the same (last) column; pads are
masked out, and position ids count only real tokens (a left-padded row starts at position 0 at its first real
token), so a prompt decodes to the same text alone or in any batch. A key/value cache keeps each step one token.
Every prompt has its own budget of new tokens (a task's fixed budget, or an answer's length plus a margin): a row
that has spent its budget is done, exactly as if it had been decoded alone with that budget.

Shared by evaluation (general tasks, the generation protocol of edits) and editors (`edit --check generation`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from prunecli.models.forward import forward_keywords, max_context
from prunecli.models.placement import input_device
from prunecli.models.tokens import pad_id
from prunecli.progress import Advance


@dataclass(frozen=True)
class Generation:
    """A greedy continuation; `finite` is False when any step's logits had NaN/Inf (its argmax is meaningless)."""

    text: str
    token_ids: list[int]
    finite: bool


def stop_ids(model: Any, tokenizer: Any) -> set[int]:
    """End-of-sequence ids from the tokenizer and the model's generation config (which may list several)."""
    ids: set[int] = set()
    candidates: list[Any] = [tokenizer.eos_token_id]
    gen_cfg = getattr(model, "generation_config", None)
    if gen_cfg is not None:
        candidates.append(gen_cfg.eos_token_id)
    for c in candidates:
        if isinstance(c, int):
            ids.add(c)
        elif isinstance(c, (list, tuple)):
            ids.update(int(x) for x in c)
    return ids


@torch.no_grad()
def greedy_generate(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int | Sequence[int],
                    batch_size: int = 16, on_batch: Advance | None = None) -> list[Generation]:
    """Greedy continuations of each prompt, stopping at end-of-sequence or after `max_new_tokens` new tokens (one
    budget for all prompts, or one per prompt).

    A prompt longer than the model's context minus its budget keeps its last tokens (the question/instruction
    usually sits at the end).
    """
    budgets = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(budgets) != len(prompts) or any(b < 1 for b in budgets):
        raise ValueError("need one budget of at least 1 new token per prompt")
    device = input_device(model)
    cache_kw, can_trim = forward_keywords(model)
    last_only = {"logits_to_keep": 1} if can_trim else {}  # the prompt's other logits are vocabulary-sized waste
    stops = stop_ids(model, tokenizer)
    pid = pad_id(tokenizer)
    context = max_context(model)
    encoded = [list(tokenizer(p)["input_ids"]) for p in prompts]
    if context is not None:
        encoded = [ids[-max(1, context - b):] for ids, b in zip(encoded, budgets)]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    results: list[Generation | None] = [None] * len(encoded)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), pid, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, width - len(encoded[i]):] = torch.tensor(encoded[i])
            mask[row, width - len(encoded[i]):] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **last_only)
        next_pos = positions[:, -1:] + 1
        tokens: list[list[int]] = [[] for _ in idx]
        finite = [True] * len(idx)
        done = [False] * len(idx)
        while True:
            logits = out.logits[:, -1].float()
            ok = torch.isfinite(logits).all(-1).tolist()
            chosen = logits.argmax(-1)
            for row, tok in enumerate(chosen.tolist()):
                if done[row]:
                    continue
                finite[row] = finite[row] and ok[row]
                if tok in stops:
                    done[row] = True
                else:
                    tokens[row].append(tok)
                    done[row] = len(tokens[row]) >= budgets[idx[row]]
            if all(done):
                break
            # Finished rows keep decoding (their outputs are ignored) so the batch stays rectangular.
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = model(input_ids=chosen[:, None], attention_mask=mask, position_ids=next_pos, use_cache=True,
                        **{cache_kw: getattr(out, cache_kw)})
            next_pos = next_pos + 1
        for row, i in enumerate(idx):
            results[i] = Generation(tokenizer.decode(tokens[row], skip_special_tokens=True), tokens[row], finite[row])
        if on_batch is not None:
            on_batch(len(idx))
    return [r for r in results if r is not None]
