"""PRUNE restraint: factored results equal a dense float64 reference of the paper's algorithm; sigma_max is accurate
(also where the top singular values are close); the log-F enlargement trap is detected; no low-rank delta is ever
densified."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import RecordingProgress, factors_with_singular_values

import prunecli.core.spectra as spectra
from prunecli.core.checkpoint import Checkpoint
from prunecli.core.delta import Delta, DeltaEntry
from prunecli.core.restraint import BaseSpectra, RestraintSettings, restrain_delta, restrain_entry, restraint_values
from prunecli.core.spectra import largest_singular_value
from prunecli.errors import PruneCliError


# ------------------------------------------------------------------------------------------ dense reference
def reference_prune(w: np.ndarray, d: np.ndarray, fn: str, alpha: float = 1.2, beta: float = 2.0) -> np.ndarray:
    """The paper's algorithm on dense float64 matrices (full SVDs), with the released code's rank truncation."""
    smax = np.linalg.svd(w, compute_uv=False)[0]
    u, s, vt = np.linalg.svd(d, full_matrices=True)
    rank = int((s > s[0] * max(d.shape) * np.finfo(np.float32).eps).sum())  # matrix_rank of a float32 delta
    s = s[:rank].copy()
    big = s > smax
    if fn == "log":
        s[big] = np.log(s[big]) / np.log(alpha) - np.log(smax) / np.log(alpha) + smax
    else:
        s[big] = s[big] / beta + (beta - 1) / beta * smax
    return (u[:, :rank] * s) @ vt[:rank]


def rel_err(x: torch.Tensor | np.ndarray, ref: np.ndarray) -> float:
    x = x.double().numpy() if isinstance(x, torch.Tensor) else x
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def random_base(out: int, inp: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed)) / math.sqrt(inp) * 3


# ---------------------------------------------------------------------------------------------- one entry
@pytest.mark.parametrize("fn", ["log", "linear"])
@pytest.mark.parametrize("dense", [False, True])
def test_restrain_entry_equals_dense_reference(fn: str, dense: bool) -> None:
    w = random_base(40, 90)
    smax = float(torch.linalg.svdvals(w.double())[0])
    a, b = factors_with_singular_values(40, 90, [80.0, 30.0, 9.0, smax * 1.01, 0.5 * smax, 0.01], seed=1)
    entry = DeltaEntry.lowrank(a, b, "out_in")
    if dense:
        entry = DeltaEntry.from_dense(entry.to_dense(), "out_in")
    new, info = restrain_entry(entry, largest_singular_value(w), RestraintSettings(fn, alpha=1.5, beta=2.0))
    ref = reference_prune(w.double().numpy(), entry.to_dense(torch.float64).numpy(), fn, alpha=1.5, beta=2.0)
    assert rel_err(new.to_dense(), ref) < 1e-5
    assert info.n_restrained == 4 and info.rank == 6 and new.layout == "out_in"
    assert new.is_lowrank and new.rank == 6  # rank 6 of 40: factors, whatever the input kind
    assert info.top_before[:3] == pytest.approx([80.0, 30.0, 9.0], rel=1e-5)
    assert all(after < before for before, after in zip(info.top_before[:4], info.top_after[:4]))
    # Values at or below sigma_max are untouched.
    assert info.top_after[4] == pytest.approx(0.5 * smax, rel=1e-6)
    s_new = torch.linalg.svdvals(new.to_dense(torch.float64))
    assert float(s_new[4]) == pytest.approx(0.5 * smax, rel=1e-6) and float(s_new[5]) == pytest.approx(0.01, rel=1e-3)


def test_numerical_rank_truncation_drops_rounding_noise() -> None:
    a, b = factors_with_singular_values(50, 70, [40.0, 5.0, 1e-9], seed=2)
    new, info = restrain_entry(DeltaEntry.lowrank(a, b, "in_out"), 3.0, RestraintSettings("linear"))
    assert info.rank == 2 and new.rank == 2 and new.layout == "in_out"


def test_full_rank_dense_entry_stays_dense() -> None:
    d = torch.randn(20, 30, generator=torch.Generator().manual_seed(3)) * 10
    new, info = restrain_entry(DeltaEntry.from_dense(d, "out_in"), 5.0, RestraintSettings("linear"))
    ref = reference_prune(np.diag([5.0, 1.0]), d.double().numpy(), "linear")
    assert not new.is_lowrank and info.rank == 20 and rel_err(new.to_dense(), ref) < 1e-5


def test_lowrank_entry_is_never_densified(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every SVD restrain_entry runs on a low-rank entry is r x r; nothing converts the factors to dense."""
    real_svd = torch.linalg.svd
    shapes: list[tuple[int, ...]] = []

    def svd(x: torch.Tensor, *args: object, **kwargs: object) -> object:
        shapes.append(tuple(x.shape))
        return real_svd(x, *args, **kwargs)

    def no_dense(*_args: object, **_kwargs: object) -> torch.Tensor:
        raise AssertionError("densified")

    monkeypatch.setattr(torch.linalg, "svd", svd)
    monkeypatch.setattr(DeltaEntry, "to_dense", no_dense)
    gen = torch.Generator().manual_seed(4)
    a, b = torch.randn(3000, 7, generator=gen) * 50, torch.randn(5000, 7, generator=gen)
    new, info = restrain_entry(DeltaEntry.lowrank(a, b, "out_in"), 1.0, RestraintSettings("log", alpha=2.0))
    assert shapes and all(max(s) <= 7 for s in shapes)
    assert new.is_lowrank and new.rank <= 7 and info.n_restrained == 7
    assert new.a is not None and new.b is not None and new.a.shape == (3000, 7) and new.b.shape == (5000, 7)


