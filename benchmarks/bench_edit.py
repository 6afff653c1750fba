"""Benchmark: seconds per ROME edit and key-statistics tokens/s, each against its naive baseline in the same run, and
seconds per fact of MEMIT, AlphaEdit and UltraEdit on the same batch.

ROME: `--n` sequential edits of CounterFact records 0..n-1 (never the reserved 5000-9999) with the model's default
ROME hyper-parameters, timed per edit (context prefixes are generated once beforehand and not counted), with

  cached: the value optimisation runs the prompts' prefixes once and re-runs only the tokens from the subject's last
          token on at every step (what `prunecli edit` does);
  naive:  whole prompts re-run at every step (what the published ROME/MEMIT code does).

Both start from the same model and must reach the same losses (checked: the cache changes speed, not results).

Statistics: `--stats-tokens` tokens of WikiText for the default MEMIT layers, with

  one pass: all layers collected in one forward pass that stops after the deepest one (what `prunecli stats` does);
  naive:    one full forward pass per layer (what the published code does, layer after layer).

MEMIT vs AlphaEdit vs UltraEdit: one batch of the same `--batch` facts (records 0..batch-1) from the same weights with
each method's default hyper-parameters and the statistics above (AlphaEdit's time includes its one eigendecomposition
per layer and the extra pass that reads the edited keys for its cache; the context prefixes are generated once and not
counted; UltraEdit needs neither statistics nor prefixes, and its time includes the pass that reports its losses).

Prints one summary line per model with the ratios (`--model smollm2 gemma3-270m` benchmarks both, one after the
other, for the s/edit of each). `--random-shape gpt2-xl` times a random-weight GPT-2 XL-shaped model
(48 layers, width 1600; SmolLM2's tokenizer) instead of `--model`, for GPU timings without downloading GPT-2 XL.

Usage: python benchmarks/bench_edit.py [--model smollm2 [gemma3-270m ...] | --random-shape gpt2-xl]
       [--device cpu|cuda] [--n 3] [--batch 10] [--stats-tokens 4096] [--dtype fp32|bf16] [--threads N]
       [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from prunecli.editors import corpus
from prunecli.editors.alphaedit import AlphaEditEditor
from prunecli.editors.base import EditContext, Editor, EditSettings as HParams
from prunecli.editors.registry import resolve_hparams
from prunecli.editors.keys import subject_keys
from prunecli.editors.memit import MemitEditor
from prunecli.editors.prompts import generate_prefixes
from prunecli.editors.rome import rank_one_update
from prunecli.editors.stats import accumulate
from prunecli.editors.ultraedit import UltraEditEditor, resolve_ultraedit_hparams
from prunecli.editors.tracing import record
from prunecli.editors.value import optimize_value
from prunecli.models.adapters import ModelAdapter, resolve_adapter
from prunecli.models.loading import load_model, parse_dtype, resolve_device
from prunecli.requests import EditRequest, load_requests

RESERVED_START = 5000
SHAPES = {"gpt2-xl": dict(n_embd=1600, n_layer=48, n_head=25, n_positions=1024)}


def random_model(shape: str, device: str, dtype: str) -> tuple[Any, Any]:
    """A random-weight model of a known shape (GPT-2 family) with SmolLM2's tokenizer."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from prunecli.models.builtin import ensure_default_model

    tok = AutoTokenizer.from_pretrained(ensure_default_model())
    config = GPT2Config(vocab_size=len(tok), bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                        **SHAPES[shape])
    torch.manual_seed(0)
    with torch.device(resolve_device(device)):
        model = GPT2LMHeadModel(config)
    return model.to(parse_dtype(dtype)).eval(), tok


