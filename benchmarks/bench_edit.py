"""Benchmark: seconds per ROME edit, per MEMIT / AlphaEdit fact (batched vs the per-fact path) and per UltraEdit fact,
where an edit's time goes, and key-statistics tokens/s; each against its baseline in the same run.

The edits run in worker processes (this file with `--worker`), one per code tree, one after the other (the baseline
first; `--rounds R` alternates them R times and keeps each time's least): this checkout's, and with `--baseline TREE`
a checkout of the code to compare against (e.g. `git worktree add
/tmp/prunecli-main main`), run with that tree's `prunecli` on PYTHONPATH; the workers use only the editors' public
interface and the per-editor hyper-parameter registry, so any version since UltraEdit landed (commit ff32ed1) can serve
as the baseline. Each worker loads the
model, computes key statistics of the edited layers (`--stats-tokens` WikiText tokens) and generates the context
prefixes (neither is timed), then:

- batch: one batch of `--batch` facts (CounterFact records 0..batch-1, never the reserved 5000-9999) by MEMIT, by
  AlphaEdit and by UltraEdit, each from the same weights, seconds per fact and how many took (`editors.success`). In
  this checkout also MEMIT's and AlphaEdit's per-fact path: the same batch with `value_batch_rows` = one fact's
  prompts, so each fact's value is optimised on its own (what every version before the batched optimisation did).
- rome: `--n` sequential ROME edits (records 0..n-1), seconds per edit and the losses reached (same code path as the
  `edit` command's editor; both trees must reach the same losses up to float rounding).
- profile: one `run_edits` of `--profile-edits` ROME edits with a kappa trigger (`--kappa-trigger`, the check runs
  after every edit; set so high that no restraint fires) under cProfile: the share of the run in the value
  optimisation, the key k*, the context prefixes (once per run), the rank-one solve with C^-1, the probabilities
  before, the after-edit check and the kappa check.

Key statistics (in this process): `--stats-tokens` tokens for the default MEMIT layers, one pass for all layers
(what `prunecli stats` does) vs one full forward pass per layer (what the published code does).

Times are wall seconds, or with `--clock cpu` the worker's CPU seconds (with `--threads 1` on a CPU, nearly
independent of other jobs on a shared machine; on an idle one the two agree). Prints one summary block per model
(`--model smollm2 gemma3-270m` benchmarks both, one after the other).
`--random-shape gpt2-xl` times a random-weight GPT-2 XL-shaped model (48 layers, width 1600; SmolLM2's tokenizer)
instead of `--model`, for GPU timings without downloading GPT-2 XL.

Usage: python benchmarks/bench_edit.py [--model smollm2 [gemma3-270m ...] | --random-shape gpt2-xl]
       [--baseline TREE] [--rounds 1] [--clock wall|cpu] [--device cpu|cuda] [--n 3] [--batch 10]
       [--profile-edits 2] [--stats-tokens 4096] [--dtype fp32|bf16] [--threads N] [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import json
import os
import pstats
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from prunecli.editors import corpus
from prunecli.editors.alphaedit import AlphaEditEditor
from prunecli.editors.base import EditContext, Editor
from prunecli.editors.memit import MemitEditor
from prunecli.editors.prompts import generate_prefixes
from prunecli.editors.registry import resolve_hparams
from prunecli.editors.rome import RomeEditor
from prunecli.editors.session import PruneSchedule, run_edits
from prunecli.editors.stats import accumulate
from prunecli.editors.success import check_edits
from prunecli.editors.tracing import record
from prunecli.editors.ultraedit import UltraEditEditor, resolve_ultraedit_hparams
from prunecli.models.adapters import ModelAdapter, resolve_adapter
from prunecli.models.loading import load_model, parse_dtype, resolve_device
from prunecli.requests import EditRequest, load_requests

RESERVED_START = 5000
SHAPES = {"gpt2-xl": dict(n_embd=1600, n_layer=48, n_head=25, n_positions=1024)}
HERE = Path(__file__).resolve().parents[1]
# Where a ROME edit's time goes: function names in either tree (cProfile's cumulative time of each).
PROFILE_PARTS = {
    "value optimisation": ("optimize_value", "optimize_values"),
    "key k*": ("subject_keys",),
    "context prefixes (once per run)": ("generate_prefixes",),
    "C^-1 solve": ("rank_one_update", "inverse"),  # `inverse`: the factorisation once per run (RomeEditor.inverse)
    "probabilities before": ("_target_probs",),
    "after-edit check": ("check_edits",),
    "kappa check": ("kappa",),
}


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


def sync(model: Any) -> None:
    if next(model.parameters()).is_cuda:
        torch.cuda.synchronize()


def clock(spec: dict[str, Any]) -> Callable[[], float]:
    """The chosen clock: wall time, or this process's CPU time (`--clock cpu`: on a shared machine with `--threads 1`,
    what other processes do barely changes it; not for `--device cuda`)."""
    return time.process_time if spec["clock"] == "cpu" else time.perf_counter


def load(spec: dict[str, Any]) -> tuple[Any, Any, Any, str]:
    """(model, tokenizer, base checkpoint or None for a random shape, name)."""
    if spec["random_shape"]:
        model, tok = random_model(spec["random_shape"], spec["device"], spec["dtype"])
        return model, tok, None, f"random {spec['random_shape']}"
    model, tok, base = load_model(spec["model"], device=spec["device"], dtype=spec["dtype"])
    return model, tok, base, str(base.path.name)


def moments_of(model: Any, tok: Any, adapter: ModelAdapter, layers: list[int], spec: dict[str, Any]
               ) -> dict[int, torch.Tensor]:
    texts = corpus.text_file(Path(spec["data"]) / "wikitext" / "wiki.test.raw").texts
    chunks = list(corpus.token_chunks(tok, texts, spec["seq_len"], spec["stats_tokens"]))
    sums, counts = accumulate(model, tok, adapter, layers, chunks, spec["batch_size"])
    return {L: (sums[L].double() / counts[L]).to(sums[L].device) for L in layers}


def batch_run(model: Any, tok: Any, adapter: ModelAdapter, requests: list[EditRequest], editor: Editor, hp: Any,
              prefixes: list[str], moments: dict[int, torch.Tensor], spec: dict[str, Any]) -> dict[str, Any]:
    """One batch from the model's current weights (every matrix of the edited layers restored afterwards: UltraEdit
    edits others than the output projection): s per fact, how many took, steps."""
    layers = tuple(f"{adapter.stack_name}.{L}." for L in hp.layers)
    saved = {n: p.detach().clone() for n, p in model.named_parameters() if p.ndim == 2 and n.startswith(layers)}
    sync(model)
    t0 = clock(spec)()
    _, outcomes = editor.apply(model, tok, adapter, requests, EditContext(hp, prefixes, moments))
    sync(model)
    seconds = clock(spec)() - t0
    took = sum(c.took for c in check_edits(model, tok, requests))
    with torch.no_grad():
        for n, w in saved.items():
            model.get_parameter(n).copy_(w)
    return {"s_per_fact": seconds / len(requests), "took": took, "steps": [o.steps for o in outcomes]}


def rome_run(model: Any, tok: Any, adapter: ModelAdapter, requests: list[EditRequest], ctx: EditContext,
             spec: dict[str, Any]) -> dict[str, Any]:
    """Sequential ROME edits by one editor (as in one `edit` run), each timed (weights restored afterwards)."""
    (layer,) = ctx.hparams.layers
    w0 = adapter.weight(layer).detach().clone()
    editor = RomeEditor()
    seconds, losses = [], []
    for request in requests:
        sync(model)
        t0 = clock(spec)()
        _, (outcome,) = editor.apply(model, tok, adapter, [request], ctx)
        sync(model)
        seconds.append(clock(spec)() - t0)
        losses.append(outcome.loss)
    with torch.no_grad():
        adapter.weight(layer).copy_(w0)
    return {"s_per_edit": sum(seconds) / len(seconds), "losses": losses}


def profile_run(model: Any, tok: Any, requests: list[EditRequest], hp: Any, moments: dict[int, torch.Tensor],
                base: Any, spec: dict[str, Any]) -> dict[str, float]:
    """Shares of one `run_edits` of ROME edits (context prefixes included, once) by the parts of PROFILE_PARTS."""
    profiler = cProfile.Profile(clock(spec))
    t0 = clock(spec)()
    profiler.enable()
    run_edits(model, tok, base, requests, RomeEditor(), hp, moments,
              prune=PruneSchedule(kappa_trigger=spec["kappa_trigger"]))
    profiler.disable()
    total = clock(spec)() - t0
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    shares = {part: sum(v[3] for k, v in stats.items() if k[2] in names) / total
              for part, names in PROFILE_PARTS.items()}
    return {"seconds": total, **shares}


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Everything timed with the `prunecli` on this process's path (this checkout or the baseline)."""
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    model, tok, base, name = load(spec)
    model.requires_grad_(False)
    adapter = resolve_adapter(model)
    hps = {m: resolve_hparams(m, adapter.family, adapter.num_layers) for m in ("rome", "memit", "alphaedit")}
    layers = sorted({L for hp in hps.values() for L in hp.layers})
    moments = moments_of(model, tok, adapter, layers, spec)
    cf = Path(spec["data"]) / "counterfact" / "counterfact-edit.json"
    batch = load_requests(cf, 0, spec["batch"])
    out: dict[str, Any] = {"name": name, "threads": torch.get_num_threads(),
                           "layers": {m: list(hp.layers) for m, hp in hps.items()}}
    for method, editor in (("memit", MemitEditor), ("alphaedit", AlphaEditEditor)):
        hp = hps[method]
        prefixes = generate_prefixes(model, tok, hp.context_template_length_params, 0)
        out[method] = batch_run(model, tok, adapter, batch, editor(), hp, prefixes, moments, spec)
        if hasattr(hp, "value_batch_rows"):  # this checkout: the per-fact path of the same code
            one_fact = dataclasses.replace(hp, value_batch_rows=len(prefixes) + 1)
            out[method + " per fact"] = batch_run(model, tok, adapter, batch, editor(), one_fact, prefixes, moments,
                                                  spec)
    out["ultraedit"] = batch_run(model, tok, adapter, batch, UltraEditEditor(), resolve_ultraedit_hparams(adapter),
                                 [""], {}, spec)
    rome = hps["rome"]
    ctx = EditContext(rome, generate_prefixes(model, tok, rome.context_template_length_params, 0), moments)
    out["rome"] = rome_run(model, tok, adapter, load_requests(cf, 0, spec["n"]), ctx, spec)
    if base is not None:  # last: the profiled run leaves its edits in the model
        out["profile"] = profile_run(model, tok, load_requests(cf, 0, spec["profile_edits"]), rome, moments, base,
                                     spec)
    return out


