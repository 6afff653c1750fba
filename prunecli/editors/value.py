"""The target value: the shift of a hidden state at the subject's last token that makes the model say the new target.

One implementation for ROME (site = the edited projection's output, the MLP value) and MEMIT/AlphaEdit (site = the
residual stream after the last edited layer, or that layer's projection output where the block normalises it), for
one fact or a batch. For each fact a vector `delta` is added to the site's output at the subject's last token of the
edit prompt after every context prefix, and of the prompt "{subject} is a"; Adam minimises

    mean target NLL over the prefixed prompts
    + kl_factor * KL(original || shifted) of the next token after "{subject} is a"   (keeps the subject's essence)
    + v_weight_decay * |delta| / |v0|^2          (the published code's form, for which the defaults were tuned)

with |delta| clamped to clamp_norm_factor * |v0| after each step, where v0 is the site's original output on the bare
prompt. Only `delta` receives gradients; the model runs in its own dtype, `delta` and the loss are float32.

A batch: every fact's loss involves its own shift only, so the facts' losses are summed and optimised in the same
forward/backward passes at each step, each fact with its own Adam (`torch.optim.Adam` on its own [d] tensor: its own
moments and step count). A fact whose NLL falls below `v_stop_loss` stops there as it would alone: its gradient is
dropped (Adam then skips it, so its moments and step count stay as they were) and its prompts leave the following
passes.
Each fact thus gets the shift it would get optimised alone, up to float rounding. At most `value_batch_rows` prompts
are held at once (their caches and activations): a larger batch is optimised in groups of whole facts, one after
another, which gives the same results because the facts do not interact.

Speed, all without changing the numbers beyond float rounding:
- Nothing before the subject's last token depends on `delta`: those prefixes run once and are kept as a KV cache.
  They are padded on the left, so every real token keeps its distance to the others in cache coordinates (sliding
  window layers measure distance there) and its own position ids.
- Nothing below the site's decoder layer depends on `delta` either: the input of that layer at the remaining tokens is
  computed once, and every step runs only the layers from there on (`tracing.run_from_layer`).
- The prompts of one step are run in a few forward passes of similar lengths (`_chunks`), so little is padded.
- The output layer is applied only at the (row, position) pairs the loss reads: the decoder runs without its head, and
  the head (plus Gemma-2's final soft-capping) is applied to those hidden states. With a 262k vocabulary (Gemma-3) the
  head is the largest cost of a step, and `logits_to_keep` would compute it for every row at every kept position.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from prunecli.editors.hparams import HParams
from prunecli.editors.keys import KEY_AVERAGING
from prunecli.editors.prompts import SubjectPrompt, encode_subject_prompt, request_prompts, right_pad
from prunecli.editors.tracing import record, run_from_layer, shifted_output
from prunecli.errors import PruneCliError
from prunecli.models.adapters import ModelAdapter
from prunecli.models.forward import forward_keywords, returned_cache
from prunecli.models.logits import output_head
from prunecli.models.placement import input_device
from prunecli.models.tokens import pad_id
from prunecli.progress import ProgressTask
from prunecli.requests import EditRequest

KL_TEMPLATE = "{} is a"
# What one more forward pass per step costs on a CPU, in tokens run: each pass streams every weight once and pays the
# per-layer overhead (docs/METHODS.md). On an accelerator that fixed cost dwarfs the tokens of a whole group, so a
# group runs as one pass there.
_CPU_PASS_COST = 32


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
    # The most prompts (context prefixes + 1 per fact) whose value optimisation runs at once; a larger batch is
    # optimised in groups of whole facts. Speed and memory only, not results.
    value_batch_rows: int = 128
    # How keys are averaged over the prompts with context prefixes: "prompts" or "groups" (`keys.KEY_AVERAGING`).
    key_averaging: str = "prompts"

    def validate(self, num_layers: int) -> None:
        super().validate(num_layers)
        if self.key_averaging not in KEY_AVERAGING:
            raise PruneCliError(f"key_averaging must be one of {', '.join(KEY_AVERAGING)}, got {self.key_averaging!r}")
        if self.fact_token != "subject_last":
            raise PruneCliError(f"fact_token {self.fact_token!r} is not supported (only subject_last)")
        self.require([("v_num_grad_steps", self.v_num_grad_steps >= 1), ("v_lr", self.v_lr > 0),
                      ("value_batch_rows", self.value_batch_rows >= 1),
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
class _Row:
    """One prompt of one fact: the edit prompt after a context prefix (with the target), or the KL prompt."""

    fact: int  # the fact's index within its group
    prompt: SubjectPrompt
    weight: float  # weight of each of its target tokens' NLL in the fact's loss (0 for the KL prompt)
    bare: bool = False  # the edit prompt without a prefix (v0 is read there)

    @property
    def kl(self) -> bool:
        return not self.prompt.target

    @property
    def end(self) -> int:
        """Where the tokens a step runs end: a target's last token predicts nothing the loss reads."""
        return self.prompt.n_prompt + max(len(self.prompt.target) - 1, 0)

    @property
    def width(self) -> int:
        """Tokens each step runs: from the subject's last token (the shifted position) to `end`."""
        return self.end - self.prompt.subject_index

    @property
    def reads(self) -> list[int]:
        """Positions (after the cut at the subject's last token) whose logits the loss reads: those predicting a
        target token, or the last one of the KL prompt."""
        first = self.prompt.n_prompt - 1 - self.prompt.subject_index
        return [first + j for j in range(max(len(self.prompt.target), 1))]


