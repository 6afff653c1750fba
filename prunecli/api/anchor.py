"""`prunecli anchor` as a function: NAS's anchor, the target norm every edit's value is rescaled to (`editors.nas`).

It is measured once per model, method and layer on the unedited model, from rewrites that are not being edited
(CounterFact's training split by default), and kept as a file that `edit --nas` reads, checks and records.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from prunecli.core.atomic import check_output_path
from prunecli.editors.base import EditorInputs
from prunecli.editors.nas import Anchor, drop_at, target_norms
from prunecli.editors.registry import editor_for
from prunecli.errors import PruneCliError
from prunecli.evaluation.data import default_data_dir
from prunecli.models.adapters import resolve_adapter
from prunecli.models.builtin import resolve_model_path
from prunecli.models.loading import load_model
from prunecli.models.options import LoadOptions
from prunecli.progress import Progress, no_progress
from prunecli.requests import load_requests

log = logging.getLogger(__name__)

TRAIN_RECORDS = Path("counterfact") / "counterfact-train.json"
"""The default rewrites, under the data folder: CounterFact cases disjoint from the edit split."""


@dataclass(frozen=True)
class AnchorOptions:
    """What `prunecli anchor` takes: MODEL -o OUTPUT, the method whose value optimisation (and layer) to measure with,
    its hyper-parameters, and which rewrites."""

    model: str | Path
    output: str | Path
    method: str = "alphaedit"
    hparams: Path | None = None
    overrides: tuple[str, ...] = ()
    records: Path | None = None  # None: TRAIN_RECORDS under data_dir
    data_dir: Path = field(default_factory=default_data_dir)
    count: int = 1000  # rewrites sampled (the paper's); all of them when the file has fewer
    seed: int = 0  # of the sample
    load: LoadOptions = field(default_factory=LoadOptions)
    force: bool = False

    @property
    def records_path(self) -> Path:
        return self.records if self.records is not None else self.data_dir / TRAIN_RECORDS


@dataclass(frozen=True)
class AnchorResult:
    options: AnchorOptions
    anchor: Anchor
    seconds: float

    def to_json(self) -> dict[str, Any]:
        a = self.anchor
        norms = a.norms.double()
        return {"output": str(self.options.output), "model": a.source, **a.to_json(),
                "drop_at": drop_at(a.method), "records": str(self.options.records_path),
                "norm_min": float(norms.min()), "norm_median": float(norms.median()), "norm_max": float(norms.max()),
                "seconds": self.seconds, "seconds_per_record": self.seconds / len(norms)}


def sample(n: int, count: int, seed: int) -> list[int]:
    """`count` of the indices 0..n-1, drawn without replacement with `seed` (all of them, in order, when count >= n)."""
    return list(range(n)) if count >= n else random.Random(seed).sample(range(n), count)


def run_anchor(options: AnchorOptions, progress: Progress = no_progress) -> AnchorResult:
    """Measure the anchor and write it; everything that needs no model is checked before the model loads."""
    o = options
    if o.count < 1:
        raise PruneCliError(f"--count must be at least 1, got {o.count}")
    editor = editor_for(o.method, EditorInputs(o.hparams, tuple(o.overrides)))
    if not editor.nas:
        raise PruneCliError(f"NAS anchors the target values of ROME, MEMIT and AlphaEdit, not {o.method}")
    records = o.records_path
    check_output_path(Path(o.output), o.force, is_dir=False, inputs=[
        ("model", resolve_model_path(str(o.model))), ("records file", records), ("hyper-parameter file", o.hparams)])
    everything = load_requests(records)
    picked = sample(len(everything), o.count, o.seed)
    requests = [everything[i] for i in picked]

    model, tokenizer, base = load_model(o.model, o.load)
    model.requires_grad_(False)
    adapter = resolve_adapter(model)
    hp = editor.resolve_hparams(model, adapter, log.info)
    layer, site = editor.value_site(adapter, hp)
    log.info(f"measuring {o.method}'s target norms at layer {layer} on {len(requests)} rewrites of {records}")
    per_group = max(1, hp.value_batch_rows // 2)  # a bare prompt and a KL prompt per rewrite
    norms: list[torch.Tensor] = []
    started = time.perf_counter()
    with progress("anchor (rewrites)", len(requests)) as task, progress("  value optimisation (steps)") as steps:
        for start in range(0, len(requests), per_group):
            group = requests[start:start + per_group]
            norms.append(target_norms(model, tokenizer, adapter, layer, site, group, hp, steps))
            task.advance(len(group))
    seconds = time.perf_counter() - started
    weight = base.canonical(adapter.weight_name(layer))
    settings = {"hparams": hp.to_json(), "records": str(records), "count": len(requests), "seed": o.seed,
                "indices": picked}
    anchor = Anchor(torch.cat(norms), layer, weight, base.fingerprint(weight), o.method, settings,
                    adapter.model_type, str(base.path))
    anchor.save(o.output, o.force)
    return AnchorResult(o, anchor, seconds)