def fastest(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One worker's results over rounds: each time the least over the rounds (the round least disturbed by anything
    else), the profile of the quickest profiled run; counts, steps and losses are the same in every round."""
    out = dict(rounds[0])
    for key, value in rounds[0].items():
        for unit in ("s_per_edit", "s_per_fact"):
            if isinstance(value, dict) and unit in value:
                out[key] = {**value, unit: min(r[key][unit] for r in rounds)}
    if "profile" in out:
        out["profile"] = min((r["profile"] for r in rounds), key=lambda p: p["seconds"])
    return out


def run_worker(tree: Path, spec: dict[str, Any]) -> dict[str, Any]:
    """`worker(spec)` in a fresh process with `tree`'s prunecli; its result is the last line it prints."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)], env=env,
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"worker for {tree} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


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


def stats_speed(spec: dict[str, Any]) -> str:
    """Key statistics for the MEMIT layers: one pass for all layers vs one full pass per layer (tokens/s)."""
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    model, tok, _, _ = load(spec)
    model.requires_grad_(False)
    adapter = resolve_adapter(model)
    layers = list(resolve_hparams("memit", adapter.family, adapter.num_layers).layers)
    texts = corpus.text_file(Path(spec["data"]) / "wikitext" / "wiki.test.raw").texts
    chunks = list(corpus.token_chunks(tok, texts, spec["seq_len"], spec["stats_tokens"]))
    accumulate(model, tok, adapter, layers, chunks[:1], spec["batch_size"])  # warm-up
    sync(model)
    t0 = time.perf_counter()
    _, counts = accumulate(model, tok, adapter, layers, chunks, spec["batch_size"])
    sync(model)
    one_pass = time.perf_counter() - t0
    t0 = time.perf_counter()
    naive_stats(model, tok, adapter, layers, chunks, spec["batch_size"])
    sync(model)
    naive = time.perf_counter() - t0
    tokens = counts[layers[0]]
    return (f"stats layers {layers}: {tokens / one_pass:,.0f} tokens/s (naive per-layer {tokens / naive:,.0f}, "
            f"speedup {naive / one_pass:.1f}x)")