# ------------------------------------------------------------------------------------------ F and its trap
def test_log_f_enlarges_when_sigma_max_ln_alpha_below_one() -> None:
    smax, alpha = 2.0, 1.2  # 2 * ln 1.2 = 0.36 < 1: F(s) > s just above smax
    s = torch.tensor([40.0, 6.0, 2.5, 2.1, 1.0], dtype=torch.float64)
    f = restraint_values(s, smax, RestraintSettings("log", alpha))
    assert f[1] > s[1] and f[2] > s[2] and f[4] == s[4]
    a, b = factors_with_singular_values(30, 40, s.tolist(), seed=5)
    new, info = restrain_entry(DeltaEntry.lowrank(a, b, "out_in"), smax, RestraintSettings("log", alpha))
    assert info.enlarges and info.n_enlarged == 3 and info.n_restrained == 4 and not info.clamped
    assert info.warning is not None and "log F enlarges" in info.warning and "3 singular value(s)" in info.warning
    assert info.top_after == pytest.approx(f.tolist(), rel=1e-6)  # the paper's formula, as is
    clamped, cinfo = restrain_entry(DeltaEntry.lowrank(a, b, "out_in"), smax,
                                    RestraintSettings("log", alpha, clamp=True))
    assert cinfo.clamped and cinfo.warning is not None and "clamped" in cinfo.warning
    assert cinfo.top_after == pytest.approx(torch.minimum(f, s).tolist(), rel=1e-6)
    assert cinfo.top_after[0] < 40.0 and cinfo.top_after[1:4] == pytest.approx([6.0, 2.5, 2.1], rel=1e-6)
    far, _ = factors_with_singular_values(30, 40, [40.0], seed=5)
    _, finfo = restrain_entry(DeltaEntry.lowrank(far, b[:, :1], "out_in"), smax, RestraintSettings("log", alpha))
    assert finfo.enlarges and finfo.n_enlarged == 0 and "no singular value" in str(finfo.warning)


