"""Task data: records loaded through `datasets` from local files (or a hub dataset the user names), subsampled
deterministically.

A source is a file path (.jsonl/.json, .tsv, .csv) or `hub:NAME[:CONFIG][@SPLIT]` (split defaults to `test`).
Nothing is downloaded unless the user writes `hub:`; a missing local file is a clear error, never a download.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

from prunecli.errors import PruneCliError

HUB_PREFIX = "hub:"
DEFAULT_DATA_DIR = Path("../shared/data")
"""Task data files default to here, relative to the current directory, unless PRUNECLI_DATA_DIR names a folder
(`--data-dir` overrides both)."""


def default_data_dir() -> Path:
    """$PRUNECLI_DATA_DIR, else DEFAULT_DATA_DIR: the same default for the library as for the CLI."""
    return Path(os.environ.get("PRUNECLI_DATA_DIR") or DEFAULT_DATA_DIR)
DEFAULT_PPL_TOKENS = 8192
"""Perplexity's default token budget: enough text for differences of a few percent to be visible, small enough for
a CPU (the report states the count and the time it took)."""


def resolve_source(source: str | None, default: str | None, data_dir: Path, task: str) -> str:
    """The source to read: the user's (path or hub spec), else the task's default file under `data_dir`."""
    if source:
        return source
    if default is None:
        raise PruneCliError(f"task {task} has no default data; give it as {task}=PATH")
    return str(data_dir / default)


def load_records(source: str, task: str) -> list[dict[str, Any]]:
    """All records of a source as plain dicts."""
    import datasets

    datasets.disable_progress_bars()  # our own progress bar reports the work that matters
    try:
        if source.startswith(HUB_PREFIX):
            name, _, split = source[len(HUB_PREFIX):].partition("@")
            name, _, config = name.partition(":")
            ds = datasets.load_dataset(name, config or None, split=split or "test")
        else:
            path = Path(source)
            if not path.is_file():
                raise PruneCliError(f"task {task}: data file {path} does not exist (use --data-dir, or {task}=PATH, "
                                    f"or {task}={HUB_PREFIX}NAME[:CONFIG][@SPLIT])")
            suffix = path.suffix.lower()
            if suffix in (".jsonl", ".json"):
                ds = datasets.load_dataset("json", data_files=str(path), split="train")
            elif suffix in (".tsv", ".csv"):
                # GLUE TSVs contain bare quote characters: no quoting, or sentences get merged.
                ds = datasets.load_dataset("csv", data_files=str(path), split="train",
                                           delimiter="\t" if suffix == ".tsv" else ",", quoting=3)
            else:
                raise PruneCliError(f"task {task}: cannot read {path} (expected .jsonl, .json, .tsv or .csv)")
    except PruneCliError:
        raise
    except Exception as exc:
        raise PruneCliError(f"task {task}: cannot load {source}: {type(exc).__name__}: {exc}") from exc
    records = ds.to_list()
    if not records:
        raise PruneCliError(f"task {task}: {source} has no records")
    return records


def subsample(n: int, limit: int | None, seed: int | None) -> list[int]:
    """Indices of the records to use out of n: the first `limit`, or with a seed a random sample of `limit` (in
    file order); deterministic. The indices name the records in reports (their per-record outcomes)."""
    if limit is None or limit >= n:
        return list(range(n))
    if seed is None:
        return list(range(limit))
    return sorted(random.Random(seed).sample(range(n), limit))


def field(record: dict[str, Any], key: str, task: str, index: int) -> Any:
    """A required record field, with an error that names the task, record and field."""
    if key not in record or record[key] is None:
        raise PruneCliError(f"task {task}: record {index} has no field {key!r} (has: {', '.join(sorted(record))})")
    return record[key]
