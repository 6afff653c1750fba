"""Spectrum plots: what `inspect --plot` draws comes from the right spectra, and every layout renders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from prunecli.core.checkpoint import Checkpoint
from prunecli.core.delta import Delta, DeltaEntry
from prunecli.core.inspection import checkpoint_reports
from prunecli.core.spectra import singular_values

pytest.importorskip("matplotlib")

from prunecli.plotting import Spectra, plot_spectra


def test_reports_keep_the_delta_spectrum_for_the_plot(llama_dir: Path) -> None:
    ckpt = Checkpoint(llama_dir)
    name = "model.layers.1.mlp.down_proj.weight"
    out, inp = ckpt.info(name).shape
    g = torch.Generator().manual_seed(1)
    a, b = 3 * torch.randn(out, 2, generator=g), torch.randn(inp, 2, generator=g)
    delta = Delta.for_base(ckpt)
    delta.add(name, DeltaEntry.lowrank(a, b, "out_in"), ckpt)
    (report,) = checkpoint_reports(ckpt, [name], delta, keep_spectra=True)
    dense = (a.double() @ b.double().T)
    assert torch.allclose(report.delta_spectrum[:2].double(), torch.linalg.svdvals(dense)[:2], rtol=1e-5)
    w = ckpt.get(name).double()
    assert torch.allclose(report.edited_spectrum.double(), singular_values(w + dense, True, "cpu").double(),
                          rtol=1e-6)


@pytest.mark.parametrize("n, edited", [(3, True), (14, True), (4, False), (25, False)])
def test_every_layout_renders(n: int, edited: bool, tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    items = []
    for i in range(n):
        base = torch.linalg.svdvals(torch.randn(20, 30, generator=g))
        items.append(Spectra(f"model.layers.{i}.mlp.down_proj.weight", base,
                             base + 3 * torch.rand(20, generator=g) if edited else None,
                             torch.cat([5 * torch.rand(2, generator=g), torch.zeros(18)]) if edited else None))
    png = tmp_path / "s.png"
    plot_spectra(items, png, "title")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