def rome_edits(model: Any, tok: Any, adapter: ModelAdapter, requests: list[EditRequest], ctx: EditContext,
               prefix_cache: bool) -> tuple[list[float], list[float]]:
    """Sequential ROME edits (the editor's steps, with the value optimisation's cache switchable); seconds, losses."""
    (layer,) = ctx.hparams.layers
    moment = ctx.moments.get(layer)
    seconds, losses = [], []
    for req in requests:
        sync(model)
        t0 = time.perf_counter()
        keys, _ = subject_keys(model, tok, adapter.projection(layer), [req], ctx.prefixes)
        w = adapter.weight_matrix(layer)
        value = optimize_value(model, tok, adapter.projection(layer), w.shape[0], req, ctx.prefixes, ctx.hparams,
                               prefix_cache=prefix_cache)
        a, b = rank_one_update(w, keys[0], w.double() @ keys[0].double() + value.delta.double(), moment)
        adapter.add_update(layer, a.to(w.device) @ b.to(w.device).T)
        sync(model)
        seconds.append(time.perf_counter() - t0)
        losses.append(value.loss)
    return seconds, losses


def batch_seconds_per_fact(model: Any, tok: Any, adapter: ModelAdapter, requests: list[EditRequest], editor: Editor,
                           hp: HParams, prefixes: list[str], moments: dict[int, torch.Tensor]) -> float:
    """One batch of `requests` by `editor` from the model's current weights (every matrix of the edited layers is
    restored afterwards: UltraEdit edits other matrices than the output projection); s per fact."""
    layers = tuple(f"{adapter.stack_name}.{L}." for L in hp.layers)
    saved = {n: p.detach().clone() for n, p in model.named_parameters() if p.ndim == 2 and n.startswith(layers)}
    sync(model)
    t0 = time.perf_counter()
    editor.apply(model, tok, adapter, requests, EditContext(hp, prefixes, moments))
    sync(model)
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        for n, w in saved.items():
            model.get_parameter(n).copy_(w)
    return seconds / len(requests)


@torch.no_grad()
def naive_stats(model: Any, tok: Any, adapter: ModelAdapter, layers: list[int], chunks: list[list[int]],
                batch_size: int) -> None:
    """One full forward pass per layer and batch, as the published statistics code does."""
    from prunecli.editors.prompts import right_pad
    from prunecli.models.tokens import pad_id

    device = next(model.parameters()).device
    for layer in layers:
        total = torch.zeros(adapter.key_size(layer), adapter.key_size(layer), dtype=torch.float64, device=device)
        for i in range(0, len(chunks), batch_size):
            ids, mask = right_pad(chunks[i:i + batch_size], pad_id(tok), device)
            keys = record(model, {"k": (adapter.projection(layer), "input")}, stop_early=False, input_ids=ids,
                          attention_mask=mask)["k"][mask.bool()].float()
            total += (keys.T @ keys).double()


def sync(model: Any) -> None:
    if next(model.parameters()).is_cuda:
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", nargs="+", default=["smollm2"], help="model folder(s) or built-in names")
    parser.add_argument("--random-shape", choices=sorted(SHAPES), help="time a random-weight model of this shape")
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--n", type=int, default=3, help="ROME edits per variant (CounterFact records 0..n-1)")
    parser.add_argument("--batch", type=int, default=10, help="MEMIT/AlphaEdit/UltraEdit facts in the timed batch")
    parser.add_argument("--stats-tokens", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=8, help="statistics sequences per forward pass")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if max(args.n, args.batch) > RESERVED_START:
        parser.error(f"records {RESERVED_START}-9999 are reserved")
    if args.threads:
        torch.set_num_threads(args.threads)
    for model_name in [None] if args.random_shape else args.model:
        bench_model(model_name, args)


