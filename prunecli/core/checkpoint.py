"""Lazy, read-only access to checkpoints, and atomic writing of edited copies.

A checkpoint is a Hugging Face model folder (`model.safetensors`, or shards plus `model.safetensors.index.json`) or a
single `.safetensors` file. Tensors are read one at a time (headers validated by `safe_open`, data read without a
memory map), so inspecting or restraining a 70B model costs one matrix of memory. Pickled weights
(`pytorch_model.bin`) execute code when loaded, so they are refused unless
the caller opts in, and then loaded with `weights_only=True`.

Names: the canonical name of a tensor is the name `transformers` uses for the parameter (`transformer.h.0...` for
GPT-2). Checkpoints saved without GPT-2's `transformer.` prefix, and tied output embeddings that are not stored at all,
are resolved to the stored tensor.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open

from prunecli.core.atomic import Inputs, atomic_directory, atomic_file, check_disjoint
from prunecli.core.safetensors_stream import (
    DTYPE_NAMES,
    SAFETENSORS_DTYPES,
    TensorSource,
    read_header,
    read_tensor,
    tensor_fingerprint,
    write_safetensors,
)
from prunecli.core.textio import read_json_object
from prunecli.errors import PruneCliError

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"

APPLIED_KEY = "prunecli.applied"
"""Header metadata key of the files `prunecli apply` rewrites: JSON list of the delta files merged into them."""

Layout = Literal["out_in", "in_out"]
"""How a 2-D weight is stored: `out_in` for nn.Linear ([out, in], y = W x), `in_out` for GPT-2's Conv1D (y = x W)."""

# GPT-2 style models implement these projections with transformers' Conv1D, whose weight is stored [in, out].
_CONV1D_MODEL_TYPES = {"gpt2"}
_CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight",
                    "crossattention.c_attn.weight", "crossattention.q_attn.weight", "crossattention.c_proj.weight")
_GPT2_PREFIX = "transformer."
_EMBEDDING_NAMES = ("model.embed_tokens.weight", "transformer.wte.weight", "wte.weight", "gpt_neox.embed_in.weight")