def _fact_rows(tokenizer, fact: int, request: EditRequest, prefixes: list[str]) -> list[_Row]:  # noqa: ANN001
    """The edit prompt after each prefix (prefixes[0] == "": the bare prompt), then the KL prompt. Each prompt's NLL is
    the mean over its target tokens, and the fact's NLL the mean over its prompts."""
    rewrites = request_prompts(tokenizer, request, prefixes, with_target=True)
    kl = encode_subject_prompt(tokenizer, "", KL_TEMPLATE, request.subject)
    return [*(_Row(fact, p, 1.0 / len(p.target) / len(rewrites), i == 0) for i, p in enumerate(rewrites)),
            _Row(fact, kl, 0.0)]


def _chunks(rows: list[_Row], pass_cost: float) -> list[list[_Row]]:
    """The rows cut into forward passes of similar widths: each pass pads its rows to its widest, and the cut
    minimises the tokens run per step plus `pass_cost` per pass (an exact search over the cuts of the rows sorted by
    width; there are only a few widths)."""
    widths = sorted({r.width for r in rows})
    counts = [sum(r.width == w for r in rows) for w in widths]
    # cost[i]: the least cost of the rows of the first i widths; start[i]: where its last pass starts.
    cost: list[float] = [0.0]
    start = [0]
    for i in range(1, len(widths) + 1):  # the last pass holds widths[j:i], padded to widths[i - 1]
        options = {j: cost[j] + pass_cost + widths[i - 1] * sum(counts[j:i]) for j in range(i)}
        start.append(min(options, key=options.__getitem__))
        cost.append(options[start[-1]])
    cuts, i = [], len(widths)
    while i:
        cuts.append((widths[start[i]], widths[i - 1]))
        i = start[i]
    return [[r for r in rows if lo <= r.width <= hi] for lo, hi in reversed(cuts)]


