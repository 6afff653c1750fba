"""`prunecli train-mend` as a function: train MEND's networks for one base model into an archive."""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from prunecli.core.atomic import check_output_path
from prunecli.editors.mend.networks import default_layers, mlp_targets
from prunecli.editors.mend.train import TrainConfig, TrainResult, train_mend
from prunecli.errors import PruneCliWarning
from prunecli.models.adapters import resolve_adapter
from prunecli.models.builtin import resolve_model_path
from prunecli.models.loading import load_model
from prunecli.models.options import LoadOptions
from prunecli.progress import Progress, no_progress
from prunecli.requests import load_requests


@dataclass(frozen=True)
class TrainMendOptions:
    """What `prunecli train-mend` takes: MODEL, the records, the archive to write, the training configuration
    (its `layers` None: the last three), a time budget and whether to resume from ARCHIVE.ckpt."""

    model: str | Path
    requests: Path
    output: Path
    config: TrainConfig = field(default_factory=lambda: TrainConfig(()))
    start: int = 0
    limit: int | None = None
    max_minutes: float | None = None
    resume: bool = False
    load: LoadOptions = field(default_factory=LoadOptions)
    force: bool = False

    @property
    def checkpoint(self) -> Path:
        return Path(str(self.output) + ".ckpt")


@dataclass(frozen=True)
class TrainMendResult:
    options: TrainMendOptions
    model: str
    weights: list[str]
    result: TrainResult

    def to_json(self) -> dict[str, Any]:
        r, state = self.result, self.result.state
        return {"output": str(self.options.output), "checkpoint": str(self.options.checkpoint), "model": self.model,
                "weights": self.weights, "train_records": r.n_train, "val_records": r.n_val, "steps": state.step,
                "best_step": state.best_step, "best_val_loss": state.best_val, "stopped": state.stopped,
                "seconds": state.seconds, "edit_lrs": [float(x) for x in r.archive.networks.edit_lrs.detach()],
                "validation": state.history}


def run_train_mend(options: TrainMendOptions, progress: Progress = no_progress) -> TrainMendResult:
    """Train (or resume), keep the best networks, write the archive; a checkpoint goes next to it after every
    validation."""
    o = options
    inputs = [("model", resolve_model_path(str(o.model))), ("training data", o.requests)]
    check_output_path(o.output, o.force or o.resume, is_dir=False, inputs=inputs)
    if not o.resume:
        check_output_path(o.checkpoint, o.force, is_dir=False, inputs=inputs)
    skipped: list[tuple[int, str]] = []  # (record, where and why)
    records = load_requests(o.requests, o.start, o.limit, lambda i, why: skipped.append((i, why)))
    if skipped:
        warnings.warn(PruneCliWarning(f"skipped {len(skipped)} unusable record(s) of {o.requests} (first: "
                                      f"{skipped[0][1]}); training on {len(records)}"), stacklevel=2)
    data_info = {"path": str(o.requests), "start": o.start, "records": len(records),
                 "skipped": [i for i, _ in skipped],
                 "sha256": hashlib.sha256(Path(o.requests).read_bytes()).hexdigest()}
    model, tokenizer, base = load_model(o.model, o.load, dtype="fp32")
    adapter = resolve_adapter(model)
    layers = o.config.layers or tuple(default_layers(adapter.num_layers))
    for layer in layers:
        adapter.check_layer(layer)
    targets = mlp_targets(adapter, layers)
    config = replace(o.config, layers=tuple(layers))
    torch.manual_seed(config.seed)
    result = train_mend(model, tokenizer, base, targets, records, config, o.checkpoint, o.resume, data_info,
                        None if o.max_minutes is None else o.max_minutes * 60, progress)
    result.archive.save(o.output, force=True)
    return TrainMendResult(o, str(base.path), [t.name for t in targets], result)
