"""`compress_dense`: truncated SVD of dense updates, checked against a dense float64 SVD reference."""

from __future__ import annotations

import pytest
import torch

from prunecli.core.lowrank import compress_dense


def low_rank(out: int, inp: int, singular: list[float], seed: int = 0) -> torch.Tensor:
    """An [out, in] float64 matrix with exactly these singular values."""
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(out, len(singular), generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(inp, len(singular), generator=gen, dtype=torch.float64))
    return u @ torch.diag(torch.tensor(singular, dtype=torch.float64)) @ v.T


def best_rank_k(d: torch.Tensor, k: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(d.double(), full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


def test_default_is_numerical_rank() -> None:
    d = low_rank(40, 24, [5.0, 2.0, 0.5]).float()
    c = compress_dense(d, "out_in")
    assert c.rank == 3 and c.entry.is_lowrank and c.entry.rank == 3 and c.rel_error < 1e-6
    torch.testing.assert_close(c.entry.to_dense(), d, atol=1e-5, rtol=0)
    assert c.entry.layout == "out_in" and c.entry.shape == (40, 24)


def test_atol_discounts_known_noise() -> None:
    clean = low_rank(40, 24, [5.0, 2.0])
    noise = 1e-4 * torch.randn(40, 24, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert compress_dense(clean + noise, "out_in").rank == 24  # noise is rank, in float64
    c = compress_dense(clean + noise, "out_in", atol=float(torch.linalg.matrix_norm(noise, 2)))
    assert c.rank == 2 and c.entry.is_lowrank


def test_fixed_rank_is_the_best_approximation() -> None:
    d = low_rank(30, 20, [4.0, 3.0, 1.0, 0.5])
    c = compress_dense(d, "in_out", rank=2)
    assert c.rank == 2 and c.entry.is_lowrank and c.entry.layout == "in_out"
    torch.testing.assert_close(c.entry.to_dense(torch.float64), best_rank_k(d, 2), atol=1e-5, rtol=0)
    assert c.rel_error == pytest.approx((1.0 + 0.25) ** 0.5 / (16 + 9 + 1 + 0.25) ** 0.5, rel=1e-6)
    assert compress_dense(d, "out_in", rank=500).rank == 20  # capped at min(out, in)


def test_tolerance_picks_the_smallest_rank() -> None:
    s = [4.0, 3.0, 1.0, 0.5]
    d = low_rank(30, 20, s)
    total = sum(x * x for x in s)
    errors = [sum(x * x for x in s[k:]) ** 0.5 / total**0.5 for k in range(5)]  # 1, 0.625, 0.218, 0.098, 0
    for tol, k in [(0.7, 1), (0.5, 2), (0.2, 3), (0.05, 4)]:
        c = compress_dense(d, "out_in", tol=tol)
        assert c.rank == k and c.rel_error == pytest.approx(errors[k], rel=1e-6)
        assert c.rel_error <= tol < errors[k - 1]
    exact = compress_dense(d, "out_in", tol=0.0)  # lossless: the rounding noise of the SVD counts too
    assert exact.rel_error == 0.0 and torch.equal(exact.entry.to_dense(torch.float64), d.float().double())


def test_dense_fallback() -> None:
    full = torch.randn(12, 10, generator=torch.Generator().manual_seed(2))
    c = compress_dense(full, "out_in")
    assert c.rank == 10 and not c.entry.is_lowrank and c.rel_error == 0.0
    assert torch.equal(c.entry.dense, full)  # the update itself, not an SVD reconstruction
    c6 = compress_dense(full, "out_in", rank=6)  # 6 > 10 / 2: truncated but stored dense
    assert not c6.entry.is_lowrank
    torch.testing.assert_close(c6.entry.to_dense(torch.float64), best_rank_k(full, 6), atol=1e-5, rtol=0)
    c5 = compress_dense(full, "out_in", rank=5).entry  # 5 <= 10 / 2: factored
    assert c5.is_lowrank and c5.rank == 5


def test_bad_arguments() -> None:
    d = torch.ones(3, 3)
    for kwargs in ({"rank": 1, "tol": 0.1}, {"rank": 0}, {"tol": 1.0}):
        with pytest.raises(ValueError):
            compress_dense(d, "out_in", **kwargs)
    with pytest.raises(ValueError):
        compress_dense(torch.zeros(3, 3), "out_in")
    with pytest.raises(ValueError):
        compress_dense(torch.ones(3), "out_in")