@pytest.mark.parametrize("fn,alpha", [("log", math.e), ("log", 3.0), ("linear", 1.2)])
def test_no_warning_when_f_only_shrinks(fn: str, alpha: float) -> None:
    smax = 2.0  # 2 * ln(e) = 2 >= 1; linear never enlarges
    s = torch.linspace(2.01, 50, 200, dtype=torch.float64)
    assert bool((restraint_values(s, smax, RestraintSettings(fn, alpha)) < s).all())
    a, b = factors_with_singular_values(30, 40, [50.0, 10.0, 2.05], seed=6)
    _, info = restrain_entry(DeltaEntry.lowrank(a, b, "out_in"), smax, RestraintSettings(fn, alpha))
    assert not info.enlarges and info.n_enlarged == 0 and info.warning is None


@pytest.mark.parametrize("kwargs", [{"alpha": 1.0}, {"alpha": 0.5}, {"alpha": float("nan")}, {"beta": 1.0},
                                    {"beta": float("inf")}, {"fn": "sqrt"}])
def test_bad_parameters_are_user_errors(kwargs: dict[str, object]) -> None:
    a, b = factors_with_singular_values(10, 12, [5.0], seed=7)
    with pytest.raises(PruneCliError):
        restrain_entry(DeltaEntry.lowrank(a, b, "out_in"), 1.0, RestraintSettings(**kwargs))  # type: ignore[arg-type]


@pytest.mark.parametrize("smax", [0.0, float("nan")])
def test_bad_sigma_max_is_a_user_error(smax: float) -> None:
    a, b = factors_with_singular_values(10, 12, [5.0], seed=7)
    with pytest.raises(PruneCliError, match="sigma_max"):
        restrain_entry(DeltaEntry.lowrank(a, b, "out_in"), smax)


# ------------------------------------------------------------------------------------------------ sigma_max
def exact_smax(w: torch.Tensor) -> float:
    return float(torch.linalg.svdvals(w.double())[0])


