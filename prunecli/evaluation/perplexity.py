"""Perplexity of held-out text with a sliding window: the general-ability number that moves first after edits.

The text is tokenised once (special tokens as the tokenizer adds them, e.g. LLaMA's BOS at the very start; with a
token budget only as much of it as the budget needs, `leading_ids`). Windows
of `window` tokens start every `stride` tokens; each token after the first is scored exactly once, in the first
window that reaches it, so every scored token beyond the first window sees at least `window - stride` tokens of
context. perplexity = exp(total NLL / scored tokens). Its per-record outcomes are the windows (each window's mean NLL
and scored tokens), the blocks its bootstrap interval resamples (`evaluation.uncertainty`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from prunecli.core.textio import read_text
from prunecli.distributed import SINGLE, Workers
from prunecli.errors import PruneCliError
from prunecli.evaluation.base import MetricGroup, RecordSet, TaskOutcome
from prunecli.evaluation.metrics import MetricValue
from prunecli.evaluation.uncertainty import PERPLEXITY, Outcomes
from prunecli.models.forward import forward_keywords, max_context
from prunecli.models.logits import OutputHead, capture_last_hidden, output_head
from prunecli.models.placement import input_device
from prunecli.progress import Advance, Progress, no_progress

GROUP = "perplexity"
TOKENS_PER_BATCH = 4096
"""Windows are batched up to this many tokens (the decoder's activations; logits are chunked separately)."""
LOGIT_BYTES = 256 * 2**20
"""Memory for the logits of one chunk of positions: 256 MiB is ~85 positions of a 262k vocabulary, ~450 of 49k."""


@dataclass(frozen=True)
class Window:
    begin: int  # first token fed to the model
    end: int  # one past the last token fed
    first_scored: int  # first token whose NLL this window contributes (>= begin + 1)


def sliding_windows(n_tokens: int, window: int, stride: int) -> list[Window]:
    """Windows covering tokens 1..n-1 exactly once (token 0 has no context and is never scored).

    Windows must overlap (stride < window): a window's first token has no context inside it, so with
    stride == window the token at every window boundary would never be scored.
    """
    if window < 2 or not 1 <= stride < window:
        raise PruneCliError(f"perplexity needs window >= 2 and 1 <= stride < window (got window {window}, "
                            f"stride {stride})")
    out: list[Window] = []
    begin, scored_to = 0, 1
    while scored_to < n_tokens:
        end = min(begin + window, n_tokens)
        out.append(Window(begin, end, max(scored_to, begin + 1)))
        scored_to = end
        begin += stride
    return out


def leading_ids(tokenizer: Any, text: str, limit: int | None) -> list[int]:
    """The first `limit` token ids of `text` (all of them for None), as tokenising the whole text gives them.

    A budget of a few thousand tokens needs a few percent of WikiText's test file, and tokenising all of it costs
    about a second per evaluation. So prefixes ending at a line break are tokenised, each twice as long as the last,
    until two successive ones both reach past `limit` and agree on their first `limit` ids: tokenizers split text
    at line breaks before merging (BPE pre-tokenisation, SentencePiece pieces), so more text does not change the
    ids of what comes before; the agreement checks that this holds for the tokenizer at hand. Without a line break
    past the current prefix the whole text is tokenised.
    """
    if limit is None:
        return list(tokenizer(text)["input_ids"])
    chars, previous = 8 * limit, None  # English text has about 4 characters per token
    while (cut := text.find("\n", chars)) >= 0:
        ids = list(tokenizer(text[:cut + 1])["input_ids"])
        if previous is not None and len(previous) > limit and ids[:limit] == previous[:limit]:
            return ids[:limit]
        previous, chars = ids, 2 * (cut + 1)
    return list(tokenizer(text)["input_ids"])[:limit]


@torch.no_grad()
def window_nlls(model: Any, ids: list[int], windows: list[Window], batch_size: int,
                on_batch: Advance | None = None) -> list[torch.Tensor]:
    """Per window, the NLLs of the tokens it scores (float64, CPU), windows batched right-padded with attention
    masks. The output layer runs on `LOGIT_BYTES`-sized chunks of positions (`prunecli.models.logits`), so peak
    memory is the model plus one chunk, whatever the vocabulary; models whose forward has no `logits_to_keep`, or
    whose logits we cannot reproduce, are scored from their full logits instead."""
    device = input_device(model)
    tokens = torch.tensor(ids)
    head = output_head(model) if forward_keywords(model)[1] else None
    chunked = head is not None
    checked = False
    out: list[torch.Tensor] = []
    width = max(w.end - w.begin for w in windows)
    rows = max(1, min(batch_size, TOKENS_PER_BATCH // width))
    for start in range(0, len(windows), rows):
        chunk = windows[start:start + rows]
        inp = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, w in enumerate(chunk):
            inp[r, : w.end - w.begin] = tokens[w.begin:w.end]
            mask[r, : w.end - w.begin] = 1
        inputs = {"input_ids": inp.to(device), "attention_mask": mask.to(device)}
        if chunked and head is not None:
            with capture_last_hidden(model) as store:
                last = model(**inputs, logits_to_keep=1).logits
            hidden = store["hidden"]
            if not checked:  # once per call: the output layer is the same for every batch
                checked = True
                chunked = head.check(hidden[:, -1], last[:, -1])
        if not chunked:
            logits = model(**inputs).logits
        for r, w in enumerate(chunk):
            pos = slice(w.first_scored - 1 - w.begin, w.end - 1 - w.begin)
            target = tokens[w.first_scored:w.end]
            if chunked and head is not None:
                out.append(_chunked_nll(head, hidden[r, pos], target))
            else:
                logprobs = torch.log_softmax(logits[r, pos].double(), dim=-1)
                out.append(-logprobs.gather(1, target[:, None].to(logprobs.device))[:, 0].cpu())
        if on_batch is not None:
            on_batch(len(chunk))
    return out


def _chunked_nll(head: OutputHead, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """NLL of `target` [n] from hidden states [n, d], the output layer applied to a few positions at a time."""
    step = max(1, LOGIT_BYTES // (12 * head.head.weight.shape[0]))  # fp32 logits + their float64 log-softmax
    parts = []
    for i in range(0, len(target), step):
        logprobs = torch.log_softmax(head(hidden[i:i + step]).double(), dim=-1)
        parts.append(-logprobs.gather(1, target[i:i + step, None].to(logprobs.device))[:, 0].cpu())
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def evaluate_perplexity(model: Any, tokenizer: Any, path: Path, window: int | None = None, stride: int | None = None,
                        max_tokens: int | None = None, batch_size: int = 16,
                        progress: Progress = no_progress, workers: Workers = SINGLE) -> TaskOutcome:
    """Perplexity of the text file `path` (see the module docstring); defaults: window min(1024, context), stride
    window // 2, the whole file. In a parallel run each process scores its share of the windows."""
    if not path.is_file():
        raise PruneCliError(f"perplexity: text file {path} does not exist")
    text = read_text(path, "perplexity text file")
    ids = leading_ids(tokenizer, text, max_tokens)
    if len(ids) < 2:
        raise PruneCliError(f"perplexity: {path} has fewer than 2 tokens")
    limit = max_context(model)
    window = window or min(1024, limit or 1024)
    if limit is not None and window > limit:
        raise PruneCliError(f"perplexity window {window} exceeds the model's context of {limit} tokens")
    stride = stride or window // 2
    windows = sliding_windows(len(ids), window, stride)
    with progress("perplexity (windows)", len(windows)) as bar:
        per_window = workers.map(lambda part: window_nlls(model, ids, part, batch_size, bar.advance), windows)
    nll = torch.cat(per_window)
    bad = int((~torch.isfinite(nll)).sum())
    ppl = math.exp(float(nll.sum()) / len(nll)) if not bad else math.nan
    outcomes = None if bad else Outcomes(PERPLEXITY, [float(w.mean()) for w in per_window],
                                         [float(len(w)) for w in per_window])
    records = RecordSet.of(range(len(windows)), {"tokens": ids,
                                                  "windows": [[w.begin, w.end, w.first_scored] for w in windows]})
    budget = f"the first {len(ids)} tokens" if max_tokens is not None else f"all {len(ids)} tokens"
    protocol = (f"perplexity = exp(mean token NLL) over {len(nll)} scored tokens ({budget} of {path.name}, tokenised "
                f"once, special tokens as the tokenizer adds them); sliding window of {window} tokens with stride "
                f"{stride}: every "
                f"token after the first is scored once, with >= {window - stride} tokens of context after the first "
                "window. Any NaN/Inf token NLL makes the perplexity NaN (n_nonfinite counts such tokens).")
    return TaskOutcome([MetricGroup(GROUP, protocol, {"perplexity": MetricValue(ppl, len(nll), bad, outcomes)},
                                    records)], len(nll), "tokens")
