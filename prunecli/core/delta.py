"""Delta files: the edits to a checkpoint, kept factored, with everything needed to trust and reproduce them.

A delta maps weight names to updates D (math orientation: D is [out, in], so a Linear layer computes (W + D) x).
Edits are low rank (ROME: rank 1 per fact, MEMIT: rank <= batch), so D is kept as factors A [out, r], B [in, r] with
D = A B^T; sequential composition is concatenation of factors and an SVD is exact and cheap (see `spectra.py`).
Full-checkpoint diffs that are not low rank are stored as dense D.

On disk a delta is a `.safetensors` file with tensors `<name>::A`, `<name>::B` (or `<name>::D`) in float32 and one
JSON document under the `prunecli.delta` metadata key:

    {"format": "prunecli-delta", "version": 1,
     "entries": {name: {"kind": "lowrank"|"dense", "layout": "out_in"|"in_out", "shape": [out, in], "rank": r}},
     "base": {"fingerprints": {name: "sha256:..."}, "model_type": ..., "source": path},
     "history": [{"op": "edit", "method": ..., "hparams": {...}, "requests": [...]}, {"op": "prune", ...}, ...]}

`layout` says how the base stores the weight (`in_out` for GPT-2's Conv1D), so applying a delta never guesses from
shapes (square matrices exist). `history` is the ordered record of every operation that produced the delta.

Extra tensors: state an editing method needs to continue a chain (AlphaEdit and MEMIT with prior_edit_weight: the
keys of the edited facts per layer, see `prunecli.editors.key_memory`; UltraEdit: its running normaliser per weight
shape, see `prunecli.editors.ultraedit`) is stored as float32 tensors `extra::<name>`, listed in the metadata as
`"extras": {name: {"shape": [...]}}` (the key is absent when there are none, so other deltas are unchanged). Extras
are records in edit order, rows along the first dimension (AlphaEdit: one per edit; MEMIT: one per edit and one per
token of its prompt; UltraEdit: one row, the statistics after the delta's last step): composing deltas concatenates
them along that dimension, like factors (an UltraEdit normaliser of two rows is then refused by `edit --delta`).
They never change the weights: apply, inspect, diff and export-lora ignore them; prune and `edit --delta` carry them.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from prunecli.core.artifacts import DELTA, check_digests, parse_document, read_tensors, write_artifact
from prunecli.core.checkpoint import Checkpoint, Layout
from prunecli.core.history import HistoryOp, PartialOp, entry_problem
from prunecli.errors import PruneCliError, PruneCliWarning

FORMAT = DELTA.format
VERSION = DELTA.version
META_KEY = DELTA.key
EXTRA_PREFIX = "extra::"
_LAYOUTS = ("out_in", "in_out")


@dataclass(frozen=True)
class DeltaEntry:
    """The update of one weight: factored (a, b) or dense, in math orientation [out, in]."""

    layout: Layout
    a: torch.Tensor | None = None  # [out, r]
    b: torch.Tensor | None = None  # [in, r]
    dense: torch.Tensor | None = None  # [out, in]

    @classmethod
    def lowrank(cls, a: torch.Tensor, b: torch.Tensor, layout: Layout) -> DeltaEntry:
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
            raise PruneCliError(f"factors must be [out, r] and [in, r], got {list(a.shape)} and {list(b.shape)}")
        return cls(layout=layout, a=a.detach().float().cpu(), b=b.detach().float().cpu())

    @classmethod
    def from_dense(cls, d: torch.Tensor, layout: Layout) -> DeltaEntry:
        return cls(layout=layout, dense=d.detach().float().cpu())

    @property
    def is_lowrank(self) -> bool:
        return self.dense is None

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in) of the update."""
        if self.dense is not None:
            return (self.dense.shape[0], self.dense.shape[1])
        assert self.a is not None and self.b is not None
        return (self.a.shape[0], self.b.shape[0])

    @property
    def rank(self) -> int:
        """Number of factor columns (an upper bound of the rank); min(out, in) for dense entries."""
        return self.a.shape[1] if self.a is not None else min(self.shape)

    @property
    def stored_shape(self) -> tuple[int, int]:
        out, inp = self.shape
        return (out, inp) if self.layout == "out_in" else (inp, out)

    def to_dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """D as a dense [out, in] matrix."""
        if self.dense is not None:
            return self.dense.to(dtype)
        assert self.a is not None and self.b is not None
        return self.a.to(dtype) @ self.b.to(dtype).T

    def stored_update(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """D in the base tensor's stored layout, ready to be added to it."""
        d = self.to_dense(dtype)
        return d if self.layout == "out_in" else d.T

    def tensors(self) -> Iterator[torch.Tensor]:
        yield from (t for t in (self.a, self.b, self.dense) if t is not None)

    def __add__(self, other: DeltaEntry) -> DeltaEntry:
        """Sum of two updates of the same weight: factors are concatenated while that stays cheaper than dense."""
        if other.layout != self.layout or other.shape != self.shape:
            raise PruneCliError(f"cannot add updates of shape {list(other.shape)} ({other.layout}) "
                                f"and {list(self.shape)} ({self.layout})")
        if self.is_lowrank and other.is_lowrank and self.rank + other.rank <= min(self.shape) // 2:
            assert self.a is not None and self.b is not None and other.a is not None and other.b is not None
            return DeltaEntry(self.layout, torch.cat([self.a, other.a], 1), torch.cat([self.b, other.b], 1))
        return DeltaEntry.from_dense(self.to_dense() + other.to_dense(), self.layout)


@dataclass
class Delta:
    """A set of weight updates tied to one base checkpoint, plus the record of how they were made."""

    entries: dict[str, DeltaEntry] = field(default_factory=dict)
    fingerprints: dict[str, str] = field(default_factory=dict)
    model_type: str | None = None
    source: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> float32 [rows, ...]; see module doc

    # ------------------------------------------------------------------------------------------ derived views
    @property
    def requests(self) -> list[dict[str, Any]]:
        """All edit requests, in the order they were applied."""
        return [r for op in self.history if op.get("op") == "edit" for r in op.get("requests", [])]

    @property
    def restraints(self) -> list[dict[str, Any]]:
        return [op for op in self.history if op.get("op") == "prune"]

    @property
    def partial(self) -> PartialOp | None:
        """The marker of an `edit` run that has not finished (`history.PartialOp`), when the history ends with one."""
        last = self.history[-1] if self.history else None
        return PartialOp.from_json(last) if last is not None and last.get("op") == "partial" else None

    # ---------------------------------------------------------------------------------------------- building
    @classmethod
    def for_base(cls, base: Checkpoint) -> Delta:
        """An empty delta bound to `base`; use `add` to put updates in."""
        return cls(model_type=base.model_type, source=str(base.path))

    def add(self, name: str, entry: DeltaEntry, base: Checkpoint) -> None:
        """Add an update of weight `name` (summing with an existing one), recording the base fingerprint."""
        name = base.canonical(name)
        info = base.info(name)
        if entry.layout != base.layout(name):
            raise PruneCliError(f"update of {name} is for layout {entry.layout}, base stores it {base.layout(name)}")
        if tuple(info.shape) != entry.stored_shape:
            raise PruneCliError(f"update of {name} has stored shape {list(entry.stored_shape)}, "
                                f"base tensor is {list(info.shape)}")
        if name not in self.fingerprints:
            self.fingerprints[name] = base.fingerprint(name)
        self.entries[name] = self.entries[name] + entry if name in self.entries else entry

    def compose(self, other: Delta) -> Delta:
        """This delta followed by `other` (same base): factors concatenate, histories append."""
        for name, fp in other.fingerprints.items():
            if name in self.fingerprints and self.fingerprints[name] != fp:
                raise PruneCliError(f"cannot compose deltas made for different bases (tensor {name} differs)")
        entries = dict(self.entries)
        for name, entry in other.entries.items():
            entries[name] = entries[name] + entry if name in entries else entry
        return Delta(entries, {**self.fingerprints, **other.fingerprints}, self.model_type or other.model_type,
                     self.source or other.source, self.history + other.history,
                     _concat_extras(self.extras, other.extras))

    def with_entries(self, entries: dict[str, DeltaEntry], op: HistoryOp) -> Delta:
        """A copy with new entries (e.g. restrained) and `op` appended to the history."""
        return replace(self, entries=entries, history=[*self.history, op.to_json()])

    # ------------------------------------------------------------------------------------------- base checks
    def check_base(self, base: Checkpoint, ignore_mismatch: bool = False) -> list[str]:
        """Fail unless every target exists in `base` with the right shape and the same bytes the delta was computed
        on; returns the tensors whose bytes differ (only ever non-empty with `ignore_mismatch`, which then warns)."""
        differ: list[str] = []
        made_for = (f"; the delta was made for {self.source or 'an unrecorded model'} (model_type "
                    f"{self.model_type or 'unrecorded'})")
        for name, entry in self.entries.items():
            try:
                info = base.info(name)
            except PruneCliError:
                raise PruneCliError(f"delta targets tensor {name!r}, which {base.path} does not have{made_for}"
                                    ) from None
            if tuple(info.shape) != entry.stored_shape:
                raise PruneCliError(f"shape mismatch for {name}: delta {list(entry.stored_shape)}, "
                                    f"base {list(info.shape)} in {base.path}{made_for}")
            if base.fingerprint(name) != self.fingerprints[name]:
                differ.append(name)
        if not differ:
            return differ
        names = ", ".join(differ[:3]) + (f" and {len(differ) - 3} more" if len(differ) > 3 else "")
        if not ignore_mismatch:
            applied = base.applied(differ[0])
            if applied is not None:  # a model `prunecli apply` wrote: most likely these very edits, once more
                what = "this delta" if self._merged_in(base, differ[0]) else "edits"
                raise PruneCliError(f"{base.path} already contains {what} (applied by prunecli: "
                                    f"{', '.join(applied) or 'no file named'}), so its tensor(s) {names} are not the "
                                    f"ones the delta was computed on: use the base it was made for ({self.source})")
            raise PruneCliError(f"delta was made for another base: tensor(s) {names} in {base.path} differ from the "
                                "ones the delta was computed on (use --ignore-base-mismatch to accept it anyway)")
        warnings.warn(PruneCliWarning(f"--ignore-base-mismatch: the delta was computed on other weights than "
                                      f"{base.path} for {len(differ)} tensor(s): {names}"), stacklevel=2)
        return differ

    def _merged_in(self, base: Checkpoint, name: str) -> bool:
        """Whether tensor `name` of `base` is exactly this delta's own base + D as `apply` writes it."""
        try:
            original = Checkpoint(self.source) if self.source is not None else None
            if original is None or original.fingerprint(name) != self.fingerprints[name]:
                return False
            return bool(torch.equal(merged_weight(name, original.get(name), self.entries[name]), base.get(name)))
        except PruneCliError:
            return False

    # ------------------------------------------------------------------------------------------------- files
    def metadata(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "entries": {n: {"kind": "lowrank" if e.is_lowrank else "dense", "layout": e.layout,
                            "shape": list(e.shape), "rank": e.rank} for n, e in self.entries.items()},
            "base": {"fingerprints": self.fingerprints, "model_type": self.model_type, "source": self.source},
            "history": self.history,
            **({"extras": {n: {"shape": list(t.shape)} for n, t in self.extras.items()}} if self.extras else {}),
        }

    def save(self, path: str | os.PathLike[str], force: bool = False) -> None:
        """Write atomically; a delta without entries is refused (an empty safetensors file helps nobody)."""
        if not self.entries:
            raise PruneCliError("refusing to write an empty delta (no tensor was changed)")
        tensors: dict[str, torch.Tensor] = {}
        for name, e in self.entries.items():
            _check_finite(name, e, "refusing to write")
            suffixes = ("A", "B") if e.is_lowrank else ("D",)
            tensors.update({f"{name}::{suffix}": t.float() for suffix, t in zip(suffixes, e.tensors())})
        for name, t in self.extras.items():
            if not bool(torch.isfinite(t).all()):
                raise PruneCliError(f"refusing to write: extra tensor {name} contains NaN or Inf values")
            tensors[EXTRA_PREFIX + name] = t.float()
        write_artifact(path, DELTA, self.metadata(), tensors, force)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Delta:
        """Read and validate a delta file; problems are one clear line (PEFT adapter folders too:
        `delta_files.load_delta`)."""
        metadata, tensors = read_tensors(path, "delta")
        return cls._from_parts(Path(path), metadata.get(META_KEY), tensors)

    @classmethod
    def _from_parts(cls, path: Path, raw_meta: str | None, tensors: dict[str, torch.Tensor]) -> Delta:
        def bad(msg: str) -> PruneCliError:
            return PruneCliError(f"invalid delta {path}: {msg}")

        meta = parse_document(path, DELTA, raw_meta)
        specs = meta.get("entries")
        base = meta.get("base") or {}
        fingerprints = base.get("fingerprints") if isinstance(base, dict) else None
        history = meta.get("history") or []
        if not isinstance(fingerprints, dict):
            raise bad("base fingerprints are missing")
        if not isinstance(history, list):
            raise bad("history is not a list")
        for i, op in enumerate(history):
            problem = entry_problem(op)
            if problem:
                raise bad(f"history entry {i}: {problem}")
        if not isinstance(specs, dict) or not specs:
            raise bad("it lists no entries")
        entries: dict[str, DeltaEntry] = {}
        used: set[str] = set()
        for name, spec in specs.items():
            if not isinstance(spec, dict):
                raise bad(f"entry {name}: description is not a JSON object")
            kind, layout, shape = spec.get("kind"), spec.get("layout"), spec.get("shape")
            if layout not in _LAYOUTS:
                raise bad(f"entry {name}: layout {layout!r} is not one of {_LAYOUTS}")
            if not isinstance(fingerprints.get(name), str):
                raise bad(f"entry {name} has no base fingerprint")
            keys = [f"{name}::A", f"{name}::B"] if kind == "lowrank" else [f"{name}::D"] if kind == "dense" else None
            if keys is None:
                raise bad(f"entry {name}: kind {kind!r} is not 'lowrank' or 'dense'")
            missing = [k for k in keys if k not in tensors]
            if missing:
                raise bad(f"entry {name}: tensor(s) {', '.join(missing)} missing")
            used.update(keys)
            parts = [tensors[k].float() for k in keys]
            entry = DeltaEntry(layout, *parts) if kind == "lowrank" else DeltaEntry(layout, dense=parts[0])
            try:
                ok = list(entry.shape) == list(shape) and (kind == "dense" or entry.a.shape[1] == entry.b.shape[1])  # type: ignore[union-attr]
            except (AttributeError, IndexError, TypeError):
                ok = False
            if not ok or any(t.ndim != 2 for t in parts):
                raise bad(f"entry {name}: tensor shapes {[list(t.shape) for t in parts]} do not match {shape}")
            _check_finite(name, entry, f"invalid delta {path}:")
            entries[name] = entry
        extras = _read_extras(meta.get("extras"), tensors, bad)
        used.update(EXTRA_PREFIX + n for n in extras)
        extra = sorted(set(tensors) - used)
        if extra:
            raise bad(f"tensor(s) not described by the metadata: {', '.join(extra[:3])}")
        check_digests(path, DELTA, meta, tensors)  # after the structural checks, whose messages say more
        return cls(entries, {n: fingerprints[n] for n in entries}, base.get("model_type"), base.get("source"), history,
                   extras)


def _read_extras(specs: Any, tensors: dict[str, torch.Tensor],
                 bad: Callable[[str], PruneCliError]) -> dict[str, torch.Tensor]:
    """The extra tensors the metadata lists, checked against it (shape, finite values)."""
    if specs is None:
        return {}
    if not isinstance(specs, dict):
        raise bad("extras is not a JSON object")
    extras = {}
    for name, spec in specs.items():
        t = tensors.get(EXTRA_PREFIX + name)
        if t is None:
            raise bad(f"extra tensor {EXTRA_PREFIX + name} missing")
        if not isinstance(spec, dict) or list(t.shape) != spec.get("shape"):
            raise bad(f"extra tensor {name}: shape {list(t.shape)} does not match the metadata")
        if not bool(torch.isfinite(t).all()):
            raise bad(f"extra tensor {name} contains NaN or Inf values")
        extras[name] = t.float()
    return extras


def _concat_extras(first: dict[str, torch.Tensor], then: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-edit records of two deltas applied in order: rows of the same name are stacked, first's on top."""
    out = dict(first)
    for name, t in then.items():
        if name in out:
            if out[name].shape[1:] != t.shape[1:]:
                raise PruneCliError(f"cannot compose deltas: extra tensor {name} has rows of shape "
                                    f"{list(out[name].shape[1:])} and {list(t.shape[1:])}")
            out[name] = torch.cat([out[name], t])
        else:
            out[name] = t
    return out


def add_update(name: str, weight: torch.Tensor, update: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """weight + scale * update, summed in float32 (float64 for float64 weights) and rounded once to the weight's
    dtype, which is where bf16/fp16 overflow; a result with NaN/Inf is refused, naming the tensor."""
    if not weight.is_floating_point():
        raise PruneCliError(f"cannot add a delta to {name}: it is stored as {weight.dtype}, not floating point")
    compute = torch.float64 if weight.dtype == torch.float64 else torch.float32
    result = (weight.to(compute) + scale * update.to(weight.device, compute)).to(weight.dtype)
    check_finite_weight(name, result, weight)
    return result


def merged_weight(name: str, weight: torch.Tensor, entry: DeltaEntry) -> torch.Tensor:
    """W + D for a stored weight, as `apply` writes it: summed in float32 (float64 for float64 weights), rounded once
    to the weight's dtype."""
    compute = torch.float64 if weight.dtype == torch.float64 else torch.float32
    return add_update(name, weight, entry.stored_update(compute))


def check_finite_weight(name: str, result: torch.Tensor, weight: torch.Tensor) -> None:
    """Refuse W + D (in W's dtype) with NaN/Inf: such a weight is never written or used."""
    if bool(torch.isfinite(result).all()):
        return
    why = ("the base weight itself holds NaN/Inf" if not bool(torch.isfinite(weight).all())
           else f"the update overflows {str(weight.dtype).removeprefix('torch.')} or holds NaN/Inf")
    raise PruneCliError(f"refusing to use {name}: W + D has NaN/Inf values ({why})")


def _check_finite(name: str, entry: DeltaEntry, prefix: str) -> None:
    for t in entry.tensors():
        if not bool(torch.isfinite(t).all()):
            raise PruneCliError(f"{prefix} entry {name} contains NaN or Inf values")
