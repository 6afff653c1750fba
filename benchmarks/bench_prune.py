"""PRUNE on one GPT-2 XL c_proj-sized matrix: prunecli's restraint vs the released reference algorithm.

Ours (what `prunecli prune --no-kappa` does per matrix): `largest_singular_value(W)` (Lanczos, no SVD of W) and
`restrain_entry` (exact SVD on the rank-r factors, never densified). The reference, measured in the same run, is what
the released PRUNE code does with dense float32 NumPy arrays on the CPU: full SVDs (`full_matrices=True`) of D, of W
and of W + D, `np.linalg.matrix_rank(D)`, then D' = U diag(s') V^T. Both results are compared.

    python benchmarks/bench_prune.py                 # 1600x6400, rank 200, CPU
    python benchmarks/bench_prune.py --device cuda   # ours on the GPU; the reference stays NumPy on the CPU

The last line is `speedup: <reference seconds / ours seconds>`; the line before it, `target-kappa: <s> per matrix`,
is what `prune --target-kappa 1.25 x kappa(W)` costs per matrix (W's Gram matrix once, whose spectrum gives kappa(W)
and sigma_max, then the strength bisection on it), measured in the same run.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import numpy as np
import torch

from prunecli.core.delta import DeltaEntry
from prunecli.core.restraint import RestraintSettings, restrain_entry
from prunecli.core.spectra import UpdatedSpectra, largest_singular_value, singular_values


def make_problem(out: int, inp: int, rank: int, seed: int) -> tuple[torch.Tensor, DeltaEntry]:
    """Gaussian W (the hard case for sigma_max: close top singular values) and a rank-r delta whose top ~55
    singular values exceed sigma_max(W) and whose smallest is well above the numerical-rank cut-off; the factors
    are not orthogonal, as real edit factors are not."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=gen) * 0.05  # sigma_max ~ 6: sigma_max * ln(1.2) > 1, no enlargement
    smax = 0.05 * (math.sqrt(out) + math.sqrt(inp))
    s = 4 * smax * torch.exp(-torch.arange(rank, dtype=torch.float64) / 40)
    u, _ = torch.linalg.qr(torch.randn(out, rank, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(inp, rank, generator=gen, dtype=torch.float64))
    mix = torch.randn(rank, rank, generator=gen, dtype=torch.float64) / math.sqrt(rank) + torch.eye(rank)
    return w, DeltaEntry.lowrank((u * s) @ mix, v @ torch.linalg.inv(mix).T, "out_in")


def ours(w: torch.Tensor, entry: DeltaEntry, fn: str, alpha: float, beta: float,
         device: str) -> tuple[DeltaEntry, float]:
    smax = largest_singular_value(w.to(device))
    # the factors come back to the CPU: that synchronises
    new, _ = restrain_entry(entry, smax, RestraintSettings(fn, alpha, beta), device)
    return new, smax


def target_kappa_search(w: torch.Tensor, entry: DeltaEntry, factor: float,
                        device: str) -> tuple[float, int, float, float]:
    """What `prune --target-kappa factor x kappa(W)` does per matrix: (strength, kappa evaluations, target, kappa of
    W + D' from the same Gram machinery)."""
    x = w.to(device)
    spectra = UpdatedSpectra(x)  # W's Gram matrix: the one dense step of the search
    target = factor * spectra.stats().kappa
    new, info = restrain_entry(entry, spectra.stats().sigma_max, RestraintSettings(target_kappa=target), device,
                               spectra)
    assert info.strength is not None and info.search_steps is not None and new.a is not None and new.b is not None
    return info.strength, info.search_steps, target, spectra.stats(*spectra.orient(new.a, new.b)).kappa


def reference(w: np.ndarray, d: np.ndarray, fn: str, alpha: float,
              beta: float) -> tuple[np.ndarray, float, int, dict[str, float]]:
    """The released PRUNE algorithm (float32 NumPy, dense), timed step by step."""
    times: dict[str, float] = {}

    def timed(label: str, f):
        t0 = time.perf_counter()
        result = f()
        times[label] = time.perf_counter() - t0
        return result

    u, s, vt = timed("svd(D)", lambda: np.linalg.svd(d, full_matrices=True))
    _, s0, _ = timed("svd(W)", lambda: np.linalg.svd(w, full_matrices=True))
    timed("svd(W+D)", lambda: np.linalg.svd(w + d, full_matrices=True))
    rank = timed("matrix_rank(D)", lambda: np.linalg.matrix_rank(d))
    smax = s0[0]
    if fn == "log":  # the paper's F, written independently of prunecli's
        s2 = np.where(s > smax, np.log(s) / np.log(alpha) - np.log(smax) / np.log(alpha) + smax, s)
    else:
        s2 = np.where(s > smax, s / beta + (beta - 1) / beta * smax, s)
    new = timed("rebuild D'", lambda: (u[:, :rank] * s2[:rank]) @ vt[:rank])
    return new, float(smax), int(rank), times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=int, default=1600)
    ap.add_argument("--inp", type=int, default=6400)
    ap.add_argument("--rank", type=int, default=200)
    ap.add_argument("--fn", choices=["log", "linear"], default="log")
    ap.add_argument("--alpha", type=float, default=1.2)
    ap.add_argument("--beta", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=5, help="timed runs of ours (median reported)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    w, entry = make_problem(args.out, args.inp, args.rank, args.seed)
    print(f"W {args.out}x{args.inp} float32, delta rank {args.rank} (factors), fn={args.fn} alpha={args.alpha}, "
          f"ours on {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads")

    ours(w, entry, args.fn, args.alpha, args.beta, args.device)  # warm-up (library initialisation, not algorithm cost)
    runs = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        new, smax = ours(w, entry, args.fn, args.alpha, args.beta, args.device)
        runs.append(time.perf_counter() - t0)
    t_ours = statistics.median(runs)
    t0 = time.perf_counter()
    smax_sigma_only = largest_singular_value(w.to(args.device))
    t_sigma = time.perf_counter() - t0
    assert smax_sigma_only == smax
    print(f"ours: {t_ours * 1e3:.1f} ms (median of {args.repeats}: {', '.join(f'{r * 1e3:.0f}' for r in runs)} ms; "
          f"largest_singular_value alone {t_sigma * 1e3:.1f} ms)")

    d = entry.to_dense().numpy()
    t0 = time.perf_counter()
    ref_new, ref_smax, ref_rank, steps = reference(w.numpy(), d, args.fn, args.alpha, args.beta)
    t_ref = time.perf_counter() - t0
    print(f"reference: {t_ref:.2f} s (" + ", ".join(f"{k} {v:.2f} s" for k, v in steps.items()) + ")")

    exact = float(singular_values(w)[0])  # float64 Gram eigenvalues: exact to ~1e-15 for the top value
    ours_dense = new.to_dense(torch.float64).numpy()
    err = np.linalg.norm(ours_dense - ref_new.astype(np.float64)) / np.linalg.norm(ref_new.astype(np.float64))
    print(f"sigma_max(W): ours {smax:.12g} (rel. err. vs float64 {abs(smax - exact) / exact:.1e}), "
          f"reference float32 SVD {ref_smax:.9g} (rel. err. {abs(ref_smax - exact) / exact:.1e})")
    print(f"D': rank ours {new.rank}, reference {ref_rank}; relative Frobenius "
          f"difference {err:.2e} (reference is float32 throughout)")
    t0 = time.perf_counter()
    strength, n_evals, target, reached = target_kappa_search(w, entry, 1.25, args.device)
    t_target = time.perf_counter() - t0
    print(f"target-kappa 1.25 x kappa(W) = {target:.4f}: strength {strength:.4f} after {n_evals} kappa evaluations, "
          f"kappa(W + D') {reached:.4f}")
    print(f"target-kappa: {t_target:.2f} s per matrix")
    without_wd = t_ref - steps["svd(W+D)"]
    print(f"speedup without the reference's svd(W+D): {without_wd / t_ours:.0f}x")
    print(f"speedup: {t_ref / t_ours:.0f}")


if __name__ == "__main__":
    main()
