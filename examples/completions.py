"""Print greedy completions of the edit prompts before and after applying deltas (used by the demo).

Usage: python examples/completions.py MODEL REQUESTS [--delta D]... [--tokens N] [--tokenizer T]
"""

from __future__ import annotations

import argparse

import torch

from prunecli.core.delta_files import load_deltas
from prunecli.models.loading import add_delta_to_model, load_model
from prunecli.requests import load_requests


def complete(model, tokenizer, prompt: str, tokens: int) -> str:
    enc = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip().replace("\n", " ")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model")
    parser.add_argument("requests")
    parser.add_argument("--delta", action="append", default=[])
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--tokenizer", help="as prunecli's --tokenizer: for a model folder saved without one")
    args = parser.parse_args()
    requests = load_requests(args.requests)
    model, tokenizer, _ = load_model(args.model, tokenizer=args.tokenizer)
    before = [complete(model, tokenizer, r.text, args.tokens) for r in requests]
    delta = load_deltas(args.delta)
    if delta is not None:
        add_delta_to_model(model, delta)
    after = [complete(model, tokenizer, r.text, args.tokens) for r in requests]
    for r, b, a in zip(requests, before, after):
        print(f"{r.text!r}  (target: {r.target_new})\n    before: {b}\n    after:  {a}")


if __name__ == "__main__":
    main()
