"""Teacher-forced scoring of target continuations, batched: the one primitive editing metrics and editors share.

For each (prompt, target) pair the model reads prompt + target and we collect, at every target position, the token's
log-probability and whether it is the argmax. Sequences are right-padded (pads after the text, masked out), so a
causal model's scores do not depend on the batch they were computed in.

Tokenisation convention (used everywhere in prunecli): the prompt is encoded with the tokenizer's special tokens
(e.g. LLaMA's BOS), the target without them and with one leading space unless the prompt already ends in whitespace.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TargetScore:
    """Scores of one target after one prompt."""

    token_logprobs: list[float]
    token_correct: list[bool]  # target token is the argmax at its position

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
    return list(prompt_ids), list(target_ids)


def pad_id(tokenizer) -> int:  # noqa: ANN001
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if tid is not None:
            return int(tid)
    return 0


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
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        logprobs = torch.log_softmax(logits, dim=-1)
        for row, i in enumerate(idx):
            n_prompt, target = len(pairs[i][0]), pairs[i][1]
            pos = torch.arange(n_prompt - 1, n_prompt - 1 + len(target), device=logprobs.device)
            tgt = torch.tensor(target, device=logprobs.device)
            lp = logprobs[row, pos, tgt]
            correct = logprobs[row, pos].argmax(-1) == tgt
            results[i] = TargetScore(lp.tolist(), correct.tolist())
        if on_batch is not None:
            on_batch(len(idx))
    return [r for r in results if r is not None]
