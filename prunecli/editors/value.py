"""The target value: the shift of a hidden state at the subject's last token that makes the model say the new target.

One implementation for ROME (site = the edited projection's output, the MLP value) and MEMIT (site = the residual
stream after the last edited layer). A vector `delta` is added to the site's output at the subject's last token of
the edit prompt after every context prefix, and of the prompt "{subject} is a"; Adam minimises

    mean target NLL over the prefixed prompts
    + kl_factor * KL(original || shifted) of the next token after "{subject} is a"   (keeps the subject's essence)
    + v_weight_decay * |delta| / |v0|^2          (the published code's form, for which the defaults were tuned)

with |delta| clamped to clamp_norm_factor * |v0| after each step, where v0 is the site's original output on the bare
prompt. Only `delta` receives gradients; the model runs in its own dtype, `delta` and the loss are float32.

Speed: nothing before the subject's last token depends on `delta`, so those prefixes run once and are kept as a KV
cache; each step re-runs only the few tokens from the subject's last token on (about 5x fewer tokens per step on
CounterFact prompts with context prefixes; the same numbers as a full forward pass up to float rounding). The output
layer is applied only at the (row, position) pairs the loss reads: the decoder runs without its head, and the head
(plus Gemma-2's final soft-capping) is applied to those hidden states. With a 262k vocabulary (Gemma-3) the head is
the largest cost of a step, and `logits_to_keep` would compute it for every row at every kept position.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from prunecli.editors.hparams import HParams
from prunecli.editors.prompts import SubjectPrompt, encode_subject_prompt, request_prompts, right_pad
from prunecli.editors.tracing import shifted_output
from prunecli.errors import PruneCliError
from prunecli.models.forward import forward_keywords, returned_cache
from prunecli.models.logits import OutputHead, output_head
from prunecli.models.placement import input_device
from prunecli.models.tokens import pad_id
from prunecli.progress import ProgressTask
from prunecli.requests import EditRequest

KL_TEMPLATE = "{} is a"


@dataclass(frozen=True)
class ValueHParams(HParams):
    """What every editor that optimises a target value shares (ROME, MEMIT, AlphaEdit), with EasyEdit's key names;
    each method's class adds its own fields after these."""

    v_lr: float  # Adam learning rate of the value optimisation
    v_num_grad_steps: int
    v_stop_loss: float  # stop early once the mean target NLL is below this
    clamp_norm_factor: float  # |delta| <= clamp_norm_factor * |initial value|
    kl_factor: float  # weight of KL(original || edited) on the "{subject} is a" prompts
    v_weight_decay: float  # weight of |delta|^2 / |initial value|^2
    mom2_adjustment: bool  # ROME: u = C^-1 k* (needs statistics) instead of u = k*
    mom2_update_weight: float  # MEMIT: lambda in (lambda C + K K^T)^-1 (recorded, unused, by the others)
    context_template_length_params: tuple[tuple[int, int], ...]  # (generated tokens, number of prefixes)
    fact_token: str = "subject_last"

    def validate(self, num_layers: int) -> None:
        super().validate(num_layers)
        if self.fact_token != "subject_last":
            raise PruneCliError(f"fact_token {self.fact_token!r} is not supported (only subject_last)")
        self.require([("v_num_grad_steps", self.v_num_grad_steps >= 1), ("v_lr", self.v_lr > 0),
                      ("clamp_norm_factor", self.clamp_norm_factor > 0), ("kl_factor", self.kl_factor >= 0),
                      ("v_weight_decay", self.v_weight_decay >= 0),
                      ("mom2_update_weight", self.mom2_update_weight >= 0),
                      ("context_template_length_params",
                       all(n >= 0 and c >= 0 for n, c in self.context_template_length_params))])


@dataclass(frozen=True)
class ValueResult:
    delta: torch.Tensor  # [d] float32: the optimal shift of the site output
    initial: torch.Tensor  # [d] float32: the site output on the bare prompt before the shift (v0)
    loss: float  # mean target NLL with the final delta
    initial_loss: float  # mean target NLL with delta = 0
    steps: int  # Adam steps taken


@dataclass(frozen=True)
class _SplitBatch:
    """Prompts cut before the subject's last token: a fixed prefix (run once, kept as a KV cache) and a suffix that
    starts at the shifted position (re-run at every step)."""

    cache: Any  # transformers Cache of the prefixes, or None when every prefix is empty
    prefix_mask: torch.Tensor  # [B, T]
    suffix_ids: torch.Tensor  # [B, S]
    suffix_mask: torch.Tensor  # [B, S]
    position_ids: torch.Tensor  # [B, S]


@torch.no_grad()
def _split(model: torch.nn.Module, prompts: list[SubjectPrompt], cuts: list[int], pad: int, device: torch.device,
           trim_logits: bool) -> _SplitBatch:
    """Run the prefixes `ids[:cut]` once (a cut at the subject's last token at the latest: nothing before it depends
    on the shift, in any layer); the suffixes `ids[cut:end]` (end: before the last target token) are what each
    step runs.

    Prefixes are right-padded; their pads are masked out of the suffix pass. A row with an empty prefix gets one
    attended pad in the prefix pass only, so no attention row is fully masked (which could make its cache NaN).
    """
    lengths = torch.tensor(cuts, device=device)
    # A target's last token predicts nothing the loss reads: it is not run.
    ends = [p.n_prompt + max(len(p.target) - 1, 0) for p in prompts]
    suffix_ids, suffix_mask = right_pad([p.ids[cut:end] for p, cut, end in zip(prompts, cuts, ends)], pad, device)
    positions = lengths[:, None] + torch.arange(suffix_ids.shape[1], device=device)
    width = int(lengths.max())
    if width == 0:
        return _SplitBatch(None, torch.zeros(len(prompts), 0, dtype=torch.long, device=device), suffix_ids,
                           suffix_mask, positions)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for row, (p, cut) in enumerate(zip(prompts, cuts)):
        ids[row, :cut] = torch.tensor(p.ids[:cut], device=device)
        mask[row, :cut] = 1
    run_mask = mask.clone()
    run_mask[lengths == 0, 0] = 1
    keep_one = {"logits_to_keep": 1} if trim_logits else {}
    cache = returned_cache(model(input_ids=ids, attention_mask=run_mask, use_cache=True, **keep_one))
    return _SplitBatch(cache, mask, suffix_ids, suffix_mask, positions)


