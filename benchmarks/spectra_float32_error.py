"""Measure the two errors of the float32 Gram path that `spectra.float32_error_factor` bounds, in units of
eps32 * lambda_max, next to the bound c(m) the accuracy guard uses.

  gram:  the float32 Gram product of a stored matrix (bf16 and float32, n = 4m columns), eigenvalues taken in
         float64, against the float64 Gram matrix's;
  eig:   float32 eigvalsh of an m x m symmetric matrix with a chosen spectrum (rounded to float32), against float64
         eigvalsh of the same rounded matrix.

Spectra: linear (1 .. 1/16), geometric (1 .. 1e-3), Marchenko-Pastur (a 3:1 Gaussian's squared singular values) and
flat (1 + 1 %). Each row prints the largest |computed - reference| eigenvalue error over the spectrum; the guard is
sound while a row's gram and eig errors add up to less than c(m), and keeps its margin while they stay below c(m) / 3.

Usage: python benchmarks/spectra_float32_error.py [--sizes 256 512 1024 2048 4096] [--threads 1] [--eig-only]
"""

from __future__ import annotations

import argparse
import math

import torch

from prunecli.core.spectra import _gram_upper, float32_error_factor

EPS32 = torch.finfo(torch.float32).eps


def spectra(m: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    return {"linear": torch.linspace(1, 1 / 16, m, dtype=torch.float64),
            "geometric": torch.logspace(0, -3, m, dtype=torch.float64),
            "marchenko-pastur": torch.linalg.svdvals(torch.randn(m, 3 * m, generator=g, dtype=torch.float64)) ** 2,
            "flat": 1 + 0.01 * torch.rand(m, generator=g, dtype=torch.float64)}


def eig_error(m: int, lam: torch.Tensor, g: torch.Generator) -> float:
    q, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    sym = ((q * (lam / lam.max())) @ q.T).float()
    ref = torch.linalg.eigvalsh(sym.double())
    return float((torch.linalg.eigvalsh(sym).double() - ref).abs().max() / ref.max()) / EPS32


def gram_error(m: int, lam: torch.Tensor, dtype: torch.dtype, g: torch.Generator) -> float:
    n = 4 * m
    u, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, m, generator=g, dtype=torch.float64))
    w = ((u * (lam / lam.max()).sqrt()) @ v.T).to(dtype)
    cpu = torch.device("cpu")
    ref = torch.linalg.eigvalsh(_gram_upper(w, cpu), UPLO="U")
    got = torch.linalg.eigvalsh(_gram_upper(w, cpu, dtype=torch.float32).double(), UPLO="U")
    return float((got - ref).abs().max() / ref.max()) / EPS32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--eig-only", action="store_true", help="skip the Gram products (the slow part at large m)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{'m':>5} {'spectrum':>17} {'gram bf16':>10} {'gram fp32':>10} {'eig':>8} {'m/20':>7} {'c(m)':>7}")
    for m in args.sizes:
        g = torch.Generator().manual_seed(m)
        for name, lam in spectra(m, g).items():
            grams = [math.nan] * 2 if args.eig_only else [gram_error(m, lam, dt, g) for dt in (torch.bfloat16,
                                                                                                  torch.float32)]
            print(f"{m:>5} {name:>17} {grams[0]:>10.2f} {grams[1]:>10.2f} {eig_error(m, lam, g):>8.1f} "
                  f"{m / 20:>7.1f} {float32_error_factor(m):>7.1f}", flush=True)


if __name__ == "__main__":
    main()
