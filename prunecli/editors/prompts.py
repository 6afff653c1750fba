"""Prompt plumbing shared by the editors: subject positions, context prefixes, padded batches.

Tokenisation follows `prunecli.models.tokens.encode_pair` (prompt with special tokens, target without and with a
leading space), so the loss an editor minimises is the quantity the evaluation measures.

ROME and MEMIT read and write the model at the *last token of the subject*. It is located with the tokenizer's
character offsets (robust when the subject's last characters merge with what follows, e.g. "Lyon?"), falling back to
tokenising the text up to the end of the subject for tokenizers without offsets.

Context prefixes ("{prefix}. {prompt}") make the edit hold in other contexts: ROME and MEMIT generate a few short
texts with the model itself. Here they come from a seeded top-k sampler run on the *unedited* base model, so a run
continued later with `--delta` sees exactly the prefixes of a single run over all requests.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from prunecli.models.forward import forward_keywords, returned_cache
from prunecli.models.placement import input_device
from prunecli.models.tokens import encode_pair
from prunecli.requests import EditRequest

_STARTERS = ("The", "Therefore", "Because", "I", "You")
_TOP_K = 5

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class SubjectPrompt:
    """A tokenised prompt (optionally followed by target tokens) and where the subject's last token is."""

    ids: list[int]
    subject_index: int
    n_prompt: int  # tokens of the prompt; ids[n_prompt:] are the target tokens
    target: tuple[int, ...] = ()


def _literal_before_subject(template: str) -> str:
    """The text of `template` (a str.format template with one `{}`) before the subject, braces unescaped."""
    for literal, field, _, _ in string.Formatter().parse(template):
        if field is not None:
            return literal
    raise ValueError(f"template {template!r} has no '{{}}' for the subject")


def subject_last_index(tokenizer: PreTrainedTokenizerBase, text: str, subject_end: int) -> int:
    """Index of the token holding character `subject_end - 1` of `text` (tokenised with special tokens)."""
    if getattr(tokenizer, "is_fast", False):
        offsets = tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
        hits = [i for i, (s, e) in enumerate(offsets) if e > s and s < subject_end]
        if hits:
            return hits[-1]
    return len(tokenizer(text[:subject_end])["input_ids"]) - 1


def encode_subject_prompt(tokenizer: PreTrainedTokenizerBase, prefix: str, template: str, subject: str,
                          target: str | None = None) -> SubjectPrompt:
    """Tokenise `prefix + template.format(subject)` (+ target), locating the subject's last token."""
    text = prefix + template.format(subject)
    subject_end = len(prefix) + len(_literal_before_subject(template)) + len(subject)
    index = subject_last_index(tokenizer, text, subject_end)
    if target is None:
        ids = list(tokenizer(text)["input_ids"])
        return SubjectPrompt(ids, index, len(ids))
    prompt_ids, target_ids = encode_pair(tokenizer, text, target)
    return SubjectPrompt(prompt_ids + target_ids, index, len(prompt_ids), tuple(target_ids))


def request_prompts(tokenizer: PreTrainedTokenizerBase, request: EditRequest, prefixes: Sequence[str],
                    with_target: bool) -> list[SubjectPrompt]:
    """The edit prompt after each context prefix (the first prefix is "", the bare prompt)."""
    target = request.target_new if with_target else None
    return [encode_subject_prompt(tokenizer, p, request.prompt, request.subject, target) for p in prefixes]


def right_pad(seqs: Sequence[Sequence[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), padded after the text: a causal model's real positions do not see the pads."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[row, : len(s)] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def generate_prefixes(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
                      length_params: Sequence[tuple[int, int]], seed: int = 0) -> list[str]:
    """[""] + for each (n_tokens, count): `count` texts of `n_tokens` sampled tokens (top-5), each ending in ". ".

    Deterministic for a given model and seed: sampling uses its own CPU generator, not the global RNG.
    """
    device = input_device(model)
    generator = torch.Generator().manual_seed(seed)
    cache_kw = forward_keywords(model)[0]
    prefixes = [""]
    for n_tokens, count in length_params:
        for s, starter in enumerate(_STARTERS):
            n = len(range(s, count, len(_STARTERS)))  # prefixes j = s, s+5, ... use this starter
            if n == 0 or n_tokens == 0:
                continue
            ids = torch.tensor([list(tokenizer(starter)["input_ids"])] * n, dtype=torch.long, device=device)
            out = model(input_ids=ids, use_cache=True)
            for i in range(n_tokens):
                logits = out.logits[:, -1].float().cpu()
                top = logits.topk(min(_TOP_K, logits.shape[-1]), dim=-1)
                pick = top.indices.gather(1, torch.multinomial(torch.softmax(top.values, -1), 1, generator=generator))
                ids = torch.cat([ids, pick.to(device)], dim=1)
                if i + 1 < n_tokens:
                    out = model(input_ids=ids[:, -1:], use_cache=True, **{cache_kw: returned_cache(out)})
            for row in ids.tolist():
                text = tokenizer.decode(row, skip_special_tokens=True)
                text = " ".join(text.replace("{", " ").replace("}", " ").split())
                prefixes.append(f"{text}. ")
    return prefixes
