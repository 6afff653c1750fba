"""Load a checkpoint into a transformers model, with deltas added in memory to the touched tensors only.

`evaluate` and `edit` never need a merged checkpoint on disk: the base is loaded once and each delta entry is added
to its parameter (in the parameter's own layout), exactly as `prunecli apply` would write it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from prunecli.core.checkpoint import Checkpoint
from prunecli.core.delta import Delta
from prunecli.errors import PruneCliError
from prunecli.models.default_model import resolve_model_path

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise PruneCliError(f"unknown dtype {name!r}; use one of fp32, bf16, fp16") from None


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present; an unavailable CUDA device is a clear error, not a crash deep in torch."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PruneCliError(f"device {name} requested but CUDA is not available on this machine")
    return dev


def load_model(ref: str | Path, device: str = "cpu", dtype: str = "fp32", delta: Delta | None = None,
               force: bool = False) -> tuple[Any, Any, Checkpoint]:
    """(model in eval mode, tokenizer, base checkpoint) for a model folder or the `smollm2` alias, deltas applied."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bars report the work; "Loading weights" would only clutter
    path = resolve_model_path(str(ref))
    base = Checkpoint(path)
    if not base.is_folder or not base.config:
        raise PruneCliError(f"{path} is not a model folder with config.json (needed to build the model)")
    if delta is not None:
        delta.check_base(base, force)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=parse_dtype(dtype))
    except (OSError, ValueError, KeyError) as exc:
        raise PruneCliError(f"cannot load model from {path}: {exc}") from exc
    model.to(resolve_device(device)).eval()
    if delta is not None:
        add_delta_to_model(model, delta)
    return model, tokenizer, base


@torch.no_grad()
def add_delta_to_model(model: torch.nn.Module, delta: Delta, scale: float = 1.0) -> None:
    """Add `scale * D` to every parameter the delta touches (in fp32, then cast back to the parameter's dtype)."""
    for name, entry in delta.entries.items():
        try:
            param = model.get_parameter(name)
        except AttributeError:
            raise PruneCliError(f"delta targets {name!r}, which the model has no parameter for") from None
        update = entry.stored_update(torch.float32).to(param.device)
        if tuple(update.shape) != tuple(param.shape):
            raise PruneCliError(f"delta entry {name} has shape {list(update.shape)}, parameter is {list(param.shape)}")
        param.copy_((param.float() + scale * update).to(param.dtype))
