"""Architecture adapters: the edited projection, its weight name and layout are resolved from the loaded model."""

from __future__ import annotations

import pytest
import torch

from prunecli.errors import PruneCliError
from prunecli.models.adapters import resolve_adapter
from prunecli.models.loading import load_model


@pytest.mark.parametrize("fixture, family, module, layout", [
    ("gpt2_dir", "gpt2", "transformer.h.2.mlp.c_proj", "in_out"),
    ("llama_dir", "llama", "model.layers.2.mlp.down_proj", "out_in"),
    ("qwen2_dir", "llama", "model.layers.2.mlp.down_proj", "out_in"),
])
def test_resolves_projection_and_layout(request, fixture, family, module, layout):
    path = request.getfixturevalue(fixture)
    model, _, base = load_model(path)
    adapter = resolve_adapter(model)
    assert (adapter.family, adapter.num_layers, adapter.layout) == (family, 4, layout)
    assert adapter.module_name(2) == module
    assert adapter.projection(2) is model.get_submodule(module)
    # The weight name is the checkpoint's, and the checkpoint agrees on the layout.
    assert base.layout(adapter.weight_name(2)) == layout
    assert tuple(adapter.weight_matrix(2).shape) == (adapter.value_size(2), adapter.key_size(2))


@pytest.mark.parametrize("fixture", ["gpt2_dir", "llama_dir"])
def test_add_update_changes_output_by_d_times_key(request, fixture):
    """Math orientation is respected for Conv1D ([in, out]) and Linear ([out, in]): proj(k) moves by D k."""
    model, _, _ = load_model(request.getfixturevalue(fixture))
    adapter = resolve_adapter(model)
    proj = adapter.projection(1)
    torch.manual_seed(0)
    k = torch.randn(adapter.key_size(1))
    d = torch.randn(adapter.value_size(1), adapter.key_size(1))
    with torch.no_grad():
        before = proj(k[None])[0]
        adapter.add_update(1, d)
        after = proj(k[None])[0]
    torch.testing.assert_close(after - before, d @ k, rtol=1e-4, atol=1e-4)


def test_layer_out_of_range(llama_dir):
    model, _, _ = load_model(llama_dir)
    with pytest.raises(PruneCliError, match="out of range: the model has 4 layers"):
        resolve_adapter(model).projection(4)


def test_unsupported_architecture_names_supported_ones():
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=32))
    with pytest.raises(PruneCliError, match="unsupported architecture 'bert'.*gpt2.*llama.*gpt_neox"):
        resolve_adapter(model)


def test_nested_layer_stack_is_found():
    """Gemma 3 style nesting (model.language_model.layers) is found by walking the modules."""
    from tiny_models import build_tiny_model

    inner = build_tiny_model("llama")

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Module()
            self.model.language_model = inner.model
            self.config = inner.config

    adapter = resolve_adapter(Wrapper())
    assert adapter.module_name(0) == "model.language_model.layers.0.mlp.down_proj"

