"""Spectra numerics against dense float64 references: the Gram fast path, exact mode, delta spectra and W + D."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from prunecli.core.artifacts import DELTA, is_artifact
from prunecli.core.checkpoint import Checkpoint
from prunecli.core.delta import Delta, DeltaEntry
from prunecli.core.inspection import checkpoint_candidates, checkpoint_reports, delta_reports, delta_singular_values
from prunecli.core.selection import select_names
from prunecli.core.spectra import (
    FLOAT32_TOLERANCE,
    PATH_GRAM32,
    PATH_GRAM64,
    Float32Attempts,
    SpectrumStats,
    _gram_upper,
    float32_kappa_limit,
    matrix_stats,
    numerical_rank,
    singular_values,
    spectrum,
)
from prunecli.errors import PruneCliError, PruneCliWarning

EPS64 = torch.finfo(torch.float64).eps


def _with_spectrum(s: torch.Tensor, m: int, n: int, seed: int = 0) -> torch.Tensor:
    """A float64 m x n matrix with singular values `s` (descending, len min(m, n)) and random singular vectors."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, len(s), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=torch.float64))
    return (u * s) @ v.T


@pytest.mark.parametrize("shape", [(40, 150), (150, 40), (64, 64), (1, 9), (9, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_path_matches_float64_svd(shape: tuple[int, int], dtype: torch.dtype) -> None:
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    ref = torch.linalg.svdvals(w.double())
    fast = singular_values(w)
    assert fast.dtype == torch.float64 and fast.shape == (min(shape),)
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=0.0)
    torch.testing.assert_close(singular_values(w, exact=True), ref, rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("kappa", [1e2, 1e4, 1e5])
def test_fast_path_sigma_min_error_is_within_eps_kappa_squared(kappa: float) -> None:
    s = torch.logspace(0, -math.log10(kappa), 48, dtype=torch.float64)
    w = _with_spectrum(s, 48, 200)
    ref = torch.linalg.svdvals(w)  # the matrix as actually rounded, not the intended s
    rel = abs(float(singular_values(w)[-1]) - float(ref[-1])) / float(ref[-1])
    assert rel <= 10 * EPS64 * kappa**2
    if kappa <= 1e4:
        assert rel < 1e-6


def test_exact_mode_is_accurate_where_the_fast_path_is_not() -> None:
    kappa = 1e8
    w = _with_spectrum(torch.logspace(0, -8, 30, dtype=torch.float64), 30, 90, seed=3)
    ref = float(torch.linalg.svdvals(w)[-1])
    assert abs(float(singular_values(w, exact=True)[-1]) - ref) / ref < 1e-6
    fast = matrix_stats(w)
    assert not math.isclose(fast.kappa, kappa, rel_tol=1e-2)  # eps64 * kappa^2 >> 1: why --exact exists


def _spread(kind: str, k: int, kappa: float) -> torch.Tensor:
    """k singular values from 1 down to 1/kappa: evenly spaced, geometric, or one small value below a flat rest."""
    if kind == "linear":
        return torch.linspace(1.0, 1.0 / kappa, k, dtype=torch.float64)
    if kind == "geometric":
        return torch.logspace(0.0, -math.log10(kappa), k, dtype=torch.float64)
    return torch.cat([torch.ones(k - 1, dtype=torch.float64), torch.tensor([1.0 / kappa], dtype=torch.float64)])


@pytest.mark.parametrize("shape", [(64, 256), (640, 256)])  # short side 64 and 256, both orientations
@pytest.mark.parametrize("kind", ["linear", "geometric", "isolated"])
@pytest.mark.parametrize("side", [0.95, 1.05])  # kappa just below / just above the switch
def test_float32_guard_on_both_sides_of_the_switch(shape: tuple[int, int], kind: str, side: float) -> None:
    m = min(shape)
    kappa = side * float32_kappa_limit(m)
    w = _with_spectrum(_spread(kind, m, kappa), *shape, seed=m).float()
    ref = torch.linalg.svdvals(w.double())  # exact SVD of the matrix as stored
    got, path = spectrum(w, precision="float32")
    rel = float(((got - ref).abs() / ref).max())
    if side < 1:
        assert path == PATH_GRAM32
        assert rel <= FLOAT32_TOLERANCE
        assert rel > 1e-8  # a float32 result indeed: the tolerance is what it has to meet
    else:
        assert path == PATH_GRAM64
        assert rel < 1e-10


@pytest.mark.parametrize("kappa", [1e3, 1e5])
def test_float32_path_falls_back_where_float32_would_be_wrong(kappa: float) -> None:
    w = _with_spectrum(_spread("geometric", 64, kappa), 64, 200, seed=5).float()
    ref = torch.linalg.svdvals(w.double())
    raw = torch.linalg.eigvalsh(_gram_upper(w, torch.device("cpu"), dtype=torch.float32), UPLO="U")
    unguarded = raw.double().clamp_min(0.0).sqrt().flip(0)
    assert float(((unguarded - ref).abs() / ref).max()) > FLOAT32_TOLERANCE  # what the guard protects from
    got, path = spectrum(w, precision="float32")
    assert path == PATH_GRAM64
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_float32_path_on_well_conditioned_stored_dtypes(dtype: torch.dtype) -> None:
    w = (torch.randn(96, 400, generator=torch.Generator().manual_seed(6)) / 20).to(dtype)  # kappa about 3
    ref = torch.linalg.svdvals(w.double())
    got, path = spectrum(w, precision="float32")
    assert path == PATH_GRAM32
    assert float(((got - ref).abs() / ref).max()) <= FLOAT32_TOLERANCE
    # float64 input is never narrowed; widening 16-bit values to float32 first changes nothing on the float64 path
    assert spectrum(w.double(), precision="float32")[1] == PATH_GRAM64
    assert torch.equal(singular_values(w), singular_values(w.float()))


def test_float32_kappa_limit_shrinks_with_the_size() -> None:
    limits = [float32_kappa_limit(m) for m in (64, 256, 2048, 4096)]
    assert limits == sorted(limits, reverse=True)
    assert 4.0 < limits[2] < 8.0  # 2048: random 5632 x 2048 MLP weights (kappa about 4) are kept


def test_float32_attempts_give_up_per_shape() -> None:
    attempts = Float32Attempts(give_up_after=2)
    for accepted in (False, True, False):  # an accepted attempt resets the count
        attempts.record((8, 4), accepted)
    assert attempts.worth_trying((8, 4))
    attempts.record((8, 4), False)
    assert not attempts.worth_trying((8, 4)) and attempts.worth_trying((4, 8))
    bad = _with_spectrum(_spread("geometric", 8, 1e4), 8, 20).float()
    good = torch.randn(8, 20, generator=torch.Generator().manual_seed(7))
    run = Float32Attempts()
    assert [spectrum(x, precision="float32", attempts=run)[1] for x in (bad, bad, good)] == [PATH_GRAM64] * 3
    assert spectrum(good.T.contiguous(), precision="float32", attempts=run)[1] == PATH_GRAM32  # another shape


@pytest.mark.parametrize("shape", [(20, 300), (300, 20)])
def test_chunked_upper_gram_equals_dense_gram(shape: tuple[int, int]) -> None:
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    x = w.double() if shape[0] <= shape[1] else w.double().T
    g = _gram_upper(w, torch.device("cpu"), chunk_elements=7 * 20)  # 7 columns per chunk, uneven last chunk
    torch.testing.assert_close(g.triu(), (x @ x.T).triu(), rtol=1e-12, atol=1e-12)


def test_stats_and_rank() -> None:
    s = torch.tensor([4.0, 2.0, 1.0, 0.0], dtype=torch.float64)
    st = SpectrumStats.from_singular_values(s)
    assert st.sigma_max == 4.0 and st.sigma_min == 0.0 and st.kappa == math.inf
    assert st.fro == pytest.approx(math.sqrt(21)) and st.stable_rank == pytest.approx(21 / 16)
    a, b = torch.randn(30, 3), torch.randn(50, 3)
    assert numerical_rank(singular_values(a @ b.T), (30, 50)) == 3
    assert numerical_rank(torch.zeros(4, dtype=torch.float64), (4, 4)) == 0


@pytest.mark.parametrize("rank", [1, 3])
def test_factored_delta_singular_values_match_dense_svd(rank: int) -> None:
    g = torch.Generator().manual_seed(4)
    entry = DeltaEntry.lowrank(torch.randn(70, rank, generator=g), torch.randn(40, rank, generator=g), "out_in")
    ref = torch.linalg.svdvals(entry.to_dense(torch.float64))
    s = delta_singular_values(entry)
    assert s.shape == (rank,)
    torch.testing.assert_close(s, ref[:rank], rtol=1e-10, atol=0.0)
    assert float(ref[rank:].max()) < 1e-10 * float(ref[0])  # the dense SVD agrees that the rest is zero
    dense = DeltaEntry.from_dense(entry.to_dense(), "out_in")
    torch.testing.assert_close(delta_singular_values(dense, exact=True)[:rank], ref[:rank], rtol=1e-6, atol=0.0)
    report = next(delta_reports(Delta({"w": entry}, {"w": "x"}), ["w"], top_k=2))
    assert report.spectrum_stats.rank == rank and len(report.spectrum_stats.top_singular_values) == min(2, rank)
    assert report.spectrum_stats.fro == pytest.approx(float(torch.linalg.norm(ref)), rel=1e-10)


def _rank2_delta(ckpt: Checkpoint, names: list[str], seed: int = 0) -> Delta:
    g = torch.Generator().manual_seed(seed)
    delta = Delta.for_base(ckpt)
    for name in names:
        rows, cols = ckpt.info(name).shape
        out, inp = (rows, cols) if ckpt.layout(name) == "out_in" else (cols, rows)
        delta.add(name, DeltaEntry.lowrank(3 * torch.randn(out, 2, generator=g), torch.randn(inp, 2, generator=g),
                                           ckpt.layout(name)), ckpt)
    return delta


@pytest.mark.parametrize("family,names", [
    ("gpt2", ["transformer.h.1.attn.c_proj.weight", "transformer.h.2.mlp.c_fc.weight"]),  # Conv1D [in, out]
    ("llama", ["model.layers.0.self_attn.o_proj.weight", "model.layers.1.mlp.down_proj.weight"]),
])
@pytest.mark.parametrize("exact", [False, True])
def test_edited_stats_match_dense_reference(family: str, names: list[str], exact: bool, request) -> None:
    ckpt = Checkpoint(request.getfixturevalue(f"{family}_dir"))
    delta = _rank2_delta(ckpt, names)
    reports = {r.name: r for r in checkpoint_reports(ckpt, names + [ckpt.matrices()[0]], delta, exact=exact, top_k=3)}
    for name in names:
        stored = ckpt.get(name).double()
        w_math = stored if ckpt.layout(name) == "out_in" else stored.T  # [out, in]
        entry = delta.entries[name]
        edited_ref = torch.linalg.svdvals(w_math + entry.a.double() @ entry.b.double().T)
        base_ref = torch.linalg.svdvals(w_math)
        r = reports[name]
        for got, ref in [(r.stats, base_ref), (r.edited, edited_ref)]:
            assert got is not None
            assert got.sigma_max == pytest.approx(float(ref[0]), rel=1e-9)
            assert got.sigma_min == pytest.approx(float(ref[-1]), rel=1e-7)
            assert got.fro == pytest.approx(float(torch.linalg.norm(ref)), rel=1e-9)
        d_ref = torch.linalg.svdvals(entry.to_dense(torch.float64))
        assert r.delta is not None and r.delta.rank == 2
        assert r.delta.top_singular_values == pytest.approx(d_ref[:2].tolist(), rel=1e-9)
        assert r.delta.n_above_sigma_max == int((d_ref[:2] > base_ref[0]).sum())
    untouched = reports[ckpt.canonical(ckpt.matrices()[0])]
    assert untouched.edited is None and untouched.delta is None


def test_reading_ahead_gives_the_reports_of_reading_in_turn(llama_sharded_bf16_dir: Path) -> None:
    ckpt = Checkpoint(llama_sharded_bf16_dir)
    names = [aliases[0] for aliases in checkpoint_candidates(ckpt)]
    for precision in ("float32", "float64"):
        ahead = list(checkpoint_reports(ckpt, names, keep_spectra=True, precision=precision))
        in_turn = list(checkpoint_reports(ckpt, names, keep_spectra=True, precision=precision, prefetch=False))
        assert [(r.name, r.path, r.stats) for r in ahead] == [(r.name, r.path, r.stats) for r in in_turn]
        assert all(torch.equal(a.spectrum, b.spectrum) for a, b in zip(ahead, in_turn, strict=True))
        assert {r.path for r in ahead} == ({PATH_GRAM32, PATH_GRAM64} if precision == "float32" else {PATH_GRAM64})


def test_a_read_error_in_the_reader_surfaces_after_the_earlier_reports(tmp_path: Path) -> None:
    import threading

    from safetensors.torch import save_file

    from prunecli.core.safetensors_stream import read_header

    path = tmp_path / "m.safetensors"
    save_file({"a": torch.randn(8, 12), "b": torch.randn(8, 12), "c": torch.randn(8, 12)}, str(path))
    ckpt = Checkpoint(path)  # opened (headers checked) while the file was whole
    _, header = read_header(path)
    order = sorted(header, key=lambda n: header[n]["data_offsets"][0])  # the last one's data gets cut off
    path.write_bytes(path.read_bytes()[:-16])
    reports = checkpoint_reports(ckpt, order)
    assert [next(reports).name for _ in range(2)] == order[:2]
    with pytest.raises(PruneCliError, match=f"cannot read {re.escape(str(path))}: .*truncated"):
        next(reports)
    assert not [t for t in threading.enumerate() if t.name == "prunecli-read-ahead"]


def test_delta_for_another_base_is_refused_unless_mismatch_ignored(gpt2_dir: Path) -> None:
    ckpt = Checkpoint(gpt2_dir)
    name = "transformer.h.0.mlp.c_proj.weight"
    delta = _rank2_delta(ckpt, [name])
    delta.fingerprints[name] = "sha256:" + "0" * 64
    with pytest.raises(PruneCliError, match="another base"):
        checkpoint_reports(ckpt, [name], delta)
    with pytest.warns(PruneCliWarning, match="ignore-base-mismatch"):
        assert next(checkpoint_reports(ckpt, [name], delta, ignore_base_mismatch=True)).edited is not None


def test_select_names(gpt2_dir: Path) -> None:
    ckpt = Checkpoint(gpt2_dir)
    cands = checkpoint_candidates(ckpt)
    picked = select_names(cands, ["*.h.3.mlp.*", "transformer.h.0.attn.c_proj.weight"])
    assert picked == ["transformer.h.0.attn.c_proj.weight", "transformer.h.3.mlp.c_fc.weight",
                      "transformer.h.3.mlp.c_proj.weight"]  # file order, no duplicates
    with pytest.raises(PruneCliError, match=r"no tensor matches --select 'nope\*'"):
        select_names(cands, ["nope*"])
    with pytest.raises(PruneCliError, match="not 2-D"):
        select_names(cands, ["*.ln_f.*"], ignored=[n for n in ckpt.names() if len(ckpt.info(n).shape) != 2])


def test_is_delta_file(gpt2_dir: Path, tmp_path: Path) -> None:
    ckpt = Checkpoint(gpt2_dir)
    path = tmp_path / "d.safetensors"
    _rank2_delta(ckpt, ["transformer.h.0.mlp.c_proj.weight"]).save(path)
    assert is_artifact(path, DELTA)
    assert not is_artifact(gpt2_dir / "model.safetensors", DELTA) and not is_artifact(gpt2_dir, DELTA)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    assert not is_artifact(tmp_path / "junk.safetensors", DELTA)
