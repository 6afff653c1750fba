"""Keys and hidden states at the subject's last token, averaged over context prefixes where the method says so.

ROME's k* and MEMIT's K are the inputs of the edited projection at the subject's last token, averaged over the edit
prompt preceded by each context prefix; MEMIT also reads the residual stream after its last edited layer on the bare
prompt. One batched forward pass (stopped after the deepest site) serves all of them. `prompt_token_keys` reads the
projection's input at every token of the bare prompts (what MEMIT preserves of earlier edits).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from prunecli.editors.prompts import SubjectPrompt, request_prompts, right_pad
from prunecli.editors.tracing import Kind, record
from prunecli.models.placement import input_device
from prunecli.models.tokens import pad_id
from prunecli.requests import EditRequest

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@torch.no_grad()
def read_at_subject(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[SubjectPrompt],
                    sites: Mapping[str, tuple[torch.nn.Module, Kind]], batch_size: int = 32,
                    every_token: bool = False) -> dict[str, torch.Tensor]:
    """Per site, the float32 hidden vectors at each prompt's subject position [len(prompts), d], or with
    `every_token` at every token of each prompt, in order [total prompt tokens, d]."""
    device = input_device(model)
    parts: dict[str, list[torch.Tensor]] = {key: [] for key in sites}
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        ids, mask = right_pad([p.ids[:p.n_prompt] for p in chunk], pad_id(tokenizer), device)
        seen = record(model, sites, input_ids=ids, attention_mask=mask)
        if every_token:
            at: tuple[torch.Tensor, ...] = (mask.bool(),)
        else:
            subjects = torch.tensor([p.subject_index for p in chunk], device=device)
            at = (torch.arange(len(chunk), device=device), subjects)
        for key in sites:
            parts[key].append(seen[key].to(device)[at].float())  # layers may sit on other GPUs
    return {key: torch.cat(v) for key, v in parts.items()}


KEY_AVERAGING = ("prompts", "groups")
"""How a key is averaged over the prompts with context prefixes: `prompts`, every prompt alike (prunecli's default,
and ROME's published code); `groups`, first within each group of prefixes of one length (the bare prompt is a group
of its own), then over the groups, as the published MEMIT/AlphaEdit `compute_ks` does. With the default
[[10, 5]] the bare prompt weighs 1/6 one way and 1/2 the other."""


def prefix_weights(length_params: Sequence[tuple[int, int]], averaging: str) -> list[float] | None:
    """Each prefix's weight in a key's average for `averaging` (None: a plain mean), in `generate_prefixes` order."""
    if averaging == "prompts":
        return None
    sizes = [1, *(count for n_tokens, count in length_params if n_tokens > 0 and count > 0)]
    return [1.0 / len(sizes) / size for size in sizes for _ in range(size)]


def subject_keys(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, projection: torch.nn.Module,
                 requests: Sequence[EditRequest], prefixes: Sequence[str],
                 extra_bare: Mapping[str, tuple[torch.nn.Module, Kind]] | None = None,
                 weights: Sequence[float] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Keys [n_requests, d_in] averaged over the prefixes (a plain mean, or with `weights`, one per prefix), and
    `extra_bare` sites read on the bare prompts.

    The first prefix is "" (the bare prompt), so extra sites are read from the same pass at no extra cost.
    """
    per_request = len(prefixes)
    prompts = [p for r in requests for p in request_prompts(tokenizer, r, prefixes, with_target=False)]
    sites: dict[str, tuple[torch.nn.Module, Kind]] = {"key": (projection, "input"), **(extra_bare or {})}
    seen = read_at_subject(model, tokenizer, prompts, sites)
    per_prompt = seen.pop("key").view(len(requests), per_request, -1)
    if weights is None:
        keys = per_prompt.mean(1)
    else:
        assert len(weights) == per_request, "one weight per prefix"
        keys = (per_prompt * torch.tensor(weights, device=per_prompt.device)[None, :, None]).sum(1)
    bare = {k: v.view(len(requests), per_request, -1)[:, 0] for k, v in seen.items()}
    return keys, bare


def prompt_token_keys(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, projection: torch.nn.Module,
                      requests: Sequence[EditRequest]) -> torch.Tensor:
    """The projection's inputs [total prompt tokens, d_in] (float32) at every token of each bare edit prompt."""
    prompts = [p for r in requests for p in request_prompts(tokenizer, r, [""], with_target=False)]
    return read_at_subject(model, tokenizer, prompts, {"key": (projection, "input")}, every_token=True)["key"]