@dataclass(frozen=True)
class _Chunk:
    """Prompts of one forward pass, cut before the subject's last token: the prefixes ran once (`cache`), and each
    step runs the tokens from the cut on, from the site's decoder layer up (its input there is `hidden`)."""

    rows: list[_Row]
    cache: Any  # transformers Cache of the left-padded prefixes, or None when every prefix is empty
    ids: torch.Tensor  # [B, S] the tokens from the cut on, right-padded
    mask: torch.Tensor  # [B, T + S] prefixes then those tokens
    positions: torch.Tensor  # [B, S]
    hidden: torch.Tensor  # [B, S, d] the input of the site's decoder layer at those tokens
    site: torch.Tensor  # [B, d] float32: the site's unshifted output at the cut

    def select(self, keep: list[int]) -> _Chunk:
        """The chunk without the rows not in `keep` (facts that stopped), trimmed to its widest remaining row."""
        index = torch.tensor(keep)  # on the CPU: it indexes tensors on any device (cache layers may be spread)
        width = max(self.rows[i].width for i in keep)
        cache = None
        if self.cache is not None:
            cache = copy.deepcopy(self.cache)
            cache.batch_select_indices(index)
        prefix = self.mask.shape[1] - self.ids.shape[1]
        return _Chunk([self.rows[i] for i in keep], cache, self.ids[index, :width], self.mask[index, :prefix + width],
                      self.positions[index, :width], self.hidden[index, :width], self.site[index])


@torch.no_grad()
def _prepare(runner: torch.nn.Module, adapter: ModelAdapter, layer: int, site: torch.nn.Module, rows: list[_Row],
             pad: int, device: torch.device, trim_logits: bool) -> _Chunk:
    """Run the rows' prefixes once (kept as a KV cache) and their remaining tokens up to the site's layer (its input
    there, and the site's unshifted output at the cut).

    The prefixes are padded on the left, as for batched generation: a pad attends to nothing and nothing attends to
    it, so what its cache slots hold is never read."""
    cuts = [r.prompt.subject_index for r in rows]
    span = max(cuts)
    ids = torch.full((len(rows), span), pad, dtype=torch.long, device=device)
    prefix_mask = torch.zeros_like(ids)
    for i, (r, cut) in enumerate(zip(rows, cuts)):
        ids[i, span - cut:] = torch.tensor(r.prompt.ids[:cut], device=device)
        prefix_mask[i, span - cut:] = 1
    lengths = torch.tensor(cuts, device=device)
    cache_kw = forward_keywords(runner)[0]
    cache = None
    if span:
        at = (torch.arange(span, device=device) - (span - lengths)[:, None]).clamp_min(0)  # pads: any position
        keep_one = {"logits_to_keep": 1} if trim_logits else {}
        cache = returned_cache(runner(input_ids=ids, attention_mask=prefix_mask, position_ids=at, use_cache=True,
                                      **keep_one))
    suffix, suffix_mask = right_pad([r.prompt.ids[cut:r.end] for r, cut in zip(rows, cuts)], pad, device)
    mask = torch.cat([prefix_mask, suffix_mask], 1)
    positions = lengths[:, None] + torch.arange(suffix.shape[1], device=device)
    seen = record(runner, {"hidden": (adapter.layer_module(layer), "input"), "site": (site, "output")},
                  input_ids=suffix, attention_mask=mask, position_ids=positions, use_cache=cache is not None,
                  **({cache_kw: copy.deepcopy(cache)} if cache is not None else {}))
    at_cut = seen["site"][:, 0].float().to(device)
    return _Chunk(rows, cache, suffix, mask, positions, seen["hidden"], at_cut)


