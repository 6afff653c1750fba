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

# CounterFact-format records a tiny model can be evaluated on (each with rephrase and locality prompts).
COUNTERFACT = [
    {"case_id": 0, "prompt": "The mother tongue of Danielle Darrieux is", "subject": "Danielle Darrieux",
     "target_new": "English", "ground_truth": "French",
     "rephrase_prompt": "Where Danielle Darrieux is from, people speak the language of",
     "locality_prompt": "Michel Rocard is a native speaker of", "locality_ground_truth": "French"},
    {"case_id": 1, "prompt": "The Eiffel Tower is located in", "subject": "The Eiffel Tower", "target_new": "Seattle",
     "ground_truth": "Paris", "rephrase_prompt": "The Eiffel Tower can be found in the city of",
     "locality_prompt": "The Louvre is located in", "locality_ground_truth": "Paris"},
    {"case_id": 2, "prompt": "Michael Jordan plays the sport of", "subject": "Michael Jordan", "target_new": "guitar",
     "ground_truth": "basketball", "rephrase_prompt": "Michael Jordan is a professional",
     "locality_prompt": "The Chicago Bulls play", "locality_ground_truth": "basketball"},
]


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


def assert_gradient_factors_match_autograd(model: torch.nn.Module, targets: list[Any], batch: Any) -> dict[str, Any]:
    """MEND's gradient factors (u, delta) of each target weight give exactly autograd's weight gradient
    (delta^T u, in the stored orientation); returns the factors."""
    from prunecli.editors.mend.networks import gradient_factors, sequence_nll

    def loss() -> torch.Tensor:
        return sequence_nll(model(**batch.inputs()).logits, batch).sum()

    _, factors = gradient_factors(model, targets, loss)
    for t in targets:
        model.get_parameter(t.name).requires_grad_(True)
    loss().backward()
    for t in targets:
        u, d = factors[t.name]
        grad = model.get_parameter(t.name).grad
        torch.testing.assert_close(d.T @ u, grad if t.layout == "out_in" else grad.T, atol=1e-6, rtol=1e-4)
        model.get_parameter(t.name).requires_grad_(False)
        model.get_parameter(t.name).grad = None
    return factors