@dataclass(frozen=True)
class TensorInfo:
    """Header facts of a stored tensor, known without reading its data."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype name: F32, F16, BF16, ...
    file: str  # file name inside the checkpoint


def _read_error(path: Path, exc: Exception) -> PruneCliError:
    return PruneCliError(f"cannot read {path}: not a valid safetensors file, truncated or corrupt ({exc})")


class Checkpoint:
    """A checkpoint opened for lazy, one-tensor-at-a-time reading."""

    def __init__(self, path: str | os.PathLike[str], allow_pickle: bool = False) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise PruneCliError(f"checkpoint {self.path} does not exist")
        self.is_folder = self.path.is_dir()
        self.config: dict[str, Any] = {}
        self.pickled = False
        self._handles: dict[str, Any] = {}
        self._headers: dict[str, tuple[int, dict[str, Any]]] = {}
        self._pickle_cache: dict[str, dict[str, torch.Tensor]] = {}
        # A lone weights file inside a model folder (`gpt2/model.safetensors`) still needs the folder's config: it
        # says which weights are Conv1D ([in, out]) and whether lm_head is tied.
        config_file = (self.path if self.is_folder else self.path.parent) / "config.json"
        if config_file.is_file():
            self.config = read_json_object(config_file, "model config")
        if self.is_folder:
            files = self._folder_files(allow_pickle)
        else:
            if self.path.suffix in (".bin", ".pt", ".pth"):
                if not allow_pickle:
                    raise PruneCliError(f"{self.path} is a pickle file, which can run code when loaded; "
                                        "convert it to safetensors or pass --allow-pickle")
                self.pickled = True
            files = {self.path.name: self.path}
        self._files = files
        self._infos: dict[str, TensorInfo] = {}
        for fname, fpath in files.items():
            for info in self._scan(fname, fpath):
                self._infos[info.name] = info
        if not self._infos:
            raise PruneCliError(f"checkpoint {self.path} holds no tensors")

    # ----------------------------------------------------------------------------------------------- discovery
    def _shards(self, index: str) -> dict[str, Path]:
        """The weight files an index lists; a name that leaves the model folder (absolute, `..`) is refused."""
        weight_map = read_json_object(self.path / index, "checkpoint index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise PruneCliError(f"checkpoint {self.path}: {index} has no weight_map")
        bad = [n for n in weight_map.values()
               if not isinstance(n, str) or not n or Path(n).is_absolute() or ".." in Path(n).parts]
        if bad:
            raise PruneCliError(f"checkpoint {self.path}: {index} lists the weight file {bad[0]!r}, which is not a "
                                "file inside the model folder")
        names = sorted(set(weight_map.values()))
        return {n: self.path / n for n in names}

    def _folder_files(self, allow_pickle: bool) -> dict[str, Path]:
        p = self.path
        if (p / SAFE_INDEX).exists():
            shards = self._shards(SAFE_INDEX)
            missing = [n for n, f in shards.items() if not f.is_file()]
            if missing:
                raise PruneCliError(f"checkpoint {p}: shard(s) listed in {SAFE_INDEX} are missing: "
                                    f"{', '.join(missing)}")
            return shards
        if (p / SAFE_SINGLE).exists():
            return {SAFE_SINGLE: p / SAFE_SINGLE}
        singles = sorted(p.glob("*.safetensors"))
        if len(singles) == 1:
            return {singles[0].name: singles[0]}
        if (p / PICKLE_INDEX).exists() or (p / PICKLE_SINGLE).exists():
            if not allow_pickle:
                raise PruneCliError(f"checkpoint {p} holds only pickle weights ({PICKLE_SINGLE}), which can run code "
                                    "when loaded; convert it to safetensors or pass --allow-pickle")
            self.pickled = True
            if (p / PICKLE_INDEX).exists():
                return self._shards(PICKLE_INDEX)
            return {PICKLE_SINGLE: p / PICKLE_SINGLE}
        raise PruneCliError(f"{p} holds no weights ({SAFE_SINGLE}, {SAFE_INDEX} or a single *.safetensors file)")

    def _scan(self, fname: str, fpath: Path) -> Iterator[TensorInfo]:
        if self.pickled:
            for name, t in self._pickle_tensors(fname).items():
                yield TensorInfo(name, tuple(t.shape), DTYPE_NAMES[t.dtype], fname)
            return
        handle = self._handle(fname)
        try:
            for name in handle.keys():
                sl = handle.get_slice(name)
                yield TensorInfo(name, tuple(sl.get_shape()), sl.get_dtype(), fname)
        except SafetensorError as exc:  # pragma: no cover - header errors surface in _handle already
            raise _read_error(fpath, exc) from exc

    def _handle(self, fname: str) -> Any:
        if fname not in self._handles:
            fpath = self._files[fname]
            try:
                self._handles[fname] = safe_open(str(fpath), framework="pt", device="cpu")
            except (SafetensorError, OSError, ValueError) as exc:
                raise _read_error(fpath, exc) from exc
        return self._handles[fname]

    def _pickle_tensors(self, fname: str) -> dict[str, torch.Tensor]:
        if fname not in self._pickle_cache:
            fpath = self._files[fname]
            try:
                state = torch.load(fpath, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # torch raises many types for bad pickles, with messages of many lines
                first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
                raise PruneCliError(f"cannot read pickle checkpoint {fpath}: {first[:300]}") from exc
            if not isinstance(state, dict):
                raise PruneCliError(f"cannot read pickle checkpoint {fpath}: it holds a {type(state).__name__}, "
                                    "not a state dict of tensors")
            self._pickle_cache[fname] = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        return self._pickle_cache[fname]

    # ------------------------------------------------------------------------------------------------ queries
    @property
    def model_type(self) -> str | None:
        return self.config.get("model_type")

    def names(self) -> list[str]:
        """Stored tensor names, in file order (tied aliases are not listed twice)."""
        return list(self._infos)

    def resolve(self, name: str) -> str:
        """The stored name for `name`, following GPT-2 prefix aliases and tied output embeddings."""
        if name in self._infos:
            return name
        candidates = [name[len(_GPT2_PREFIX):]] if name.startswith(_GPT2_PREFIX) else [_GPT2_PREFIX + name]
        if name == "lm_head.weight" and self.config.get("tie_word_embeddings", True):
            candidates += list(_EMBEDDING_NAMES)
        for cand in candidates:
            if cand in self._infos:
                return cand
        raise PruneCliError(f"tensor {name!r} not found in {self.path}")

    def canonical(self, name: str) -> str:
        """The name `transformers` gives this tensor's parameter (adds GPT-2's `transformer.` prefix when absent)."""
        stored = self.resolve(name)
        if self.model_type == "gpt2" and not stored.startswith(_GPT2_PREFIX) and not stored.startswith("lm_head"):
            return _GPT2_PREFIX + stored
        return stored

    def info(self, name: str) -> TensorInfo:
        return self._infos[self.resolve(name)]

    def layout(self, name: str) -> Layout:
        """Storage orientation of a 2-D weight: only GPT-2's Conv1D projections are stored [in, out]."""
        stored = self.resolve(name)
        if self.model_type in _CONV1D_MODEL_TYPES and stored.endswith(_CONV1D_SUFFIXES):
            return "in_out"
        return "out_in"

    def get(self, name: str) -> torch.Tensor:
        """Load one tensor (as stored: its own dtype and layout)."""
        info = self.info(name)
        if self.pickled:
            return self._pickle_tensors(info.file)[info.name]
        try:
            self._handle(info.file)  # validated by safetensors once; the data itself is read without a memory map
            if info.file not in self._headers:
                self._headers[info.file] = read_header(self._files[info.file])
            start, header = self._headers[info.file]
            return read_tensor(self._files[info.file], start, header[info.name])
        except (SafetensorError, OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
            raise _read_error(self._files[info.file], exc) from exc

    def applied(self, name: str) -> list[str] | None:
        """The delta files `prunecli apply` merged into the file that holds tensor `name` (its `prunecli.applied`
        header), or None when another program wrote that file."""
        info = self.info(name)
        if self.pickled:
            return None
        raw = (self._handle(info.file).metadata() or {}).get(APPLIED_KEY)
        try:
            files = json.loads(raw) if raw is not None else None
        except ValueError:
            return None
        return [str(f) for f in files] if isinstance(files, list) else None

    def fingerprint(self, name: str) -> str:
        """Hash of a tensor's dtype, shape and bytes: ties a delta to the exact base matrix it was computed on."""
        info = self.info(name)
        return tensor_fingerprint(self.get(name), info.dtype)

    def matrices(self) -> list[str]:
        """Names of the stored 2-D tensors (the ones that have a singular spectrum)."""
        return [n for n, i in self._infos.items() if len(i.shape) == 2]

    # ------------------------------------------------------------------------------------------------ writing
    def write_updated(self, out: Path, updates: Mapping[str, torch.Tensor], force: bool = False,
                      metadata: Mapping[str, str] | None = None,
                      files: Mapping[str, Path | None] | None = None, inputs: Inputs = ()) -> list[str]:
        """Write a copy of this checkpoint with `updates` (stored name or alias -> new tensor, stored layout).

        New tensors are cast to each tensor's stored dtype. For folders, non-weight files are copied, shards that hold
        no updated tensor are hard-linked (copied across filesystems) and the index is kept, so the output loads with
        `from_pretrained` exactly like the input. `metadata` goes into the header of every rewritten file. Values of
        `updates` are read only when their tensor is written, one at a time, so a lazy mapping keeps memory at one
        tensor. `files` replaces non-weight files of a folder (name -> file to copy instead, or None to leave the
        base's file out), e.g. another tokenizer. `out` may never be, hold or sit inside this checkpoint or one of
        `inputs`. Returns the names of the rewritten files.
        """
        out = Path(out)
        inputs = [("base checkpoint", self.path), *inputs]
        check_disjoint(out, inputs)
        by_stored: dict[str, str] = {}  # stored name -> key in `updates`
        for name in updates:
            stored = self.resolve(name)
            if stored in by_stored:
                raise PruneCliError(f"tensors {by_stored[stored]!r} and {name!r} are the same stored tensor {stored!r}")
            by_stored[stored] = name
        touched = sorted({self._infos[n].file for n in by_stored})
        extra = {"format": "pt", **(metadata or {})}
        if not self.is_folder:
            with atomic_file(out, force, inputs) as tmp:
                self._write_file(self.path.name, tmp, updates, by_stored, extra)
            return [out.name]
        replaced = dict(files or {})
        if set(replaced) & set(self._files):
            raise ValueError(f"weight files cannot be replaced: {sorted(set(replaced) & set(self._files))}")
        with atomic_directory(out, force, inputs) as tmp:
            for item in self.path.iterdir():
                if item.is_dir() or item.name.startswith(".") or item.name in replaced:
                    continue
                if self.pickled and (item.name in self._files or item.name == PICKLE_INDEX):
                    continue  # replaced below by one safetensors file: our outputs never contain pickles
                if item.name not in self._files:
                    shutil.copy2(item, tmp / item.name)
                elif item.name in touched:
                    self._write_file(item.name, tmp / item.name, updates, by_stored, extra)
                else:
                    _link_or_copy(item, tmp / item.name)
            if self.pickled:
                self._write_file(None, tmp / SAFE_SINGLE, updates, by_stored, extra)
                touched = [SAFE_SINGLE]
            for name, source in replaced.items():
                if source is not None:
                    shutil.copy2(source, tmp / name)
        return touched

    def _write_file(self, fname: str | None, dest: Path, updates: Mapping[str, torch.Tensor],
                    by_stored: Mapping[str, str], extra: Mapping[str, str]) -> None:
        """Write the tensors of stored file `fname` (all tensors when None, for pickle input) with updates applied."""
        meta: dict[str, str] = {}
        if not self.pickled:
            assert fname is not None
            meta.update(self._handle(fname).metadata() or {})
        meta.update(extra)
        names = [n for n, i in self._infos.items() if fname is None or self.pickled or i.file == fname]
        write_safetensors(dest, [self._source(n, updates, by_stored) for n in names], meta)

    def _source(self, name: str, updates: Mapping[str, torch.Tensor], by_stored: Mapping[str, str]) -> TensorSource:
        info = self._infos[name]
        if name not in by_stored:
            return TensorSource(name, info.dtype, info.shape, lambda: self.get(name).contiguous())
        key = by_stored[name]

        def load() -> torch.Tensor:
            new = updates[key]
            if tuple(new.shape) != info.shape:
                raise PruneCliError(f"tensor {key}: new shape {list(new.shape)} differs from stored {list(info.shape)}")
            return new.detach().to("cpu", SAFETENSORS_DTYPES[info.dtype]).contiguous()

        return TensorSource(name, info.dtype, info.shape, load)


def _link_or_copy(src: Path, dest: Path) -> None:
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)
