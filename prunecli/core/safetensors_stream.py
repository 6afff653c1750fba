"""A streaming safetensors writer: one tensor in memory at a time, whatever the file size.

`safetensors.torch.save_file` needs every tensor of a file in memory at once; a 5 GB shard of a 70B model would then
cost 5 GB of RAM just to change one matrix in it. The format is simple (8-byte little-endian header length, a JSON
header with dtype/shape/data_offsets, the raw bytes), so we write it ourselves, tensor by tensor.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class TensorSource:
    """A tensor to be written: its header facts up front, its data produced only when its turn comes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    load: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        numel = 1
        for d in self.shape:
            numel *= d
        return numel * torch.empty((), dtype=SAFETENSORS_DTYPES[self.dtype]).element_size()


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """Raw little-endian bytes of a CPU tensor (bf16/fp8 included, which NumPy cannot represent)."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def write_safetensors(path: Path, sources: Sequence[TensorSource], metadata: dict[str, str] | None = None) -> None:
    """Write `sources` to `path` in safetensors format, loading each tensor only while it is written."""
    header: dict[str, object] = {}
    if metadata:
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:  # readers reject the whole file otherwise: `__metadata__` is a string -> string map
            raise ValueError(f"safetensors metadata must map strings to strings; bad key(s): {bad}")
        header["__metadata__"] = dict(metadata)
    offset = 0
    for src in sources:
        header[src.name] = {"dtype": src.dtype, "shape": list(src.shape), "data_offsets": [offset, offset + src.nbytes]}
        offset += src.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for src in sources:
            t = src.load()
            if tuple(t.shape) != tuple(src.shape) or DTYPE_NAMES.get(t.dtype) != src.dtype:
                raise ValueError(f"tensor {src.name}: expected {src.dtype}{list(src.shape)}, "
                                 f"got {t.dtype}{list(t.shape)}")
            fh.write(tensor_bytes(t))


def read_header(path: Path) -> tuple[int, dict[str, dict[str, object]]]:
    """(byte offset where tensor data starts, per-tensor header entries) of a safetensors file."""
    with open(path, "rb") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(size))
    header.pop("__metadata__", None)
    return 8 + size, header


def read_tensor(path: Path, data_start: int, entry: dict[str, object]) -> torch.Tensor:
    """Read one tensor with plain file reads, not a memory map.

    Pages of a memory-mapped file that have been touched count as the process's resident memory until unmapped, so
    streaming a 13 GB checkpoint through `safe_open` shows 13 GB of RSS; a read into a private buffer holds only the
    tensor being worked on.
    """
    begin, end = entry["data_offsets"]  # type: ignore[misc]
    buf = bytearray(end - begin)
    with open(path, "rb") as fh:
        fh.seek(data_start + begin)
        if fh.readinto(buf) != len(buf):
            raise ValueError(f"{path} is truncated")
    dtype = SAFETENSORS_DTYPES[str(entry["dtype"])]
    shape = [int(d) for d in entry["shape"]]  # type: ignore[union-attr]
    if not buf:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype).reshape(shape)


def tensor_fingerprint(t: torch.Tensor, dtype_name: str | None = None) -> str:
    """sha256 over dtype, shape and raw bytes of a tensor, as stored."""
    h = hashlib.sha256()
    h.update(f"{dtype_name or DTYPE_NAMES[t.dtype]}:{list(t.shape)}:".encode())
    h.update(tensor_bytes(t))
    return "sha256:" + h.hexdigest()
