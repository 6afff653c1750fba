"""A plain reference for the value optimisation (`prunecli.editors.value`): one fact, every prompt run alone and whole
at every step (no cache, no padding, no skipped layers, no batching), `torch.optim.Adam` on the shift. It is what the
published ROME/MEMIT code computes, written for clarity, and what the optimised implementation must reproduce."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prunecli.editors.prompts import SubjectPrompt, encode_subject_prompt, request_prompts
from prunecli.editors.tracing import record, shifted_output
from prunecli.editors.value import KL_TEMPLATE


@dataclass(frozen=True)
class Reference:
    deltas: list[torch.Tensor]  # the shift before each step (and after the last one)
    initial: torch.Tensor
    losses: list[float]  # the mean target NLL of each shift
    clamped: list[bool]  # whether each step's shift was clamped
    steps: int

    @property
    def delta(self) -> torch.Tensor:
        return self.deltas[-1]


def _logits(model, site, prompt: SubjectPrompt, delta: torch.Tensor) -> torch.Tensor:
    """Logits [tokens, vocab] of the whole prompt (and target), `delta` added at the subject's last token."""
    with shifted_output(site, torch.tensor([0]), torch.tensor([prompt.subject_index]), delta):
        return model(input_ids=torch.tensor([prompt.ids])).logits[0].float()


def reference_value(model, tokenizer, site, width: int, request, prefixes: list[str], hp) -> Reference:
    rewrites = request_prompts(tokenizer, request, prefixes, with_target=True)
    kl_prompt = encode_subject_prompt(tokenizer, "", KL_TEMPLATE, request.subject)
    bare = rewrites[0]
    with torch.no_grad():
        v0 = record(model, {"v": (site, "output")}, input_ids=torch.tensor([bare.ids]))["v"][0, bare.subject_index]
    v0 = v0.float()
    delta = torch.zeros(width, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=hp.v_lr)
    kl_init = None
    deltas, losses, clamped, steps = [], [], [], 0
    for step in range(hp.v_num_grad_steps + 1):
        nll = 0.0
        for p in rewrites:
            logp = torch.log_softmax(_logits(model, site, p, delta)[p.n_prompt - 1:len(p.ids) - 1], dim=-1)
            nll = nll - logp.gather(1, torch.tensor(p.target)[:, None]).mean() / len(rewrites)
        kl_logp = torch.log_softmax(_logits(model, site, kl_prompt, delta)[kl_prompt.n_prompt - 1], dim=-1)
        if kl_init is None:
            kl_init = kl_logp.detach()
        deltas.append(delta.detach().clone())
        losses.append(float(nll.detach()))
        if step == hp.v_num_grad_steps or losses[-1] < hp.v_stop_loss:
            break
        kl = (kl_init.exp() * (kl_init - kl_logp)).sum()
        loss = nll + hp.kl_factor * kl + hp.v_weight_decay * delta.norm() / v0.norm() ** 2
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        steps += 1
        with torch.no_grad():
            clamped.append(bool(delta.norm() > hp.clamp_norm_factor * v0.norm()))
            if clamped[-1]:
                delta.mul_(hp.clamp_norm_factor * v0.norm() / delta.norm())
    return Reference(deltas, v0, losses, clamped, steps)
