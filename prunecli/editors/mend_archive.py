"""MEND archives: the trained networks of one base model in one safetensors file, refused for any other base.

Tensors: `nets.<in>x<out>.<param>` (each shape's GradientTransform, normalisation statistics included) and
`edit_lrs` (one per edited weight, in the order of `targets`). Metadata key `prunecli.mend` holds JSON:

    {"format": "prunecli-mend", "version": 1, "config": {"rank": ..., "edit_lr_init": ...},
     "targets": [{"name", "layer", "layout", "shape": [out, in]}, ...],
     "base": {"fingerprints": {name: "sha256:..."}, "model_type": ..., "source": path},
     "training": {...what train-mend did: data, steps, validation history, best step...}}

The networks only make sense for the exact weights whose gradients they were trained on, so loading for editing
checks each edited weight's fingerprint against the base.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from prunecli.core.atomic import atomic_file
from prunecli.core.checkpoint import Checkpoint
from prunecli.editors.mend import MendConfig, MendNetworks, MendTarget
from prunecli.errors import PruneCliError

FORMAT = "prunecli-mend"
VERSION = 1
META_KEY = "prunecli.mend"


def read_safetensors(path: Path, key: str, what: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(JSON metadata under `key`, tensors) of a safetensors file; any problem is one clear line."""
    if not path.is_file():
        raise PruneCliError(f"{what} {path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            raw = (fh.metadata() or {}).get(key)
            if raw is None:
                raise PruneCliError(f"{path} is not a {what} (no {key} metadata)")
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        meta = json.loads(raw)
    except (SafetensorError, OSError, ValueError) as exc:
        raise PruneCliError(f"cannot read {what} {path}: not a valid safetensors file, truncated or corrupt "
                            f"({exc})") from exc
    if not isinstance(meta, dict):
        raise PruneCliError(f"invalid {what} {path}: metadata is not a JSON object")
    return meta, tensors


def write_safetensors_atomic(path: Path, tensors: dict[str, torch.Tensor], key: str, meta: dict[str, Any],
                             force: bool) -> None:
    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                metadata={"format": "pt", key: json.dumps(meta)})
    with atomic_file(path, force) as tmp:
        tmp.write_bytes(data)  # into the file atomic_file made (save_file would recreate it with mode 0600)


def base_fingerprints(base: Checkpoint, targets: list[MendTarget]) -> dict[str, str]:
    return {t.name: base.fingerprint(base.canonical(t.name)) for t in targets}


@dataclass
class MendArchive:
    """Trained networks plus what they were trained for."""

    networks: MendNetworks
    fingerprints: dict[str, str]
    model_type: str | None = None
    source: str | None = None
    training: dict[str, Any] = field(default_factory=dict)

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted({t.layer for t in self.networks.targets}))

    def metadata(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "config": self.networks.config.to_json(),
                "targets": [{"name": t.name, "layer": t.layer, "layout": t.layout,
                             "shape": [t.out_features, t.in_features]} for t in self.networks.targets],
                "base": {"fingerprints": self.fingerprints, "model_type": self.model_type, "source": self.source},
                "training": self.training}

    def save(self, path: Path, force: bool = False) -> None:
        write_safetensors_atomic(Path(path), dict(self.networks.state_dict()), META_KEY, self.metadata(), force)

    @classmethod
    def load(cls, path: str | Path) -> MendArchive:
        path = Path(path)
        meta, tensors = read_safetensors(path, META_KEY, "MEND archive")
        return cls.from_parts(path, meta, tensors)

    @classmethod
    def from_parts(cls, path: Path, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> MendArchive:
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise PruneCliError(f"{path} is not a prunecli MEND archive of version {VERSION} "
                                f"(format {meta.get('format')!r}, version {meta.get('version')!r})")
        try:
            config = MendConfig(**meta["config"])
            targets = [MendTarget(t["name"], int(t["layer"]), t["layout"], int(t["shape"][0]), int(t["shape"][1]))
                       for t in meta["targets"]]
            base = meta["base"]
            networks = MendNetworks(targets, config)
            networks.load_state_dict(tensors)
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise PruneCliError(f"invalid MEND archive {path}: {exc}") from None
        return cls(networks, dict(base["fingerprints"]), base.get("model_type"), base.get("source"),
                   dict(meta.get("training") or {}))

    def check_base(self, base: Checkpoint, archive_path: str | Path) -> None:
        """Refuse a base whose edited weights differ from the ones the networks were trained on."""
        for t in self.networks.targets:
            try:
                name = base.canonical(t.name)
                info = base.info(name)
            except PruneCliError:
                raise PruneCliError(f"MEND archive {archive_path} edits {t.name}, which {base.path} does not "
                                    "have: it was trained for another model") from None
            expected = (t.out_features, t.in_features) if t.layout == "out_in" else (t.in_features, t.out_features)
            if tuple(info.shape) != expected or base.fingerprint(name) != self.fingerprints.get(t.name):
                raise PruneCliError(f"MEND archive {archive_path} was trained for another base model: {t.name} in "
                                    f"{base.path} differs from the weight it was trained on (train one for this "
                                    "model with `prunecli train-mend`)")
