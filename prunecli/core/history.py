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
    # With NAS: the records (`index`) of the requests whose change NAS dropped (their target's norm was too large).
    dropped: list[int] | None = None

    def to_json(self) -> dict[str, Any]:
        dropped = {"nas_dropped": list(self.dropped)} if self.dropped is not None else {}
        return {"op": "edit", "method": self.method, "hparams": self.hparams, "seed": self.seed, **self.provenance,
                **dropped, "requests": list(self.requests)}


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


@dataclass(frozen=True)
class PartialOp:
    """The delta holds the finished part of an `edit` run that has not ended (a periodic checkpoint) or was stopped
    (Ctrl-C, SIGTERM): always the last entry, removed when the run is continued (`edit --resume`, or `--delta` with
    `--start NEXT`), so a continued run writes exactly what an uninterrupted one would.

    The run edits records `start` .. `end - 1` of `requests` (the path as given); `next` is the first record not
    edited yet. `settings` are the run's options that shape the delta besides the edit op's own fields (batch size,
    restraint schedule, previous deltas): a continuation must repeat them."""

    requests: str
    start: int
    next: int
    end: int
    reason: str  # "checkpoint" | "interrupted" | "terminated"
    settings: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"op": "partial", "reason": self.reason, "requests_file": self.requests, "start": self.start,
                "next": self.next, "end": self.end, "settings": self.settings}

    @classmethod
    def from_json(cls, op: dict[str, Any]) -> PartialOp:
        return cls(op["requests_file"], op["start"], op["next"], op["end"], op["reason"], op["settings"])


HistoryOp = EditOp | PruneOp | DiffOp | ImportPeftOp | PartialOp


def entry_problem(op: Any) -> str | None:
    """What is wrong with one history entry read from a file, or None: a JSON object with a string `op`; `edit`
    entries list their requests as objects (read back by `evaluate` and `prune`); a `partial` entry has the fields a
    continuation reads."""
    if not isinstance(op, dict):
        return f"is a {type(op).__name__}, not a JSON object"
    if not isinstance(op.get("op"), str):
        return "has no string 'op'"
    requests = op.get("requests", [])
    if op["op"] == "edit" and (not isinstance(requests, list) or not all(isinstance(r, dict) for r in requests)):
        return "'requests' is not a list of JSON objects"
    if op["op"] == "partial" and not (all(type(op.get(k)) is int for k in ("start", "next", "end"))
                                      and isinstance(op.get("requests_file"), str) and isinstance(op.get("reason"), str)
                                      and isinstance(op.get("settings"), dict)):
        return "a 'partial' entry needs integer start, next, end, strings requests_file and reason, and settings"
    return None
