"""Benchmark: the spectra paths of `prunecli inspect`: float32 vs float64 Gram on a whole checkpoint, and the float64
Gram path vs plain `torch.linalg.svdvals` in float32.

With `--checkpoint DIR` (every 2-D matrix of a checkpoint folder, e.g. the 1.1B-parameter bf16 one that
`make_random_checkpoint.py --shape tinyllama-1.1b` writes), it times, in the same run and on the same device,

  new:     `checkpoint_reports(..., precision="float32")`, what `inspect` runs on a whole checkpoint: float32 Gram +
           eigvalsh where the accuracy guard keeps it (float64 elsewhere), the next tensor read while one is
           decomposed;
  float64: `checkpoint_reports(..., precision="float64", prefetch=False)`, the float64 Gram path, tensors read in turn
           (what `inspect` ran before),

best of `--repeat` runs each (interleaved), and prints how many matrices each path took, the largest relative error
of any singular value of the new run against the float64 one (with the bound the guard guarantees), and last
`speedup: <float64 / new>x`.

Without `--checkpoint`, the older comparison:

Builds (in a temporary folder) a checkpoint of random GPT-2 XL `mlp.c_proj`-shaped matrices (math 1600 x 6400, stored
[6400, 1600] like GPT-2's Conv1D), with rows scaled geometrically so kappa spreads from ~3 to ~3e3 across them. Then,
in the same run and on the same device, it times

  fast:  `checkpoint_reports(..., exact=False)`: lazy read + float64 Gram (upper triangle, chunked) + eigvalsh;
  naive: lazy read + `torch.linalg.svdvals` in float32 (what one would write by hand),

taking the best of `--repeat` runs for each, and reports the largest relative error of sigma_min of each method
against a float64 SVD of the same stored matrices. The last line is `speedup: <naive / fast>x`.

The ratio depends on threads: on our 2-core box torch's float32 svdvals runs slower on two threads than on one (and
far slower when other processes compete for the cores), while the Gram product scales. Run it with `--threads 1`
as well to see the single-thread ratio (about 1.2x there: both methods then do similar BLAS3 work).

Usage: python benchmarks/bench_spectra.py [--n 4] [--repeat 3] [--device cpu|cuda] [--threads N]
       python benchmarks/bench_spectra.py --checkpoint DIR [--repeat 1] [--device cpu|cuda] [--threads N]
"""

from __future__ import annotations

import argparse
import collections
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from safetensors.torch import save_file

from prunecli.core.checkpoint import Checkpoint
from prunecli.core.inspection import MatrixReport, checkpoint_candidates, checkpoint_reports
from prunecli.core.spectra import FLOAT32_TOLERANCE

T = TypeVar("T")
OUT, IN = 1600, 6400  # GPT-2 XL mlp.c_proj: y = x W with W stored [in, out]