@dataclass(frozen=True)
class _Reads:
    """What the loss reads of one step's logits, one entry per read (in the passes' order)."""

    owner: torch.Tensor  # [R] the fact
    target: torch.Tensor  # [R] bool: a target token's prediction (else the end of a KL prompt)
    tokens: torch.Tensor  # [target reads] the target token ids
    weight: torch.Tensor  # [target reads] their weights in their fact's NLL

    @staticmethod
    def of(chunks: list[_Chunk], device: torch.device) -> _Reads:
        rows = [r for c in chunks for r in c.rows for _ in r.reads]
        targets = [r for c in chunks for r in c.rows if not r.kl]
        return _Reads(torch.tensor([r.fact for r in rows], device=device),
                      torch.tensor([not r.kl for r in rows], device=device),
                      torch.tensor([t for r in targets for t in r.prompt.target], device=device),
                      torch.tensor([r.weight for r in targets for _ in r.prompt.target], device=device))

    def nll(self, logp: torch.Tensor, n: int) -> torch.Tensor:
        """Each fact's target NLL [n] (0 for a fact no longer read)."""
        token_nll = -logp[self.target].gather(1, self.tokens[:, None])[:, 0] * self.weight
        return torch.zeros(n, device=logp.device).index_add(0, self.owner[self.target], token_nll)

    def kl(self, logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The KL prompts' next-token log-probabilities and their facts."""
        return logp[~self.target], self.owner[~self.target]


class _Passes:
    """The forward passes of one group of facts: prepared once, then re-run at each step with the current shifts."""

    def __init__(self, model: torch.nn.Module, adapter: ModelAdapter, layer: int, site: torch.nn.Module,
                 rows: list[_Row], pad: int) -> None:
        self.device = input_device(model)
        self.head = output_head(model)
        self.runner = model if self.head is None else self.head.decoder
        self.adapter, self.layer, self.site = adapter, layer, site
        trim_logits = self.head is None and forward_keywords(model)[1]
        pass_cost = _CPU_PASS_COST if self.device.type == "cpu" else math.inf
        self.chunks = [_prepare(self.runner, adapter, layer, site, chunk, pad, self.device, trim_logits)
                       for chunk in _chunks(rows, pass_cost)]
        self.reads = _Reads.of(self.chunks, self.device)

    def initial(self, n: int) -> torch.Tensor:
        """v0 [n, d]: each fact's unshifted site output on its bare prompt."""
        return torch.stack([next(c.site[i] for c in self.chunks for i, r in enumerate(c.rows) if r.fact == f and r.bare)
                            for f in range(n)])

    def keep(self, facts: list[int]) -> None:
        """Drop the rows of every other fact from the following passes."""
        self.chunks = [c.select(keep) for c in self.chunks
                       if (keep := [i for i, r in enumerate(c.rows) if r.fact in facts])]
        self.reads = _Reads.of(self.chunks, self.device)

    def log_probs(self, delta: torch.Tensor) -> torch.Tensor:
        """Next-token log-probabilities [R, vocab] (float32) at every read, with `delta[f]` added to the site's output
        at the cut of each row of fact f."""
        return torch.log_softmax(torch.cat([self._logits(c, delta) for c in self.chunks]), dim=-1)

    def _logits(self, chunk: _Chunk, delta: torch.Tensor) -> torch.Tensor:
        kwargs: dict[str, Any] = {}
        if chunk.cache is not None:  # copied: a forward pass appends to it
            kwargs[forward_keywords(self.runner)[0]] = copy.deepcopy(chunk.cache)
        rows = torch.tensor([i for i, r in enumerate(chunk.rows) for _ in r.reads], device=self.device)
        cols = torch.tensor([c for r in chunk.rows for c in r.reads], device=self.device)
        each = torch.arange(len(chunk.rows), device=self.device)
        shift = delta[torch.tensor([r.fact for r in chunk.rows], device=self.device)]
        with run_from_layer(self.adapter.layers, self.layer, chunk.hidden), \
                shifted_output(self.site, each, torch.zeros_like(each), shift):
            out = self.runner(input_ids=chunk.ids, attention_mask=chunk.mask, position_ids=chunk.positions,
                              use_cache=chunk.cache is not None, **kwargs)
        if self.head is None:
            return out.logits[rows, cols].float()
        hidden = out.last_hidden_state
        return self.head(hidden[rows.to(hidden.device), cols.to(hidden.device)])


def _optimize_group(model: torch.nn.Module, adapter: ModelAdapter, layer: int, site: torch.nn.Module,
                    facts: list[list[_Row]], hp: ValueHParams, pad: int,
                    task: ProgressTask | None) -> list[ValueResult]:
    """Optimise the shifts of a group of facts together (`facts[i]`: the rows of fact i)."""
    passes = _Passes(model, adapter, layer, site, [r for fact in facts for r in fact], pad)
    device, n = passes.device, len(facts)
    v0 = passes.initial(n)
    v0_norm = v0.norm(dim=1)
    deltas = [torch.zeros(adapter.value_size(layer), device=device, requires_grad=True) for _ in range(n)]
    optimizer = torch.optim.Adam(deltas, lr=hp.v_lr)
    active = list(range(n))
    initial: list[float] = [0.0] * n
    final: list[float] = [0.0] * n
    steps = [0] * n
    kl_init: torch.Tensor | None = None
    for step in range(hp.v_num_grad_steps + 1):
        last = step == hp.v_num_grad_steps
        delta = torch.stack(deltas)
        with torch.set_grad_enabled(not last):
            logp = passes.log_probs(delta)
            nll = passes.reads.nll(logp, n)
            kl_logp, kl_owner = passes.reads.kl(logp)
        if kl_init is None:  # step 0: every fact's KL prompt is read
            kl_init = torch.zeros(n, logp.shape[1], device=device).index_copy(0, kl_owner, kl_logp.detach())
        losses = nll.detach().tolist()
        for f in active:
            initial[f] = losses[f] if step == 0 else initial[f]
            final[f] = losses[f]
        if task is not None:
            worst = max(losses[f] for f in active)
            task.update(completed=step, total=hp.v_num_grad_steps,
                        loss=f"target NLL {worst:.3f}" + (f" (worst of {len(active)})" if n > 1 else ""))
        stopped = [f for f in active if last or losses[f] < hp.v_stop_loss]
        active = [f for f in active if f not in stopped]
        if not active:
            break
        kl = torch.zeros(n, device=device).index_add(0, kl_owner, torch.nn.functional.kl_div(
            kl_logp, kl_init[kl_owner], log_target=True, reduction="none").sum(-1))
        # |delta| / |v0|^2 (not squared) as in the published ROME/MEMIT code, for which the defaults were tuned.
        decay = delta.norm(dim=1) / v0_norm ** 2
        loss = (nll + hp.kl_factor * kl + hp.v_weight_decay * decay)[torch.tensor(active, device=device)].sum()
        optimizer.zero_grad()
        loss.backward()
        for f in set(range(n)) - set(active):
            deltas[f].grad = None  # Adam skips a fact that stopped: its moments and step count stay as they were
        optimizer.step()
        with torch.no_grad():
            for f in active:
                steps[f] += 1
                max_norm = hp.clamp_norm_factor * v0_norm[f]
                if deltas[f].norm() > max_norm:
                    deltas[f].mul_(max_norm / deltas[f].norm())
        if stopped:
            passes.keep(active)
    return [ValueResult(d.detach().clone(), v0[f].clone(), final[f], initial[f], steps[f])
            for f, d in enumerate(deltas)]


def optimize_values(model: torch.nn.Module, tokenizer, adapter: ModelAdapter, layer: int,  # noqa: ANN001
                    site: torch.nn.Module, requests: Sequence[EditRequest], prefixes: list[str], hp: ValueHParams,
                    task: ProgressTask | None = None) -> list[ValueResult]:
    """For each request, the shift of `site`'s output at the subject's last token that makes `request.target_new`
    likely. `site` is decoder layer `layer` itself or one of its modules, with output width
    `adapter.value_size(layer)`; `prefixes[0]` must be "" (the bare prompt defines v0).

    The requests are optimised in groups of at most `hp.value_batch_rows` prompts (each has len(prefixes) + 1; at least
    one request per group). `task` is told each step (completed = step, total = planned steps, the worst target NLL
    still optimised)."""
    size = max(1, hp.value_batch_rows // (len(prefixes) + 1))
    results: list[ValueResult] = []
    for start in range(0, len(requests), size):
        facts = [_fact_rows(tokenizer, i, r, prefixes) for i, r in enumerate(requests[start:start + size])]
        results += _optimize_group(model, adapter, layer, site, facts, hp, pad_id(tokenizer), task)
    return results
