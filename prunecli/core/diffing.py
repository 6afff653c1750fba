"""Recover a delta from two full checkpoints: D = edited - base for every changed matrix, compressed by truncated SVD.

This turns an edited model saved by any tool (EasyEdit, a notebook, a fine-tune) into a prunecli delta that can be
inspected, restrained and applied like one made by `prunecli edit`. Deltas hold 2-D updates only: changed tensors of
another rank (biases, norms) are listed in the history as skipped, never silently dropped.

The default rank is the numerical rank of D, with singular values below the rounding noise of the edited checkpoint's
storage (unit roundoff of its dtype times ||edited||_F, a bound on the spectral norm of the rounding error) counted
as zero: a rank-1 edit saved in bf16 then diffs to rank 1, not to a full-rank matrix of rounding noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from prunecli.core.checkpoint import Checkpoint
from prunecli.core.delta import Delta
from prunecli.core.history import DiffOp
from prunecli.core.lowrank import compress_dense
from prunecli.core.selection import select_names, tensor_aliases
from prunecli.errors import PruneCliError
from prunecli.progress import Progress, no_progress, track


def canonical_names(ckpt: Checkpoint) -> dict[str, str]:
    """Canonical name -> stored name, for every stored tensor."""
    return {ckpt.canonical(n): n for n in ckpt.names()}


def _check_comparable(base: Checkpoint, edited: Checkpoint, compared: list[str], everything: bool) -> None:
    base_names, edited_names = canonical_names(base), canonical_names(edited)
    if everything:
        only_base = [n for n in base_names if n not in edited_names]
        only_edited = [n for n in edited_names if n not in base_names]
        for names, where, other in ((only_base, base, edited), (only_edited, edited, base)):
            if names:
                raise PruneCliError(f"the checkpoints hold different tensors: {len(names)} in {where.path} only "
                                    f"(e.g. {', '.join(names[:3])}), none in {other.path}; use --select to compare "
                                    "the common ones")
    for name in compared:
        if name not in edited_names:
            raise PruneCliError(f"tensor {name} is in {base.path} but not in {edited.path}")
        b, e = base.info(name).shape, edited.info(name).shape
        if b != e:
            raise PruneCliError(f"tensor {name} has shape {list(b)} in {base.path} but {list(e)} in {edited.path}")


_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _same_bytes(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Bitwise equality (NaN payloads and -0.0 included), compared as integers of the element's width (fast)."""
    if x.dtype != y.dtype or x.shape != y.shape:
        return False
    as_int = _SAME_SIZE_INT.get(x.element_size())
    if as_int is None:
        x, y, as_int = x.contiguous().reshape(-1), y.contiguous().reshape(-1), torch.uint8
    return torch.equal(x.contiguous().view(as_int), y.contiguous().view(as_int))


def _storage_noise(t: torch.Tensor) -> float:
    """Bound on the spectral norm of the error made when a matrix is rounded to `t`'s dtype: u * ||t||_F."""
    if not t.is_floating_point():
        return 0.0
    return torch.finfo(t.dtype).eps / 2 * float(torch.linalg.vector_norm(t.double()))


def diff_checkpoints(base: Checkpoint, edited: Checkpoint, select: Sequence[str] = (), rank: int | None = None,
                     tol: float | None = None, progress: Progress = no_progress) -> Delta:
    """The delta that turns `base` into `edited` on the selected matrices (see the module docstring for the rank).

    `rank` keeps that many singular directions per matrix, `tol` the fewest whose relative Frobenius error is <= tol.
    Matrices whose rank stays above min(out, in) / 2 are stored dense. The history op records, per tensor, the rank
    kept and the relative error, and the changed tensors that were skipped because they are not 2-D.
    """
    if rank is not None and tol is not None:
        raise PruneCliError("give a rank or a tolerance, not both")
    names = canonical_names(base)
    compared = select_names([tensor_aliases(c, s, base.model_type) for c, s in names.items()], select)
    _check_comparable(base, edited, compared, everything=not select)
    delta = Delta.for_base(base)
    per_tensor: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    for name in track(progress, compared, "diff"):
        w, e = base.get(name), edited.get(name)
        if _same_bytes(w, e):
            continue
        if w.ndim != 2:
            skipped[name] = f"{w.ndim}-D tensor changed; deltas hold 2-D updates only"
            continue
        if not (w.is_floating_point() and e.is_floating_point()):
            raise PruneCliError(f"tensor {name} differs but is not floating point ({w.dtype}, {e.dtype})")
        d = e.double() - w.double()
        if not bool(torch.isfinite(d).all()):
            raise PruneCliError(f"tensor {name}: the difference has NaN or Inf values (check both checkpoints)")
        if not bool(d.any()):
            continue  # equal values stored differently (-0.0 vs 0.0, another dtype)
        layout = base.layout(name)
        c = compress_dense(d if layout == "out_in" else d.T, layout, rank, tol, atol=_storage_noise(e))
        delta.add(name, c.entry, base)
        per_tensor[name] = {"rank": c.rank, "rel_error": c.rel_error, "kind": "lowrank" if c.entry.is_lowrank
                            else "dense", "shape": list(c.entry.shape)}
    if not delta.entries:
        hint = f" (only tensors that are not 2-D changed: {', '.join(skipped)})" if skipped else ""
        raise PruneCliError(f"no selected matrix differs between {base.path} and {edited.path}: nothing to write{hint}")
    return delta.with_entries(delta.entries, DiffOp(str(edited.path), rank, tol, per_tensor, skipped))
