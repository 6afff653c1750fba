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

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from prunecli.core.artifacts import MEND_ARCHIVE, read_artifact, write_artifact
from prunecli.core.checkpoint import Checkpoint
from prunecli.editors.mend.networks import MendConfig, MendNetworks, MendTarget
from prunecli.errors import PruneCliError


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
        return {"config": self.networks.config.to_json(),
                "targets": [{"name": t.name, "layer": t.layer, "layout": t.layout,
                             "shape": [t.out_features, t.in_features]} for t in self.networks.targets],
                "base": {"fingerprints": self.fingerprints, "model_type": self.model_type, "source": self.source},
                "training": self.training}

    def save(self, path: Path, force: bool = False) -> None:
        write_artifact(path, MEND_ARCHIVE, self.metadata(), dict(self.networks.state_dict()), force)

    @classmethod
    def load(cls, path: str | Path) -> MendArchive:
        path = Path(path)
        meta, tensors = read_artifact(path, MEND_ARCHIVE)
        return cls.from_parts(path, meta, tensors)

    @classmethod
    def from_parts(cls, path: Path, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> MendArchive:
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