def summary(new: dict[str, Any], old: dict[str, Any] | None, spec: dict[str, Any]) -> list[str]:
    def ratio(a: float, b: float) -> str:
        return f"{b / a:.2f}x"

    lines = [(f"bench_edit model={new['name']} device={spec['device']} dtype={spec['dtype']} "
              f"threads={new['threads']} clock={spec['clock']}")]
    r = new["rome"]
    line = f"  ROME layers {new['layers']['rome']}: {r['s_per_edit']:.2f} s/edit"
    if old is not None:
        same = all(abs(a - b) <= 1e-3 * max(1.0, abs(b)) for a, b in zip(r["losses"], old["rome"]["losses"]))
        line += (f" (baseline {old['rome']['s_per_edit']:.2f}: {ratio(r['s_per_edit'], old['rome']['s_per_edit'])}"
                 f" faster; same losses: {same})")
    lines.append(line)
    for method, label in (("memit", "MEMIT"), ("alphaedit", "AlphaEdit")):
        b, p = new[method], new[method + " per fact"]
        line = (f"  batch of {spec['batch']}, {label} layers {new['layers'][method]}: {b['s_per_fact']:.2f} s/fact "
                f"batched, {p['s_per_fact']:.2f} per-fact path ({ratio(b['s_per_fact'], p['s_per_fact'])}); took "
                f"{b['took']}/{spec['batch']} batched, {p['took']} per fact; same steps: {b['steps'] == p['steps']}")
        if old is not None:
            o = old[method]
            line += (f"; baseline {o['s_per_fact']:.2f} s/fact ({ratio(b['s_per_fact'], o['s_per_fact'])}), "
                     f"took {o['took']}")
        lines.append(line)
    u = new["ultraedit"]
    lines.append(f"  batch of {spec['batch']}, UltraEdit: {u['s_per_fact']:.3f} s/fact, "
                 f"took {u['took']}/{spec['batch']} "
                 f"({ratio(u['s_per_fact'], r['s_per_edit'])} fewer s than ROME's per edit)")
    if "profile" in new:
        runs = [("baseline", old["profile"]), ("new", new["profile"])] if old is not None else [("new", new["profile"])]
        took = ", ".join(f"{k} {v['seconds']:.1f} s" for k, v in runs)
        lines.append(f"  one run of {spec['profile_edits']} ROME edits with a kappa trigger, "
                     f"shares of its time ({took}):")
        for part in PROFILE_PARTS:
            lines.append(f"    {part:34s} " + "  ->  ".join(f"{v[part]:6.1%}" for _, v in runs))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", nargs="+", default=["smollm2"], help="model folder(s) or built-in names")
    parser.add_argument("--random-shape", choices=sorted(SHAPES), help="time a random-weight model of this shape")
    parser.add_argument("--baseline", type=Path, help="a checkout of the code to compare against (its repo root)")
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--n", type=int, default=3, help="ROME edits timed (CounterFact records 0..n-1)")
    parser.add_argument("--batch", type=int, default=10, help="MEMIT/AlphaEdit/UltraEdit facts in the timed batch")
    parser.add_argument("--profile-edits", type=int, default=2, help="ROME edits of the profiled run")
    parser.add_argument("--kappa-trigger", type=float, default=1e12, help="of the profiled run (never reached)")
    parser.add_argument("--stats-tokens", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=8, help="statistics sequences per forward pass")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall time, or the process's CPU time (robust to other jobs with --threads 1 on a CPU)")
    parser.add_argument("--rounds", type=int, default=1, help="alternate the workers this many times; keep the least")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if max(args.n, args.batch, args.profile_edits) > RESERVED_START:
        parser.error(f"records {RESERVED_START}-9999 are reserved")
    for model_name in [None] if args.random_shape else args.model:
        spec = {"model": model_name, "random_shape": args.random_shape, "data": str(args.data.resolve()),
                "n": args.n, "batch": args.batch, "profile_edits": args.profile_edits,
                "kappa_trigger": args.kappa_trigger, "stats_tokens": args.stats_tokens,
                "batch_size": args.batch_size, "seq_len": args.seq_len, "device": args.device, "dtype": args.dtype,
                "threads": args.threads, "clock": args.clock}
        trees = {"new": HERE, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
        rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
        for _ in range(args.rounds):
            for name, tree in sorted(trees.items()):  # the baseline first
                rounds[name].append(run_worker(tree, spec))
        new = fastest(rounds["new"])
        old = fastest(rounds["baseline"]) if args.baseline else None
        print("\n".join([*summary(new, old, spec), "  " + stats_speed(spec)]), flush=True)


if __name__ == "__main__":
    main()
