"""Architecture adapters: where the edited MLP projection of layer i lives in a *loaded* model.

Editors need, per layer, the projection that maps keys (MLP hidden activations) to values (its output, added to the
residual stream), its weight name and storage layout, and the decoder layer itself (MEMIT reads the residual stream at
its output). Everything is resolved from the model object: `config.model_type` picks the projection's attribute path,
the layer stack is found by walking the module tree (so nested stacks such as Gemma 3's
`model.language_model.layers` work), and the layout comes from the projection's class (GPT-2's Conv1D stores
[in, out]; nn.Linear stores [out, in]), never from a folder name or a tensor shape. Weights are read and updated
through `prunecli.models.placement`, so a projection that accelerate keeps offloaded (a `meta` placeholder) is edited
for real; edit arithmetic happens on the model's input device.

Blocks are not all "residual += mlp(x)": Gemma-2/3 normalise the MLP output (`post_feedforward_layernorm`) before
adding it, so a shift of the projection output is not the same shift of the residual stream. The adapter names that
norm (`mlp_output_norm`), and editors that target the residual stream (MEMIT) map their targets through it
(`prunecli.editors.residual`). A layer that has such a norm while its model type is not known to have one is refused:
editing it as a plain residual block would fail silently.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prunecli.core.checkpoint import Layout
from prunecli.errors import PruneCliError
from prunecli.models.placement import add_to_tensor, input_device, read_tensor


@dataclass(frozen=True)
class Family:
    """A group of model types that share the MLP output projection's attribute path inside a decoder layer."""

    name: str
    model_types: tuple[str, ...]
    projection: str


# Model types whose decoder layer adds norm(mlp(x)) to the residual stream, and the norm's attribute in the layer.
POST_MLP_NORMS: dict[str, str] = {"gemma2": "post_feedforward_layernorm", "gemma3": "post_feedforward_layernorm",
                                  "gemma3_text": "post_feedforward_layernorm"}
_POST_MLP_NORM_NAMES = ("post_feedforward_layernorm", "post_mlp_layernorm", "post_mlp_norm")


FAMILIES: tuple[Family, ...] = (
    Family("gpt2", ("gpt2",), "mlp.c_proj"),
    Family("llama", ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text"),
           "mlp.down_proj"),
    Family("gptj", ("gptj",), "mlp.fc_out"),
    Family("gpt_neox", ("gpt_neox",), "mlp.dense_4h_to_h"),
)


def supported_model_types() -> list[str]:
    return [t for f in FAMILIES for t in f.model_types]


def _family_for(model_type: str | None) -> Family:
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise PruneCliError(f"unsupported architecture {model_type!r}: editing supports the model types "
                        f"{', '.join(supported_model_types())}")


def _layout_of(module: torch.nn.Module) -> Layout:
    if isinstance(module, torch.nn.Linear):
        return "out_in"
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # transformers.pytorch_utils.Conv1D: y = x W + b
        return "in_out"
    raise PruneCliError(f"the MLP output projection is a {type(module).__name__}, expected nn.Linear or Conv1D")


def _find_layer_stack(model: torch.nn.Module, projection: str) -> tuple[str, torch.nn.ModuleList]:
    """The one ModuleList whose every element has the projection: the decoder layers (vision towers have none)."""
    found: list[tuple[str, torch.nn.ModuleList]] = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            try:
                for layer in module:
                    layer.get_submodule(projection)
            except AttributeError:
                continue
            found.append((name, module))
    if len(found) != 1:
        what = "no" if not found else f"{len(found)} ({', '.join(n for n, _ in found)})"
        raise PruneCliError(f"cannot locate the decoder layers: {what} layer stacks have a {projection} module")
    return found[0]


@dataclass(frozen=True)
class ModelAdapter:
    """Access to the edited projection of each decoder layer of one loaded model."""

    family: str
    model_type: str
    stack_name: str  # e.g. "model.layers" or "transformer.h"
    projection_path: str  # inside a layer, e.g. "mlp.down_proj"
    layout: Layout
    layers: torch.nn.ModuleList
    device: torch.device  # where the model's inputs go; editors compute there
    mlp_output_norm_path: str | None = None  # inside a layer: the norm applied to the MLP output (Gemma-2/3)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.num_layers:
            raise PruneCliError(f"layer {layer} is out of range: the model has {self.num_layers} layers "
                                f"(0-{self.num_layers - 1})")

    def layer_module(self, layer: int) -> torch.nn.Module:
        """The decoder layer: its output is the residual stream after layer `layer`."""
        self.check_layer(layer)
        return self.layers[layer]

    def projection(self, layer: int) -> torch.nn.Module:
        """The edited projection: its input is the key, its output the value."""
        return self.layer_module(layer).get_submodule(self.projection_path)

    def mlp_output_norm(self, layer: int) -> torch.nn.Module | None:
        """The norm between the MLP output and the residual add, or None for "residual += mlp(x)" blocks."""
        if self.mlp_output_norm_path is None:
            return None
        return self.layer_module(layer).get_submodule(self.mlp_output_norm_path)

    def module_name(self, layer: int) -> str:
        self.check_layer(layer)
        return f"{self.stack_name}.{layer}.{self.projection_path}"

    def weight_name(self, layer: int) -> str:
        """The weight's parameter name (what delta files and checkpoints call it)."""
        return f"{self.module_name(layer)}.weight"

    def weight(self, layer: int) -> torch.nn.Parameter:
        return self.projection(layer).weight

    def weight_matrix(self, layer: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight in math orientation [out, in] (value = W key), as a detached copy in `dtype` on `device`
        (offloaded weights included)."""
        w = read_tensor(self.layer_module(layer), f"{self.projection_path}.weight").to(self.device, dtype, copy=True)
        return w if self.layout == "out_in" else w.T

    def key_size(self, layer: int) -> int:
        """Dimension of the keys (the projection's input features)."""
        shape = self.weight(layer).shape
        return int(shape[1] if self.layout == "out_in" else shape[0])

    def value_size(self, layer: int) -> int:
        """Dimension of the values (the projection's output features = the residual stream width)."""
        shape = self.weight(layer).shape
        return int(shape[0] if self.layout == "out_in" else shape[1])

    def add_update(self, layer: int, update: torch.Tensor) -> None:
        """Add a math-orientation [out, in] update to the weight (in fp32, cast back to the weight's dtype)."""
        stored = update if self.layout == "out_in" else update.T
        add_to_tensor(self.layer_module(layer), f"{self.projection_path}.weight", stored)


def resolve_adapter(model: torch.nn.Module) -> ModelAdapter:
    """The adapter of a loaded transformers model; unsupported architectures get one clear error."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    family = _family_for(model_type)
    stack_name, layers = _find_layer_stack(model, family.projection)
    layout = _layout_of(layers[0].get_submodule(family.projection))
    assert model_type is not None
    norm = POST_MLP_NORMS.get(model_type)
    unexpected = [n for n in _POST_MLP_NORM_NAMES if n != norm and hasattr(layers[0], n)]
    if unexpected:
        raise PruneCliError(f"model type {model_type!r} has a norm on the MLP output ({unexpected[0]}) that prunecli "
                            f"does not know for it; editing it as a plain residual block would be wrong")
    if norm is not None and not hasattr(layers[0], norm):
        raise PruneCliError(f"model type {model_type!r} should have {norm} in its decoder layers, but it has not")
    return ModelAdapter(family.name, model_type, stack_name, family.projection, layout, layers, input_device(model),
                        norm)
