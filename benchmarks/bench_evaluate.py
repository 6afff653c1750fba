"""Benchmark: CounterFact evaluation throughput, batched vs one prompt at a time, in the same run.

Loads the model once (default: the embedded SmolLM2-135M), reads CounterFact records 0..n-1 (never the reserved
5000-9999), and times `evaluate_counterfact` (every (prompt, target) pair: edit, paraphrase and neighborhood prompts
with the new and the true object) with

  batched: `score_targets` as `prunecli evaluate` uses it: `--batch-size` distinct prompts per pass, each prompt read
           once for all its targets (key/value cache), the vocabulary projection only where a target is predicted;
  naive:   the loop one writes by hand (EasyEdit style): one forward pass of prompt + target per pair, log-softmax
           over the whole sequence, the target tokens' log-probabilities gathered,

best of `--repeat` runs each, after one warm-up call. Both must give the same metrics (checked). Prints cases/s for
both and, last, `speedup: <naive time / batched time>x`.

Usage: python benchmarks/bench_evaluate.py [--model smollm2] [--n 64] [--batch-size 32] [--repeat 2]
       [--device cpu|cuda] [--threads N] [--data ../shared/data/counterfact/counterfact-edit.json]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from prunecli.evaluation.counterfact import counterfact_metrics, evaluate_counterfact, needed_pairs
from prunecli.models.loading import load_model
from prunecli.models.scoring import TargetScore
from prunecli.models.tokens import encode_pair
from prunecli.requests import load_requests

RESERVED_START = 5000


@torch.no_grad()
def naive_scores(model: Any, tok: Any, pairs: list[tuple[str, str]]) -> dict[tuple[str, str], TargetScore]:
    """One unpadded forward per (prompt, target) pair, same tokenisation convention (`encode_pair`)."""
    device = next(model.parameters()).device
    out = {}
    for prompt, target in pairs:
        p_ids, t_ids = encode_pair(tok, prompt, target)
        logprobs = model(torch.tensor([p_ids + t_ids], device=device)).logits[0].float().log_softmax(-1)
        rows = logprobs[len(p_ids) - 1:len(p_ids) - 1 + len(t_ids)]
        tgt = torch.tensor(t_ids, device=device)
        top = rows.argmax(-1)
        out[(prompt, target)] = TargetScore(rows.gather(1, tgt[:, None])[:, 0].tolist(), (top == tgt).tolist(),
                                            top.tolist())
    return out


def best_time(fn, repeat: int) -> tuple[float, dict[str, float]]:
    best, metrics = float("inf"), {}
    for _ in range(repeat):
        t0 = time.perf_counter()
        groups = fn()
        best = min(best, time.perf_counter() - t0)
        metrics = {k: v.value for g in groups for k, v in g.metrics.items()}
    return best, metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help="model folder or `smollm2`")
    parser.add_argument("--data", type=Path, default=Path("../shared/data/counterfact/counterfact-edit.json"))
    parser.add_argument("--n", type=int, default=48, help="CounterFact cases (records 0..n-1)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=2, help="timed runs per method (best is reported)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.n > RESERVED_START:
        parser.error(f"records {RESERVED_START}-9999 are reserved; use --n <= {RESERVED_START}")
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tok, _ = load_model(args.model, device=args.device)
    requests = load_requests(args.data, 0, args.n)
    pairs = len(needed_pairs(requests))
    prompts = len({p for p, _ in needed_pairs(requests)})
    evaluate_counterfact(model, tok, requests[:4], args.batch_size)  # warm-up (allocator, kernels)
    print(f"model {args.model} on {args.device} ({torch.get_num_threads()} threads): {len(requests)} cases, "
          f"{pairs} (prompt, target) pairs over {prompts} distinct prompts")

    t_batched, m_batched = best_time(lambda: evaluate_counterfact(model, tok, requests, args.batch_size), args.repeat)
    pair_list = needed_pairs(requests)
    t_naive, m_naive = best_time(lambda: counterfact_metrics(requests, naive_scores(model, tok, pair_list)),
                                 args.repeat)
    worst = max(abs(m_batched[k] - m_naive[k]) for k in m_batched)
    if worst > 1e-4:
        raise SystemExit(f"batched and one-at-a-time metrics differ by {worst:.2e}")
    print(f"batched (batch {args.batch_size}): {t_batched:.2f} s, {len(requests) / t_batched:.1f} cases/s")
    print(f"naive (one pair per forward):    {t_naive:.2f} s, {len(requests) / t_naive:.1f} cases/s")
    print(f"max metric difference: {worst:.1e}")
    print(f"speedup: {t_naive / t_batched:.1f}x")


if __name__ == "__main__":
    main()
