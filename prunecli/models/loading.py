"""Load a checkpoint into a transformers model, with deltas added in memory to the touched tensors only.

`evaluate` and `edit` never need a merged checkpoint on disk: the base is loaded once and each delta entry is added
to its parameter (in the parameter's own layout), exactly as `prunecli apply` would write it.

Models larger than one device load with accelerate's big-model support (`device_map`, `max_memory`,
`offload_folder`, passed to `from_pretrained`); deltas and edits then reach offloaded parameters through
`prunecli.models.placement`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from prunecli.core.checkpoint import Checkpoint
from prunecli.core.delta import Delta
from prunecli.errors import PruneCliError
from prunecli.models.builtin import resolve_model_path
from prunecli.models.options import LoadOptions
from prunecli.models.placement import add_to_tensor
from prunecli.models.tokenizer import check_fits, embedding_rows, load_tokenizer, tokenizer_source

log = logging.getLogger(__name__)

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


DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def parse_device_map(text: str) -> str:
    """A placement strategy accelerate understands, or one device for the whole model (checked to exist)."""
    if text in DEVICE_MAP_STRATEGIES:
        return text
    try:
        return str(resolve_device(text))
    except RuntimeError:
        raise PruneCliError(f"--device-map {text!r}: use one of {', '.join(DEVICE_MAP_STRATEGIES)} or a device "
                            "(cpu, cuda:N)") from None


def parse_max_memory(text: str) -> dict[int | str, int | str]:
    """`0=20GiB,1=20GiB,cpu=60GiB` -> {0: "20GiB", 1: "20GiB", "cpu": "60GiB"} (accelerate's max_memory form)."""
    from accelerate.utils import convert_file_size_to_int

    out: dict[int | str, int | str] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        key, sep, size = (x.strip() for x in item.partition("="))
        if not sep or not key or not size:
            raise PruneCliError(f"--max-memory item {item!r}: write DEVICE=SIZE, e.g. 0=20GiB or cpu=60GiB")
        index = key.lower().removeprefix("cuda:")
        if index.isdigit():
            device: int | str = int(index)
        elif key.lower() in ("cpu", "mps"):
            device = key.lower()
        else:
            raise PruneCliError(f"--max-memory device {key!r}: use a GPU index (0, 1, ...), cpu or mps")
        value: int | str = int(size) if size.isdigit() else size
        try:
            convert_file_size_to_int(value)
        except ValueError:
            raise PruneCliError(f"--max-memory size {size!r}: use bytes or a unit, e.g. 20GiB or 500MB") from None
        out[device] = value
    if not out:
        raise PruneCliError("--max-memory is empty; e.g. 0=20GiB,cpu=60GiB")
    return out


def placement_kwargs(device_map: str | None, max_memory: str | dict[int | str, int | str] | None,
                     offload_folder: str | Path | None) -> dict[str, Any]:
    """`from_pretrained` keyword arguments for accelerate's big-model loading (empty without a device map)."""
    if device_map is None:
        if max_memory is not None or offload_folder is not None:
            raise PruneCliError("--max-memory and --offload-folder need --device-map (e.g. --device-map auto)")
        return {}
    kwargs: dict[str, Any] = {"device_map": parse_device_map(device_map)}
    if max_memory is not None:
        kwargs["max_memory"] = parse_max_memory(max_memory) if isinstance(max_memory, str) else dict(max_memory)
    if offload_folder is not None:
        kwargs["offload_folder"] = str(offload_folder)
    return kwargs


def load_model(ref: str | Path, options: LoadOptions = LoadOptions(), /,
               **changes: Any) -> tuple[Any, Any, Checkpoint]:
    """(model in eval mode, tokenizer, base checkpoint) for a model folder or a built-in name, loaded as `options`
    say (keyword `changes` replace single fields: `load_model(path, dtype="bf16")`). Deltas are added by the caller
    (`add_delta_to_model`) after whatever it needs of the unedited model (prefixes, references).

    The tokenizer is the model folder's own, or `options.tokenizer` (a folder, a tokenizer.json file or a built-in
    name); it is checked before the weights load (it must encode text) and after (its ids must fit the embedding),
    so a folder without a usable tokenizer fails with one line that says so, never later with a message about
    something else. With `device_map` accelerate places the model across GPUs, CPU and disk and `device` is not used.
    What loads, and how long it took, goes to the `prunecli` log (the CLI shows it: loading takes seconds).
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    if not isinstance(options, LoadOptions):  # the older signature load_model(ref, device, dtype)
        raise TypeError(f"load_model(ref, options): options must be LoadOptions, got {options!r}; "
                        "pass single settings as keywords, e.g. load_model(ref, device='cpu')")
    options = replace(options, **changes)
    hf_logging.disable_progress_bar()  # our own progress bars report the work; "Loading weights" would only clutter
    placement = placement_kwargs(options.device_map, options.max_memory, options.offload_folder)
    path = resolve_model_path(str(ref))
    base = Checkpoint(path, allow_pickle=options.allow_pickle)  # pickle weights are refused unless opted in
    if not base.is_folder or not base.config:
        raise PruneCliError(f"{path} is not a model folder with config.json (needed to build the model)")
    target = None if placement else resolve_device(options.device)
    source = tokenizer_source(path, options.tokenizer)
    tok = load_tokenizer(source)
    log.info(f"loading {ref}" + (f" ({path})" if str(ref) != str(path) else ""))
    started = time.perf_counter()
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=parse_dtype(options.dtype), **placement)
    except (OSError, ValueError, KeyError) as exc:
        raise PruneCliError(f"cannot load model from {path}: {exc}") from exc
    check_fits(tok, source, embedding_rows(model), str(path))
    if target is not None:
        model.to(target)
    model.eval()
    log.info(f"loaded {ref} in {time.perf_counter() - started:.1f} s")
    return model, tok, base


def add_delta_to_model(model: torch.nn.Module, delta: Delta, scale: float = 1.0) -> None:
    """Add `scale * D` to every parameter the delta touches (in fp32, then cast back to the parameter's dtype),
    including parameters accelerate keeps offloaded on the CPU or disk."""
    for name, entry in delta.entries.items():
        try:
            param = model.get_parameter(name)
        except AttributeError:
            raise PruneCliError(f"delta targets {name!r}, which the model has no parameter for") from None
        update = entry.stored_update(torch.float32)
        if tuple(update.shape) != tuple(param.shape):
            raise PruneCliError(f"delta entry {name} has shape {list(update.shape)}, parameter is {list(param.shape)}")
        add_to_tensor(model, name, update, scale)
