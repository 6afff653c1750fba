"""Issue 11: a seeded, bounded fuzz of the delta and checkpoint readers. Valid files are mutated (byte flips in the
header and the data, truncation, appended bytes, a wrong header length, JSON-level edits of the header and of the
delta description); every case must be a clean one-line `PruneCliError` or a file that reads back consistently."""

from __future__ import annotations

import json
import random
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from prunecli.core.checkpoint import Checkpoint
from prunecli.core.delta import META_KEY, Delta, DeltaEntry
from prunecli.errors import PruneCliError

SEED = 20261202
CASES = 300  # per reader
ODD_VALUES: list[Any] = [None, True, -1, 0, 7, 2**40, 1e308, float("nan"), "", "x", "F16", "U16", "lowrank", "in_out",
                         [], [0], [3, 4], [-1, 2], {}, {"a": 1}, [[[[]]]]]


def _split(data: bytes) -> tuple[dict[str, Any], bytes]:
    (size,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + size]), data[8 + size:]


def _join(header: dict[str, Any], body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def _mutate_json(node: Any, rng: random.Random) -> Any:
    """A copy of `node` with one value somewhere replaced, removed or added."""
    if isinstance(node, dict) and node and rng.random() < 0.8:
        key = rng.choice(sorted(node))
        out = dict(node)
        roll = rng.random()
        if roll < 0.15:
            del out[key]
        elif roll < 0.25:
            out[f"extra{rng.randrange(9)}"] = rng.choice(ODD_VALUES)
        elif isinstance(out[key], str) and out[key].startswith("{"):  # the delta description is JSON in a string
            out[key] = json.dumps(_mutate_json(json.loads(out[key]), rng))
        else:
            out[key] = _mutate_json(out[key], rng) if rng.random() < 0.6 else rng.choice(ODD_VALUES)
        return out
    if isinstance(node, list) and node and rng.random() < 0.8:
        out = list(node)
        i = rng.randrange(len(out))
        out[i] = _mutate_json(out[i], rng) if rng.random() < 0.5 else rng.choice(ODD_VALUES)
        return out
    return rng.choice(ODD_VALUES)


def mutate(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    header, body = _split(data)
    size = len(data) - len(body)
    described = META_KEY in header.get("__metadata__", {})
    kind = rng.choice(["flip-header", "flip-data", "truncate", "append", "length", "json", "description",
                       "description", "description"] if described else
                      ["flip-header", "flip-data", "truncate", "append", "length", "json", "json", "json"])
    buf = bytearray(data)
    if kind == "flip-header":
        for _ in range(rng.randint(1, 4)):
            buf[rng.randrange(8, size)] = rng.randrange(256)
    elif kind == "flip-data" and body:
        for _ in range(rng.randint(1, 8)):
            buf[rng.randrange(size, len(buf))] = rng.randrange(256)
    elif kind == "truncate":
        buf = buf[:rng.randrange(len(buf))]
    elif kind == "append":
        buf += bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    elif kind == "length":
        buf[:8] = struct.pack("<Q", rng.choice([0, 1, size - 9, size + 1, len(data), 2**40, 2**63]))
    elif kind == "description":  # the delta's own JSON document, where prunecli (not safetensors) must validate
        doc = _mutate_json(json.loads(header["__metadata__"][META_KEY]), rng)
        return kind, _join({**header, "__metadata__": {**header["__metadata__"], META_KEY: json.dumps(doc)}}, body)
    else:
        return kind, _join(_mutate_json(header, rng), body)
    return kind, bytes(buf)


def _same_delta(a: Delta, b: Delta) -> bool:
    return a.metadata() == b.metadata() and all(
        all(torch.equal(x, y) for x, y in zip(a.entries[n].tensors(), b.entries[n].tensors())) for n in a.entries)


def read_delta(path: Path, tmp: Path) -> None:
    delta = Delta.load(path)
    again = tmp / "again.safetensors"
    again.unlink(missing_ok=True)
    delta.save(again)
    assert _same_delta(delta, Delta.load(again)), "a delta that loads must save and load back equal"


def read_checkpoint(path: Path, tmp: Path) -> None:
    ck = Checkpoint(path)
    for name in ck.names():
        info, t = ck.info(name), ck.get(name)
        assert tuple(t.shape) == info.shape, name
        assert ck.fingerprint(name) == ck.fingerprint(name)


def fuzz(valid: bytes, reader: Callable[[Path, Path], None], tmp: Path, seed: int) -> list[str]:
    rng = random.Random(seed)
    failures: list[str] = []
    for case in range(CASES):
        kind, data = mutate(valid, rng)
        path = tmp / f"case{case}.safetensors"
        path.write_bytes(data)
        try:
            reader(path, tmp)
        except PruneCliError as exc:
            if "\n" in str(exc) or not str(exc):
                failures.append(f"case {case} ({kind}): message is not one line: {exc!r}")
        except Exception as exc:  # noqa: BLE001 - any other exception is the failure this test looks for
            failures.append(f"case {case} ({kind}): {type(exc).__name__}: {exc}"[:300])
        path.unlink()
    return failures


@pytest.fixture(scope="module")
def valid_delta(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    root = tmp_path_factory.mktemp("fuzz-delta")
    base = root / "base.safetensors"
    save_file({"w": torch.randn(6, 5), "v": torch.randn(4, 4)}, base)
    ck = Checkpoint(base)
    delta = Delta.for_base(ck)
    delta.add("w", DeltaEntry.lowrank(torch.randn(6, 2), torch.randn(5, 2), "out_in"), ck)
    delta.add("v", DeltaEntry.from_dense(torch.randn(4, 4), "out_in"), ck)
    delta.history += [{"op": "edit", "method": "rome", "requests": [{"prompt": "a {}", "subject": "b",
                                                                      "target_new": "c"}]},
                      {"op": "prune", "fn": "log", "alpha": 1.2}]
    delta.save(root / "d.safetensors")
    assert META_KEY in json.dumps(_split((root / "d.safetensors").read_bytes())[0])
    return (root / "d.safetensors").read_bytes()


@pytest.fixture(scope="module")
def valid_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    root = tmp_path_factory.mktemp("fuzz-ckpt")
    save_file({"a": torch.randn(4, 3), "b": torch.randn(2, 2).half(), "c": torch.randn(3).bfloat16(),
               "d": torch.arange(5), "e": torch.tensor([1, 2], dtype=torch.uint16)}, root / "m.safetensors",
              metadata={"format": "pt"})
    return (root / "m.safetensors").read_bytes()


def test_fuzzed_delta_files(valid_delta: bytes, tmp_path: Path) -> None:
    read_delta_ok = tmp_path / "valid.safetensors"
    read_delta_ok.write_bytes(valid_delta)
    read_delta(read_delta_ok, tmp_path)
    assert fuzz(valid_delta, read_delta, tmp_path, SEED) == []


def test_fuzzed_checkpoint_files(valid_checkpoint: bytes, tmp_path: Path) -> None:
    assert fuzz(valid_checkpoint, read_checkpoint, tmp_path, SEED + 1) == []
