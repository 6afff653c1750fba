"""A disk cache of the locality reference's scores, for evaluating many deltas of one base.

zsRE's locality agreement compares the evaluated model's top-1 tokens with those of a reference model (the base
without the deltas, or `--locality-reference`). A long run evaluates checkpoint after checkpoint on the same base, so
the reference scores the same (locality prompt, answer) pairs with the same model every time. They are kept in one
JSON file per reference, named by a sha256 over everything a score depends on:

- the reference model: the name and bytes of every file of its folder (weights, config, tokenizer), and the
  tokenizer's files when `--tokenizer` names another one;
- how it runs: dtype, device type or device map, batch size, and the torch and transformers versions;
- the protocol: `PROTOCOL`, raised whenever `score_targets` changes what it computes.

A file holds scores per pair, so evaluations on 10, then 25, then 50 records of a run share the first ones; pairs it
lacks are scored and added. The key reads every file of the model once (sha256), which costs far less than the
reference pass it replaces on a CPU; with `--locality-reference` a fully cached reference is not even loaded. Writes
take a lock beside the file and replace it atomically, so concurrent evaluations share it safely; a file that cannot
be read or written is left aside with a warning, never an error.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from prunecli.core.atomic import atomic_file
from prunecli.errors import PruneCliError, PruneCliWarning
from prunecli.models.builtin import cache_dir
from prunecli.models.scoring import TargetScore
from prunecli.models.tokenizer import TOKENIZER_FILE_NAMES

PROTOCOL = 1
"""Version of what a cached score means (`score_targets` and `models.tokens.encode_pair`)."""
FORMAT = "prunecli-locality-reference"
_READ_CHUNK = 1 << 24

Pair = tuple[str, str]


def _add_files(h: Any, files: Iterable[Path]) -> None:
    """Feed the name, size and bytes of each file, in name order."""
    for path in sorted(files, key=lambda p: p.name):
        h.update(f"{path.name}\0{path.stat().st_size}\0".encode())
        with open(path, "rb") as fh:
            while chunk := fh.read(_READ_CHUNK):
                h.update(chunk)


def _folder_files(folder: Path, names: frozenset[str] | None = None) -> list[Path]:
    """The regular, non-hidden files of a folder (hidden ones are locks and markers), optionally only `names`."""
    return [p for p in folder.iterdir()
            if p.is_file() and not p.name.startswith(".") and (names is None or p.name in names)]


def reference_key(model: Path, tokenizer: Path | None, settings: Mapping[str, Any]) -> str:
    """The sha256 naming the cache file of reference model folder `model` run with `settings` (dtype, device, ...);
    `tokenizer` is the file or folder `--tokenizer` resolved to, when it is not the model's own."""
    import torch
    import transformers

    h = hashlib.sha256(json.dumps({"protocol": PROTOCOL, "settings": dict(settings), "torch": torch.__version__,
                                   "transformers": transformers.__version__}, sort_keys=True).encode())
    _add_files(h, _folder_files(model))
    if tokenizer is not None:
        h.update(b"\0tokenizer\0")
        _add_files(h, [tokenizer] if tokenizer.is_file() else _folder_files(tokenizer, TOKENIZER_FILE_NAMES))
    return h.hexdigest()


class ReferenceCache:
    """The cached scores of one reference (`reference_key`), read once and extended by `store`."""

    def __init__(self, key: str, folder: Path | None = None) -> None:
        self.path = (folder or cache_dir() / "locality-reference") / f"{key}.json"

    def _read(self) -> dict[Pair, TargetScore]:
        if not self.path.is_file():
            return {}
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
            if doc.get("format") != FORMAT:
                raise ValueError(f"not a {FORMAT} file")
            return {(p, a): TargetScore(lp, ok, top) for p, a, lp, ok, top in doc["scores"]}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            warnings.warn(PruneCliWarning(f"ignoring the unreadable locality reference cache {self.path} ({exc})"),
                          stacklevel=2)
            return {}

    def lookup(self, pairs: Iterable[Pair]) -> dict[Pair, TargetScore]:
        """The cached scores of those of `pairs` the file holds."""
        cached = self._read()
        return {pair: cached[pair] for pair in pairs if pair in cached}

    def store(self, scores: Mapping[Pair, TargetScore]) -> None:
        """Add `scores` to the file (merged with what other processes wrote meanwhile, under the lock)."""
        from filelock import FileLock

        if not scores:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(str(self.path.with_name(f".{self.path.name}.lock"))):
                merged = {**self._read(), **scores}
                rows = [[p, a, s.token_logprobs, s.token_correct, s.token_argmax] for (p, a), s in merged.items()]
                with atomic_file(self.path, force=True) as tmp:  # NaN log-probabilities stay NaN (Python's JSON)
                    tmp.write_text(json.dumps({"format": FORMAT, "version": 1, "scores": rows}), encoding="utf-8")
        except (OSError, PruneCliError) as exc:
            warnings.warn(PruneCliWarning(f"could not write the locality reference cache {self.path} ({exc})"),
                          stacklevel=2)