@pytest.fixture
def krylov_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forbid the float64 fallback, so a test sees the accuracy of Lanczos on the float32 Gram matrix itself."""
    def fail(*_args: object, **_kwargs: object) -> torch.Tensor:
        raise AssertionError("fell back to the float64 Gram eigenvalues")

    monkeypatch.setattr(spectra, "singular_values", fail)


def test_sigma_max_of_gaussian_matrix(krylov_only: None) -> None:
    w = torch.randn(600, 1500, generator=torch.Generator().manual_seed(8))
    s = torch.linalg.svdvals(w.double())
    assert float((s[0] - s[1]) / s[0]) < 0.01  # the hard case: close top singular values
    exact = float(s[0])
    assert largest_singular_value(w) == pytest.approx(exact, rel=1e-10)
    assert largest_singular_value(w.T) == pytest.approx(exact, rel=1e-10)
    assert largest_singular_value(w.T.contiguous()) == pytest.approx(exact, rel=1e-10)


def test_sigma_max_with_nearly_equal_top_values(krylov_only: None) -> None:
    gen = torch.Generator().manual_seed(9)
    u, _ = torch.linalg.qr(torch.randn(400, 400, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(900, 400, generator=gen, dtype=torch.float64))
    s = torch.linspace(1.0, 0.2, 400, dtype=torch.float64) * 10
    s[:3] = torch.tensor([10.0, 10.0 * (1 - 1e-4), 10.0 * (1 - 2e-4)])
    w = ((u * s) @ v.T).float()
    assert largest_singular_value(w) == pytest.approx(exact_smax(w), rel=1e-10)


def test_sigma_max_of_low_rank_and_zero_matrices(krylov_only: None) -> None:
    gen = torch.Generator().manual_seed(10)
    low = torch.randn(500, 12, generator=gen) @ torch.randn(12, 800, generator=gen)
    assert largest_singular_value(low) == pytest.approx(exact_smax(low), rel=1e-10)
    assert largest_singular_value(low.T) == pytest.approx(exact_smax(low), rel=1e-10)
    assert largest_singular_value(torch.zeros(300, 400)) == 0.0


def test_sigma_max_of_small_matrices_is_exact() -> None:
    small = torch.randn(40, 70, generator=torch.Generator().manual_seed(12)).to(torch.bfloat16)
    assert largest_singular_value(small) == pytest.approx(exact_smax(small.float()), rel=1e-12)
    assert largest_singular_value(small.T) == pytest.approx(exact_smax(small.float()), rel=1e-12)


def test_sigma_max_falls_back_when_float32_cannot_resolve() -> None:
    """All singular values equal up to float32 rounding: the exact float64 path answers."""
    q, _ = torch.linalg.qr(torch.randn(900, 900, generator=torch.Generator().manual_seed(13)))
    w = 3 * q[:, :400].T.contiguous()
    assert largest_singular_value(w) == pytest.approx(exact_smax(w), rel=1e-12)


def test_sigma_max_of_trained_like_bf16_matrix(krylov_only: None) -> None:
    """Real weights usually have one outlying top value (fast); bf16 storage is read exactly."""
    gen = torch.Generator().manual_seed(11)
    w = (torch.randn(300, 700, generator=gen) + 0.3 * torch.randn(300, 1, generator=gen)).to(torch.bfloat16)
    assert largest_singular_value(w) == pytest.approx(exact_smax(w.float()), rel=1e-10)


# ------------------------------------------------------------------------------------------- whole deltas
def add_edits(ckpt: Checkpoint, edits: dict[str, list[float]]) -> Delta:
    delta = Delta.for_base(ckpt)
    for i, (name, singular) in enumerate(edits.items()):
        shape = ckpt.info(name).shape
        out, inp = (shape[0], shape[1]) if ckpt.layout(name) == "out_in" else (shape[1], shape[0])
        a, b = factors_with_singular_values(out, inp, singular, seed=20 + i)
        delta.add(name, DeltaEntry.lowrank(a, b, ckpt.layout(name)), ckpt)
    return delta


EDITS = {
    "gpt2": {"transformer.h.1.mlp.c_proj.weight": [60.0, 8.0, 1.0], "transformer.h.2.attn.c_attn.weight": [20.0]},
    "llama": {"model.layers.1.mlp.down_proj.weight": [60.0, 8.0, 1.0],
              "model.layers.2.self_attn.q_proj.weight": [20.0, 0.5]},
}


@pytest.mark.parametrize("fn", ["log", "linear"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_restrain_delta_equals_dense_reference(request: pytest.FixtureRequest, family: str, fn: str) -> None:
    ckpt = Checkpoint(request.getfixturevalue(f"{family}_dir"))
    delta = add_edits(ckpt, EDITS[family])
    seen = RecordingProgress()
    pruned, reports = restrain_delta(delta, ckpt, RestraintSettings(fn, alpha=2.0, beta=3.0), progress=seen)
    assert seen.advances == {"prune": len(EDITS[family])} and [r.name for r in reports] == list(EDITS[family])
    for r in reports:
        entry, new = delta.entries[r.name], pruned.entries[r.name]
        stored = ckpt.get(r.name).double()
        w = stored if entry.layout == "out_in" else stored.T  # GPT-2 Conv1D stores [in, out]
        d = entry.to_dense(torch.float64).numpy()
        ref = reference_prune(w.numpy(), d, fn, alpha=2.0, beta=3.0)
        assert rel_err(new.to_dense(), ref) < 1e-5
        assert new.is_lowrank and new.rank <= entry.rank and new.layout == entry.layout
        assert new.stored_shape == tuple(ckpt.info(r.name).shape)
        assert r.info.sigma_max == pytest.approx(exact_smax(w), rel=1e-10)
        assert r.info.n_restrained == sum(s > r.info.sigma_max for s in EDITS[family][r.name]) >= 1
        assert not r.info.enlarges  # sigma_max ~ 3 and ln 2 * 3 > 1
        for kappa, mat in [(r.kappa_base, w.numpy()), (r.kappa_edited, w.numpy() + d),
                           (r.kappa_pruned, w.numpy() + new.to_dense(torch.float64).numpy())]:
            assert kappa == pytest.approx(np.linalg.cond(mat), rel=1e-6)
        assert r.kappa_pruned is not None and r.kappa_edited is not None and r.kappa_pruned < r.kappa_edited
    op = pruned.history[-1]
    assert op["op"] == "prune" and op["fn"] == fn and op["alpha"] == 2.0 and op["beta"] == 3.0
    assert set(op["per_tensor"]) == set(EDITS[family]) and pruned.fingerprints == delta.fingerprints
    assert pruned.history[:-1] == delta.history


def test_restrain_delta_round_trips_through_a_file(llama_dir: Path, tmp_path: Path) -> None:
    ckpt = Checkpoint(llama_dir)
    pruned, _ = restrain_delta(add_edits(ckpt, EDITS["llama"]), ckpt, RestraintSettings("log"), kappa=False)
    pruned.save(tmp_path / "p.safetensors")
    back = Delta.load(tmp_path / "p.safetensors")
    back.check_base(ckpt)
    assert back.restraints[-1]["per_tensor"] == pruned.history[-1]["per_tensor"]
    for name, e in pruned.entries.items():
        assert torch.equal(back.entries[name].to_dense(), e.to_dense())


def test_restrain_delta_uses_and_fills_the_base_spectra(llama_dir: Path) -> None:
    ckpt = Checkpoint(llama_dir)
    delta = add_edits(ckpt, EDITS["llama"])
    cache = BaseSpectra(ckpt)
    _, reports = restrain_delta(delta, ckpt, RestraintSettings("linear"), kappa=False, spectra=cache)
    assert cache.sigma == {r.name: r.info.sigma_max for r in reports} and reports[0].kappa_base is None
    huge = BaseSpectra(ckpt)
    huge.sigma.update({name: 1e6 for name in delta.entries})  # nothing exceeds it: the delta comes back unchanged
    same, reports = restrain_delta(delta, ckpt, RestraintSettings("linear"), kappa=False, spectra=huge)
    assert all(r.info.n_restrained == 0 for r in reports)
    for name, e in delta.entries.items():
        assert torch.allclose(same.entries[name].to_dense(), e.to_dense(), atol=1e-5)


def test_restrain_delta_rejects_a_non_finite_base(llama_dir: Path, tmp_path: Path) -> None:
    ckpt = Checkpoint(llama_dir)
    name = next(iter(EDITS["llama"]))
    broken = ckpt.get(name).clone()
    broken[0, 0] = float("nan")
    ckpt.write_updated(tmp_path / "nan", {name: broken})
    with pytest.raises(PruneCliError, match="NaN"):
        restrain_delta(add_edits(ckpt, EDITS["llama"]), Checkpoint(tmp_path / "nan"), RestraintSettings("log"))


def test_restrain_delta_rejects_bad_parameters(llama_dir: Path) -> None:
    ckpt = Checkpoint(llama_dir)
    with pytest.raises(PruneCliError, match="alpha"):
        restrain_delta(add_edits(ckpt, EDITS["llama"]), ckpt, RestraintSettings("log", alpha=1.0))


def test_kappa_of_an_ill_conditioned_edit_is_exact(llama_dir: Path) -> None:
    """An update that nearly cancels W's weakest direction: kappa(W + D) ~ 1e8, beyond the Gram fast path."""
    ckpt = Checkpoint(llama_dir)
    name = "model.layers.1.mlp.down_proj.weight"
    w = ckpt.get(name).double()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    a = (-(s[-1] - 1e-7) * u[:, -1:]).float()
    delta = Delta.for_base(ckpt)
    delta.add(name, DeltaEntry.lowrank(a, vh[-1:].T.float(), "out_in"), ckpt)
    _, (report,) = restrain_delta(delta, ckpt, RestraintSettings("log", alpha=2.0))
    edited = w.numpy() + delta.entries[name].to_dense(torch.float64).numpy()
    assert np.linalg.cond(edited) > 1e7 and report.info.n_restrained == 0
    assert report.kappa_edited == pytest.approx(np.linalg.cond(edited), rel=1e-6)
    assert report.kappa_pruned == pytest.approx(report.kappa_edited, rel=1e-6)
