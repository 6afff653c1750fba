"""The entries of a delta's history: one typed record per operation that produced the delta, built here only.

In the file each entry is a JSON object with a string `op` (`Delta.history`, a list of such objects, so files from
any version stay readable). Writers build entries with these classes, so an `edit` entry always has the same
fields whoever made it; readers use `entry_problem` to validate what they load.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class EditOp:
    """A run of edits: the method, its hyper-parameters (JSON form), the prefix seed, where statistics/tokenizer came
    from (`provenance`), and the requests in the order they were applied."""

    method: str
    hparams: dict[str, Any]
    seed: int
    requests: list[dict[str, Any]]
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"op": "edit", "method": self.method, "hparams": self.hparams, "seed": self.seed, **self.provenance,
                "requests": list(self.requests)}


@dataclass(frozen=True)
class PruneOp:
    """A restraint of the accumulated delta: its settings (`RestraintSettings.to_json()`: fn, its parameters, clamp,
    target_kappa), why it ran (`trigger`/`after_edits` while editing, `select` for a partial `prune`), and per tensor
    what it did."""

    settings: dict[str, Any]
    per_tensor: dict[str, dict[str, Any]]
    context: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"op": "prune", **self.settings, **self.context, "per_tensor": self.per_tensor}


@dataclass(frozen=True)
class DiffOp:
    """A delta recovered from two checkpoints: the edited one, the rank/tolerance asked for, per tensor the rank kept
    and its error, and the changed tensors that are not matrices (not in the delta)."""

    edited: str
    rank: int | None
    tol: float | None
    per_tensor: dict[str, dict[str, Any]]
    skipped: dict[str, str]

    def to_json(self) -> dict[str, Any]:
        return {"op": "diff", "edited": self.edited, "rank": self.rank, "tol": self.tol,
                "per_tensor": self.per_tensor, "skipped": self.skipped}


@dataclass(frozen=True)
class ImportPeftOp:
    """A delta read from a PEFT LoRA adapter folder."""

    adapter: str

    def to_json(self) -> dict[str, Any]:
        return {"op": "import-peft", "adapter": self.adapter}


HistoryOp = EditOp | PruneOp | DiffOp | ImportPeftOp


def entry_problem(op: Any) -> str | None:
    """What is wrong with one history entry read from a file, or None: a JSON object with a string `op`; `edit`
    entries list their requests as objects (read back by `evaluate` and `prune`)."""
    if not isinstance(op, dict):
        return f"is a {type(op).__name__}, not a JSON object"
    if not isinstance(op.get("op"), str):
        return "has no string 'op'"
    requests = op.get("requests", [])
    if op["op"] == "edit" and (not isinstance(requests, list) or not all(isinstance(r, dict) for r in requests)):
        return "'requests' is not a list of JSON objects"
    return None
