"""`LoadOptions`: how a model is built, the one set of loading flags every command and the evaluation runner share.

Kept apart from `models.loading` (which needs torch) so the CLI can declare its options without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class LoadOptions:
    """Where and how a model is loaded (`models.loading.load_model`).

    `device` is auto (a GPU when there is one), cpu, cuda, cuda:N or mps; `device_map` (auto, balanced, ... or one
    device) spreads a model too big for one device with accelerate, bounded per device by `max_memory`
    ("0=20GiB,cpu=60GiB") and spilling to `offload_folder`, and replaces `device`. `tokenizer` replaces the model
    folder's own (a folder, a tokenizer.json file or a built-in name); `allow_pickle` admits .bin/.pt weights."""

    device: str = "auto"
    dtype: str = "fp32"
    device_map: str | None = None
    max_memory: str | None = None
    offload_folder: Path | None = None
    tokenizer: str | None = None
    allow_pickle: bool = False
