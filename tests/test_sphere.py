"""SPHERE's projection against a dense float64 reference of its equations (core/sphere.py)."""

from __future__ import annotations

import pytest
import torch

from prunecli.core.restraint_functions import SphereSettings
from prunecli.core.sphere import ROW_EPS, principal_directions, project_update
from prunecli.errors import PruneCliError


def _reference_basis(stored: torch.Tensor, eta: float) -> torch.Tensor:
    """The official recipe written out: normalise rows, C = W^T W / n, full eigh of the d x d matrix, the r rule."""
    w = stored.double()
    rows = w / (w.norm(dim=1, keepdim=True) + ROW_EPS)
    values, vectors = torch.linalg.eigh(rows.T @ rows / rows.shape[0])
    order = torch.argsort(values, descending=True)
    values, vectors = values[order], vectors[:, order]
    share = torch.cumsum(values, 0) / values.sum()
    r = 1 + int((share <= eta).sum())
    return vectors[:, :r]


def _projector(u: torch.Tensor) -> torch.Tensor:
    return u @ u.T


def _weight(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # a few strong directions, so the leading eigenvalues hold most of the spectrum, as in trained weights
    return torch.randn(n, 3, generator=g) @ torch.randn(3, d, generator=g) * 3 + torch.randn(n, d, generator=g) * 0.3


@pytest.mark.parametrize("n, d", [(40, 24), (24, 40)])  # both Gram sides
@pytest.mark.parametrize("eta", [0.3, 0.5, 0.8])
def test_basis_spans_the_reference_directions(n: int, d: int, eta: float) -> None:
    w = _weight(n, d, 0)
    got, ref = principal_directions(w, eta), _reference_basis(w, eta)
    assert got.shape == ref.shape and got.shape[1] >= 1
    assert torch.allclose(_projector(got), _projector(ref), atol=1e-8)  # same subspace (signs of vectors are free)
    assert torch.allclose(got.T @ got, torch.eye(got.shape[1], dtype=torch.float64), atol=1e-10)


@pytest.mark.parametrize("layout", ["out_in", "in_out"])
@pytest.mark.parametrize("alpha", [0.5, 0.8, 1.0])
def test_projection_equals_the_dense_stored_update_times_the_complement(layout: str, alpha: float) -> None:
    out, inp, rank = 30, 50, 4
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(out, rank, generator=g), torch.randn(inp, rank, generator=g)
    stored_w = _weight(out, inp, 2) if layout == "out_in" else _weight(inp, out, 2)
    u = principal_directions(stored_w, 0.5)
    new_a, new_b = project_update(a, b, layout, u, alpha)
    d = a.double() @ b.double().T  # math orientation [out, in]
    stored_d = d if layout == "out_in" else d.T
    expected = stored_d @ (torch.eye(stored_d.shape[1], dtype=torch.float64) - alpha * _projector(u))
    got = new_a.double() @ new_b.double().T
    assert torch.allclose(got if layout == "out_in" else got.T, expected, atol=1e-5)
    assert torch.linalg.matrix_rank(got) <= rank and new_a.shape == a.shape and new_b.shape == b.shape
    assert torch.equal(new_a, a) if layout == "out_in" else torch.equal(new_b, b)  # only one factor moves
    if alpha == 1.0:  # nothing of the update is left along the spared directions
        along = (got if layout == "out_in" else got.T) @ u
        assert float(along.abs().max()) < 1e-5


@pytest.mark.parametrize("settings, word", [(SphereSettings(eta=0.0), "--sphere-eta"),
                                            (SphereSettings(eta=1.0), "--sphere-eta"),
                                            (SphereSettings(alpha=1.5), "--sphere-alpha"),
                                            (SphereSettings(basis="initial"), "--sphere-basis")])
def test_out_of_range_settings_are_one_clear_line(settings: SphereSettings, word: str) -> None:
    with pytest.raises(PruneCliError, match=word):
        settings.check()