def make_checkpoint(folder: Path, n: int, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(n):
        spread = 3.0 * i / max(n - 1, 1)  # row scales from 1 down to 10^-spread
        w = torch.randn(OUT, IN, generator=g) * torch.logspace(0, -spread, OUT).unsqueeze(1) / IN**0.5
        tensors[f"transformer.h.{i}.mlp.c_proj.weight"] = w.T.contiguous()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text('{"model_type": "gpt2"}')
    return list(tensors)


def timed(fn: Callable[[], T]) -> tuple[float, T]:
    t0 = time.perf_counter()
    result = fn()  # every method returns CPU floats, so device work is finished when it returns
    return time.perf_counter() - t0, result


def whole_checkpoint(folder: Path, repeat: int, dev: torch.device) -> None:
    """The float32 path with read-ahead vs the float64 path read in turn, on every matrix of `folder`."""
    ckpt = Checkpoint(folder)
    names = [aliases[0] for aliases in checkpoint_candidates(ckpt)]

    def new() -> list[MatrixReport]:
        return list(checkpoint_reports(ckpt, names, device=dev, keep_spectra=True, precision="float32"))

    def old() -> list[MatrixReport]:
        return list(checkpoint_reports(ckpt, names, device=dev, keep_spectra=True, precision="float64",
                                       prefetch=False))

    next(checkpoint_reports(ckpt, names[:1], device=dev))  # warm-up (library loading, CUDA context), untimed
    t_new = t_old = float("inf")
    r_new: list[MatrixReport] = []
    r_old: list[MatrixReport] = []
    for _ in range(repeat):  # interleaved, so load from other processes hits both alike
        t, r_new = timed(new)
        t_new = min(t_new, t)
        t, r_old = timed(old)
        t_old = min(t_old, t)
    worst = {}
    for a, b in zip(r_new, r_old, strict=True):
        assert a.spectrum is not None and b.spectrum is not None
        rel = float(((a.spectrum - b.spectrum).abs() / b.spectrum).max())
        worst[a.path] = max(worst.get(a.path, 0.0), rel)
    params = sum(ckpt.info(n).shape[0] * ckpt.info(n).shape[1] for n in names)
    dtypes = sorted({ckpt.info(n).dtype for n in names})
    kappas = [r.stats.kappa for r in r_old]
    print(f"{folder}: {len(names)} matrices, {params / 1e9:.3g}B parameters in them, {'/'.join(dtypes)}, kappa "
          f"{min(kappas):.3g}..{max(kappas):.3g}; device {dev}, torch threads {torch.get_num_threads()}, best of "
          f"{repeat} run(s) each")
    print(f"paths of the new run: {dict(collections.Counter(r.path for r in r_new))}")
    print(f"new (float32 Gram where the guard keeps it, read-ahead): {t_new:8.2f} s")
    print(f"float64 Gram path, tensors read in turn:                 {t_old:8.2f} s")
    for path, rel in sorted(worst.items()):
        print(f"largest relative error of any singular value vs float64, {path} matrices: {rel:.2e}")
    print(f"largest relative error of any singular value: {max(worst.values()):.2e} (guaranteed <= "
          f"{FLOAT32_TOLERANCE:.0e})")
    print(f"speedup: {t_old / t_new:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=4, help="number of matrices")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="time every matrix of this checkpoint folder: float32 vs float64 Gram path")
    parser.add_argument("--repeat", type=int, default=None,
                        help="timed runs per method (best is reported; default 3, 1 with --checkpoint)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads for both methods (default: torch's own choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    if args.checkpoint is not None:
        whole_checkpoint(args.checkpoint, args.repeat or 1, dev)
        return
    args.repeat = args.repeat or 3

    with tempfile.TemporaryDirectory() as tmp:
        names = make_checkpoint(Path(tmp), args.n)
        ckpt = Checkpoint(tmp)

        def fast() -> list[float]:
            return [r.stats.sigma_min for r in checkpoint_reports(ckpt, names, exact=False, device=dev)]

        def naive() -> list[float]:
            return [float(torch.linalg.svdvals(ckpt.get(n).to(dev))[-1].cpu()) for n in names]

        # warm-up (library loading, CUDA context, allocator) on one matrix each, untimed
        next(checkpoint_reports(ckpt, names[:1], device=dev))
        torch.linalg.svdvals(ckpt.get(names[0]).to(dev))
        ref_s = [torch.linalg.svdvals(ckpt.get(n).double()) for n in names]  # float64 SVD on the CPU
        ref = [float(s[-1]) for s in ref_s]
        kappas = [float(s[0] / s[-1]) for s in ref_s]

        t_fast = t_naive = float("inf")
        s_fast: list[float] = []
        s_naive: list[float] = []
        for _ in range(args.repeat):  # interleaved, so load from other processes hits both methods alike
            t, s_fast = timed(fast)
            t_fast = min(t_fast, t)
            t, s_naive = timed(naive)
            t_naive = min(t_naive, t)

    def max_rel(vals: list[float]) -> float:
        return max(abs(v - r) / r for v, r in zip(vals, ref, strict=True))

    print(f"{args.n} matrices {OUT}x{IN} fp32, kappa {min(kappas):.3g}..{max(kappas):.3g}, device {dev}, "
          f"torch threads {torch.get_num_threads()}, best of {args.repeat} runs each")
    print(f"fast  (Gram fp64 + eigvalsh, inspect float64): {t_fast:8.3f} s  ({t_fast / args.n:.3f} s/matrix)  "
          f"max rel err sigma_min vs float64 SVD: {max_rel(s_fast):.2e}")
    print(f"naive (torch.linalg.svdvals float32):         {t_naive:8.3f} s  ({t_naive / args.n:.3f} s/matrix)  "
          f"max rel err sigma_min vs float64 SVD: {max_rel(s_naive):.2e}")
    print(f"speedup: {t_naive / t_fast:.2f}x")


if __name__ == "__main__":
    main()
