"""prunecli's own files (deltas, key statistics, MEND archives and training checkpoints, NAS anchors): one writer,
one reader.

Each is a safetensors file whose description is one JSON document under a metadata key of its kind
(`prunecli.delta`, `prunecli.stats`, ...), with `"format"` and `"version"` fields naming the kind and its version.
Writing goes through `atomic_file` (nothing half-written is ever left under the final name, and the file follows
the umask: safetensors' `save_file` would create it 0600) and the streaming writer (one tensor in memory at a time).
Reading checks, as one clear line each, that the file exists, is valid safetensors, is of the expected kind, and
has a version this prunecli reads; what the document and tensors must contain is the kind's own business.

The document records a digest of every stored tensor (`"digests": {tensor name: "sha256:..."}`, over dtype, shape and
bytes), and reading verifies them: a file whose tensors were altered after writing (bit rot, a bad copy, a hand edit
that kept the metadata) is refused with one line naming the tensor instead of being applied. Files written before
digests existed have none and load as before, with no claim made about their content. The digests are a function of
the tensors, so outputs stay byte-for-byte deterministic.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from prunecli.core.atomic import atomic_file
from prunecli.core.safetensors_stream import DTYPE_NAMES, TensorSource, tensor_fingerprint, write_safetensors
from prunecli.core.textio import parse_json
from prunecli.errors import PruneCliError


@dataclass(frozen=True)
class ArtifactKind:
    """One kind of prunecli file: its metadata key, its format name, the newest version, and what messages call it."""

    key: str
    format: str
    version: int
    what: str


DELTA = ArtifactKind("prunecli.delta", "prunecli-delta", 1, "delta")
STATS = ArtifactKind("prunecli.stats", "prunecli-stats", 1, "statistics file")
MEND_ARCHIVE = ArtifactKind("prunecli.mend", "prunecli-mend", 1, "MEND archive")
MEND_CHECKPOINT = ArtifactKind("prunecli.mend_checkpoint", "prunecli-mend-checkpoint", 1, "MEND training checkpoint")
NAS_ANCHOR = ArtifactKind("prunecli.nas_anchor", "prunecli-nas-anchor", 1, "NAS anchor")


def write_artifact(path: str | os.PathLike[str], kind: ArtifactKind, doc: Mapping[str, Any],
                   tensors: Mapping[str, torch.Tensor], force: bool = False) -> None:
    """Write `tensors` and the JSON document {"format", "version", **doc, "digests"} atomically to `path`."""
    sources, digests = [], {}
    for name, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        sources.append(TensorSource(name, DTYPE_NAMES[t.dtype], tuple(t.shape), lambda t=t: t))
        digests[name] = tensor_fingerprint(t)
    meta = {"format": kind.format, "version": kind.version, **doc, "digests": digests}
    with atomic_file(Path(path), force) as tmp:
        write_safetensors(tmp, sources, {"format": "pt", kind.key: json.dumps(meta)})


def read_tensors(path: str | os.PathLike[str], what: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(string metadata, tensors) of any safetensors file; a missing, unreadable or corrupt file is one line."""
    path = Path(path)
    if not path.exists():
        raise PruneCliError(f"{what} {path} does not exist")
    if path.is_dir():
        raise PruneCliError(f"{what} {path} is a directory, not a .safetensors file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            return dict(fh.metadata() or {}), {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError, TypeError) as exc:
        raise PruneCliError(f"cannot read {what} {path}: not a valid safetensors file, truncated or corrupt "
                            f"({exc})") from exc


def read_artifact(path: str | os.PathLike[str], kind: ArtifactKind) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(JSON document, tensors) of a prunecli file of `kind`, checked for its kind and a readable version."""
    metadata, tensors = read_tensors(path, kind.what)
    doc = parse_document(path, kind, metadata.get(kind.key))
    check_digests(path, kind, doc, tensors)
    return doc, tensors


def check_digests(path: str | os.PathLike[str], kind: ArtifactKind, doc: Mapping[str, Any],
                  tensors: Mapping[str, torch.Tensor]) -> None:
    """Verify the tensors against the digests the document recorded when the file was written (a file without
    digests, written before they existed, passes unverified)."""
    digests = doc.get("digests")
    if digests is None:
        return
    if not isinstance(digests, dict):
        raise PruneCliError(f"invalid {kind.what} {path}: digests is not a JSON object")
    for name in sorted(set(digests) ^ set(tensors)):
        where = "is listed in its digests but missing" if name in digests else "has no recorded digest"
        raise PruneCliError(f"invalid {kind.what} {path}: tensor {name} {where} (the file was altered after it was "
                            "written)")
    for name, t in tensors.items():
        if tensor_fingerprint(t) != digests[name]:
            raise PruneCliError(f"invalid {kind.what} {path}: tensor {name} does not match the digest recorded when "
                                "the file was written (altered or corrupted since)")


def parse_document(path: str | os.PathLike[str], kind: ArtifactKind, raw: str | None) -> dict[str, Any]:
    """The JSON document of a file of `kind` from its raw metadata string (None: the file is of another kind)."""
    if raw is None:
        raise PruneCliError(f"{path} is a safetensors file but not a prunecli {kind.what} (no {kind.key} metadata)")
    doc = parse_json(raw, f"invalid {kind.what} {path}: metadata")
    if not isinstance(doc, dict) or doc.get("format") != kind.format:
        found = doc.get("format") if isinstance(doc, dict) else None
        raise PruneCliError(f"invalid {kind.what} {path}: format is {found!r}, expected {kind.format!r}")
    version = doc.get("version")
    if type(version) is not int or not 1 <= version <= kind.version:
        raise PruneCliError(f"invalid {kind.what} {path}: format version {version!r} is not supported (this prunecli "
                            f"reads 1 to {kind.version})")
    return doc


def is_artifact(path: str | os.PathLike[str], kind: ArtifactKind) -> bool:
    """True for a readable .safetensors file that carries `kind`'s metadata (its content is not validated)."""
    p = Path(path)
    if not p.is_file() or p.suffix != ".safetensors":
        return False
    try:
        with safe_open(str(p), framework="pt", device="cpu") as fh:
            return kind.key in (fh.metadata() or {})
    except (SafetensorError, OSError, ValueError, TypeError):
        return False