def _logits_at(model: torch.nn.Module, head: OutputHead | None, batch: _SplitBatch, rows: torch.Tensor,
               cols: torch.Tensor) -> torch.Tensor:
    """Logits [len(rows), vocab] of the suffixes at (rows[i], cols[i]), given the cached prefixes (the cache is
    copied: a forward pass appends to it)."""
    runner = model if head is None else head.decoder
    kwargs: dict[str, Any] = {}
    if batch.cache is not None:
        kwargs[forward_keywords(runner)[0]] = copy.deepcopy(batch.cache)
    mask = torch.cat([batch.prefix_mask, batch.suffix_mask], dim=1)
    out = runner(input_ids=batch.suffix_ids, attention_mask=mask, position_ids=batch.position_ids,
                 use_cache=batch.cache is not None, **kwargs)
    if head is None:
        return out.logits[rows, cols]
    hidden = out.last_hidden_state
    return head(hidden[rows.to(hidden.device), cols.to(hidden.device)])


def optimize_value(model: torch.nn.Module, tokenizer, site: torch.nn.Module, width: int,  # noqa: ANN001
                   request: EditRequest, prefixes: list[str], hp: ValueHParams,
                   prefix_cache: bool = True, task: ProgressTask | None = None) -> ValueResult:
    """Find the shift of `site`'s output (hidden width `width`) at the subject's last token that makes
    `request.target_new` likely. `prefixes[0]` must be "" (the bare prompt defines v0).

    `prefix_cache=False` re-runs whole prompts at every step (the naive way, kept as the benchmarks' baseline).
    `task` is told each step (progress within one edit: completed = step, total = planned steps, the target NLL)."""
    device = input_device(model)
    rewrites = request_prompts(tokenizer, request, prefixes, with_target=True)
    kl = encode_subject_prompt(tokenizer, "", KL_TEMPLATE, request.subject)
    prompts: list[SubjectPrompt] = [*rewrites, kl]

    # Positions below are in suffix coordinates (after the cut). Logits are needed only where a target token is
    # predicted and at the end of the KL prompt.
    cuts = [p.subject_index if prefix_cache else 0 for p in prompts]
    tgt_rows = torch.tensor([r for r, p in enumerate(rewrites) for _ in p.target], device=device)
    tgt_pos = [p.n_prompt - 1 - cut + j for p, cut in zip(rewrites, cuts) for j in range(len(p.target))]
    tgt_ids = torch.tensor([t for p in rewrites for t in p.target], device=device)
    kl_row, kl_pos = len(rewrites), kl.n_prompt - 1 - cuts[-1]
    # The loss reads the target rows' predicting positions, then the KL prompt's last one.
    rows_read = torch.cat([tgt_rows, torch.tensor([kl_row], device=device)])
    cols_read = torch.tensor([*tgt_pos, kl_pos], device=device)
    head = output_head(model)
    # Each prompt's NLL is the mean over its target tokens; the loss is the mean over prompts.
    token_weight = torch.tensor([1.0 / len(p.target) / len(rewrites) for p in rewrites for _ in p.target],
                                device=device)
    batch = _split(model, prompts, cuts, pad_id(tokenizer), device, forward_keywords(model)[1])
    rows = torch.arange(len(prompts), device=device)
    at_subject = torch.tensor([p.subject_index - cut for p, cut in zip(prompts, cuts)], device=device)

    delta = torch.zeros(width, device=device, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=hp.v_lr)
    original: dict[str, torch.Tensor] = {}
    kl_init: torch.Tensor | None = None
    losses: list[float] = []
    steps = 0
    for step in range(hp.v_num_grad_steps + 1):
        last = step == hp.v_num_grad_steps
        with torch.set_grad_enabled(not last), shifted_output(site, rows, at_subject, delta, original):
            logits = _logits_at(model, head, batch, rows_read, cols_read).float()
            logp = torch.log_softmax(logits[:-1], dim=-1)
            nll = -(logp.gather(1, tgt_ids[:, None])[:, 0] * token_weight).sum()
            kl_logp = torch.log_softmax(logits[-1], dim=-1)
        if kl_init is None:
            kl_init = kl_logp.detach()
        losses.append(float(nll.detach()))
        if task is not None:
            task.update(completed=step, total=hp.v_num_grad_steps, loss=f"target NLL {losses[-1]:.3f}")
        if last or losses[-1] < hp.v_stop_loss:
            break
        v0 = original["value"][0]
        kl_loss = torch.nn.functional.kl_div(kl_logp, kl_init, log_target=True, reduction="sum")
        # |delta| / |v0|^2 (not squared) as in the published ROME/MEMIT code, for which the defaults were tuned.
        loss = nll + hp.kl_factor * kl_loss + hp.v_weight_decay * delta.norm() / v0.norm() ** 2
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        steps += 1
        with torch.no_grad():
            max_norm = hp.clamp_norm_factor * v0.norm()
            if delta.norm() > max_norm:
                delta.mul_(max_norm / delta.norm())
    return ValueResult(delta.detach().clone(), original["value"][0].clone(), losses[-1], losses[0], steps)
