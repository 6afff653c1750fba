"""Assertions and fixtures-by-function that several test modules share (one definition each)."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from prunecli.core.checkpoint import Checkpoint
from prunecli.core.delta import Delta, DeltaEntry
from prunecli.errors import PruneCliError


def one_line_error(excinfo: pytest.ExceptionInfo[PruneCliError], *words: str) -> None:
    """The error is one non-empty line containing every word."""
    msg = str(excinfo.value)
    assert "\n" not in msg and msg
    for w in words:
        assert w in msg, msg


def assert_clean_failure(result: Any, *words: str, absent: Path | None = None) -> None:
    """Exit 1, exactly one `error:` line on stderr, no traceback, and (if given) no output left behind."""
    assert result.exit_code == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.output
    for w in words:
        assert w in lines[0], lines[0]
    if absent is not None:
        assert not absent.exists()
        assert not [p for p in absent.parent.iterdir() if p.name.startswith(f".{absent.name}.")]  # no temp files


def _orthonormal_bases(out: int, inp: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    u, _ = torch.linalg.qr(torch.randn(out, k, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(inp, k, generator=gen, dtype=torch.float64))
    return u, v


def with_singular_values(out: int, inp: int, singular: list[float], seed: int) -> torch.Tensor:
    """A dense float64 [out, inp] matrix with exactly these singular values."""
    u, v = _orthonormal_bases(out, inp, len(singular), torch.Generator().manual_seed(seed))
    return u @ torch.diag(torch.tensor(singular, dtype=torch.float64)) @ v.T


def factors_with_singular_values(out: int, inp: int, singular: list[float],
                                 seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (a, b) of an update with exactly these singular values (a b^T, not orthogonal factors)."""
    gen = torch.Generator().manual_seed(seed)
    u, v = _orthonormal_bases(out, inp, len(singular), gen)
    mix = torch.randn(len(singular), len(singular), generator=gen, dtype=torch.float64) + 3 * torch.eye(len(singular))
    a = u * torch.tensor(singular, dtype=torch.float64)
    return (a @ mix).float(), (v @ torch.linalg.inv(mix).T).float()


def random_delta(model_dir: Path, name: str, path: Path, seed: int, scale: float = 1.0,
                 requests: list[dict] | None = None) -> Path:
    """A rank-2 random delta on one matrix (a scaled by `scale`), saved to `path`; with `requests`, an edit op
    recording them."""
    ck = Checkpoint(model_dir)
    shape = ck.info(name).shape
    out, inp = shape if ck.layout(name) == "out_in" else (shape[1], shape[0])
    gen = torch.Generator().manual_seed(seed)
    delta = Delta.for_base(ck)
    delta.add(name, DeltaEntry.lowrank(torch.randn(out, 2, generator=gen) * scale, torch.randn(inp, 2, generator=gen),
                                       ck.layout(name)), ck)
    if requests is not None:
        delta.history.append({"op": "edit", "method": "test", "requests": requests})
    delta.save(path)
    return path


class RecordingProgress:
    """A `prunecli.progress.Progress` that counts each task's advances and keeps logged lines."""

    def __init__(self) -> None:
        self.advances: Counter[str] = Counter()
        self.logged: list[str] = []

    @contextlib.contextmanager
    def __call__(self, description: str, total: float | None = None) -> Iterator[Any]:
        recorder = self

        class Task:
            def advance(self, n: float = 1, **fields: str) -> None:
                recorder.advances[description] += n

            def update(self, *, completed: float | None = None, total: float | None = None, **fields: str) -> None:
                pass

            def log(self, message: str, *, warning: bool = False) -> None:
                recorder.logged.append(message)

        yield Task()
