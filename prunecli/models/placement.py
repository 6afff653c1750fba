"""Where a loaded model's tensors live, so edits and deltas reach them under accelerate's big-model dispatch.

A model loaded with a device map (`--device-map auto`) may hold a parameter in three ways:
- resident: a real tensor on a GPU or the CPU (written in place, as in a plain load);
- offloaded: the module's parameter is a placeholder on the `meta` device, and accelerate's hook on the module copies
  the value from its weights map (CPU tensors, or tensors read from disk on every forward pass) to the execution
  device just before the module runs. Writing the meta placeholder would silently do nothing, so an update is written
  into the weights map instead: its in-memory state dict takes priority over the disk index, so a disk-offloaded
  weight that is edited becomes one CPU tensor (only the touched tensors are ever materialised) and the files on
  disk (often the user's own checkpoint shards) are never written.
Inputs go to the root hook's execution device (the main device of the map), not to "the first parameter's device",
which is `meta` when the embeddings are offloaded.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import torch

from prunecli.core.delta import add_update
from prunecli.errors import PruneCliError


def input_device(model: torch.nn.Module) -> torch.device:
    """The device inputs should be placed on: a dispatched model's main execution device (its root hook's, else the
    first hooked module's, i.e. the embeddings'), else its parameters'."""
    for module in model.modules():
        for hook in _hooks(module):
            device = getattr(hook, "execution_device", None)
            if device is not None:
                return torch.device(device)
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    raise PruneCliError("every parameter of the model is on the meta device and no accelerate hook says where it "
                        "runs; load it with prunecli's loader")


def _hooks(module: torch.nn.Module) -> list[Any]:
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return list(getattr(hook, "hooks", None) or [hook])  # accelerate's SequentialHook holds several


def _offload_slot(root: torch.nn.Module, name: str) -> tuple[Any, str] | None:
    """(weights map, key inside it) of an offloaded tensor `name` (relative to `root`), or None when it is resident.

    The hook that serves a tensor sits on the module that owns it, or on an ancestor that places its submodules
    (accelerate's preloaded module classes); its weights map is keyed relative to the hooked module.
    """
    parts = name.split(".")
    for depth in range(len(parts) - 1, -1, -1):
        module = root.get_submodule(".".join(parts[:depth]))
        for hook in _hooks(module):
            last = depth == len(parts) - 1
            if getattr(hook, "offload", False) and (last or getattr(hook, "place_submodules", False)):
                if hook.weights_map is None:
                    raise PruneCliError(f"{name} is offloaded but its hook has no weights map")
                return hook.weights_map, ".".join(parts[depth:])
    return None


def _tensor(root: torch.nn.Module, name: str) -> torch.Tensor:
    module_name, _, attr = name.rpartition(".")
    try:
        tensor = getattr(root.get_submodule(module_name), attr)
    except AttributeError:
        raise PruneCliError(f"the model has no tensor {name!r}") from None
    if not isinstance(tensor, torch.Tensor):
        raise PruneCliError(f"{name!r} is not a tensor of the model")
    return tensor


def read_tensor(root: torch.nn.Module, name: str) -> torch.Tensor:
    """The value of parameter `name` (relative to `root`) wherever it lives; do not modify the result in place."""
    tensor = _tensor(root, name)
    if tensor.device.type != "meta":
        return tensor.detach()
    slot = _offload_slot(root, name)
    if slot is None:
        raise PruneCliError(f"{name} is on the meta device and no accelerate hook holds its value")
    weights_map, key = slot
    return weights_map[key]


@torch.no_grad()
def write_tensor(root: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    """Set parameter `name` (relative to `root`) to `value`, cast to the parameter's dtype, wherever it lives."""
    tensor = _tensor(root, name)
    if tuple(value.shape) != tuple(tensor.shape):
        raise PruneCliError(f"cannot set {name}: value has shape {list(value.shape)}, the tensor {list(tensor.shape)}")
    if tensor.device.type != "meta":
        tensor.copy_(value.to(tensor.device, tensor.dtype))
        return
    slot = _offload_slot(root, name)
    if slot is None:
        raise PruneCliError(f"{name} is on the meta device and no accelerate hook holds its value")
    weights_map, key = slot
    # accelerate's PrefixedDataset (prefix + loader) over an OffloadedWeightsLoader (state dict + disk index).
    prefix, store = getattr(weights_map, "prefix", ""), getattr(weights_map, "dataset", weights_map)
    store = getattr(store, "state_dict", store)
    if not isinstance(store, MutableMapping):
        raise PruneCliError(f"cannot update the offloaded tensor {name}: its values are kept in a read-only "
                            f"{type(store).__name__}; load the model without offloading this module")
    store[prefix + key] = value.detach().to("cpu", tensor.dtype).contiguous()


def add_to_tensor(root: torch.nn.Module, name: str, update: torch.Tensor, scale: float = 1.0) -> None:
    """tensor += scale * update, computed in float32 on the touched tensor only, stored in its own dtype; a result
    with NaN/Inf in that dtype is refused (the tensor is left as it was)."""
    current = read_tensor(root, name)
    if tuple(update.shape) != tuple(current.shape):
        raise PruneCliError(f"update of {name} has shape {list(update.shape)}, the tensor is {list(current.shape)}")
    write_tensor(root, name, add_update(name, current, update, scale))