def bench_model(model_name: str | None, args: argparse.Namespace) -> None:
    """Benchmark one model (`None`: the random-weight shape of `--random-shape`) and print its summary line."""
    if model_name is None:
        model, tok = random_model(args.random_shape, args.device, args.dtype)
        name = f"random {args.random_shape}"
    else:
        model, tok, base = load_model(model_name, device=args.device, dtype=args.dtype)
        name = str(base.path.name)
    model.requires_grad_(False)
    adapter = resolve_adapter(model)
    rome = resolve_hparams("rome", adapter.family, adapter.num_layers)
    memit = resolve_hparams("memit", adapter.family, adapter.num_layers)
    alphaedit = resolve_hparams("alphaedit", adapter.family, adapter.num_layers)
    memit_layers = list(memit.layers)
    stat_layers = sorted(set(memit.layers) | set(alphaedit.layers))
    requests = load_requests(args.data / "counterfact" / "counterfact-edit.json", 0, args.n)
    batch = load_requests(args.data / "counterfact" / "counterfact-edit.json", 0, args.batch)
    texts = corpus.text_file(args.data / "wikitext" / "wiki.test.raw").texts
    chunks = list(corpus.token_chunks(tok, texts, args.seq_len, args.stats_tokens))

    # Statistics: one pass for all MEMIT layers vs one full pass per layer (first a small warm-up).
    accumulate(model, tok, adapter, memit_layers, chunks[:1], args.batch_size)
    sync(model)
    t0 = time.perf_counter()
    sums, counts = accumulate(model, tok, adapter, memit_layers, chunks, args.batch_size)
    sync(model)
    one_pass = time.perf_counter() - t0
    t0 = time.perf_counter()
    naive_stats(model, tok, adapter, memit_layers, chunks, args.batch_size)
    sync(model)
    naive_pass = time.perf_counter() - t0
    tokens = counts[memit_layers[0]]
    if set(stat_layers) != set(memit_layers):
        more, more_counts = accumulate(model, tok, adapter, sorted(set(stat_layers) - set(memit_layers)), chunks,
                                       args.batch_size)
        sums, counts = {**sums, **more}, {**counts, **more_counts}
    moments = {L: (sums[L].double() / counts[L]).to(sums[L].device) for L in stat_layers}

    # MEMIT and AlphaEdit: the same batch from the same weights.
    batch_prefixes = generate_prefixes(model, tok, memit.context_template_length_params, 0)
    memit_s = batch_seconds_per_fact(model, tok, adapter, batch, MemitEditor(), memit, batch_prefixes, moments)
    alpha_s = batch_seconds_per_fact(model, tok, adapter, batch, AlphaEditEditor(), alphaedit,
                                     generate_prefixes(model, tok, alphaedit.context_template_length_params, 0),
                                     moments)
    ultra = resolve_ultraedit_hparams(adapter)
    ultra_s = batch_seconds_per_fact(model, tok, adapter, batch, UltraEditEditor(), ultra, [""], {})

    # ROME: the same edits from the same weights, cached then naive.
    (layer,) = rome.layers
    ctx = EditContext(rome, generate_prefixes(model, tok, rome.context_template_length_params, 0), {})
    w0 = adapter.weight(layer).detach().clone()
    cached_s, cached_loss = rome_edits(model, tok, adapter, requests, ctx, prefix_cache=True)
    with torch.no_grad():
        adapter.weight(layer).copy_(w0)
    naive_s, naive_loss = rome_edits(model, tok, adapter, requests, ctx, prefix_cache=False)
    same = all(abs(a - b) <= 1e-3 * max(1.0, abs(b)) for a, b in zip(cached_loss, naive_loss))

    per_edit, naive_edit = sum(cached_s) / len(cached_s), sum(naive_s) / len(naive_s)
    print(f"bench_edit model={name} device={args.device} dtype={args.dtype} threads={torch.get_num_threads()}: "
          f"ROME layer {layer}: {per_edit:.2f} s/edit (naive {naive_edit:.2f}, speedup {naive_edit / per_edit:.1f}x, "
          f"same losses: {same}); stats layers {memit_layers}: {tokens / one_pass:,.0f} tokens/s "
          f"(naive per-layer {tokens / naive_pass:,.0f}, speedup {naive_pass / one_pass:.1f}x); batch of {len(batch)}: "
          f"MEMIT layers {memit_layers} {memit_s:.2f} s/fact, AlphaEdit layers {list(alphaedit.layers)} "
          f"{alpha_s:.2f} s/fact ({alpha_s / memit_s:.2f}x MEMIT's), UltraEdit {len(ultra.targets)} matrices of "
          f"layers {list(ultra.layers)} {ultra_s:.3f} s/fact ({per_edit / ultra_s:.0f}x fewer s than ROME's per edit)")


if __name__ == "__main__":
    main()
