"""Text for key statistics: local text files or `datasets` sources, cut into token chunks under a token budget.

Nothing is downloaded unless the user names a hub dataset: local `.txt/.raw/.json/.jsonl/.csv/.parquet` files and
folders are read with `datasets`' generic loaders (or directly, for plain text), and hub names are streamed so only
the texts actually used are fetched.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from prunecli.errors import PruneCliError

_LOADERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text",
            ".raw": "text", ".text": "text"}

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class Corpus:
    """Where texts come from (for the statistics metadata) and the texts themselves (lazily)."""

    description: str
    texts: Iterable[str]


def text_file(path: str | Path) -> Corpus:
    """Paragraphs (blocks separated by blank lines) of a plain text file, read lazily."""
    path = Path(path)
    if not path.is_file():
        raise PruneCliError(f"text file {path} does not exist")

    def paragraphs() -> Iterator[str]:
        block: list[str] = []
        with path.open(encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.strip():
                    block.append(line.strip())
                elif block:
                    yield " ".join(block)
                    block = []
        if block:
            yield " ".join(block)

    return Corpus(f"text:{path.resolve()}", paragraphs())


def dataset(name: str, split: str = "train", column: str | None = None, subset: str | None = None) -> Corpus:
    """Texts of a `datasets` source: a local file or folder, or (only because the user named it) a hub dataset."""
    import datasets

    path = Path(name)
    try:
        if path.is_file():
            loader = _LOADERS.get(path.suffix.lower())
            if loader is None:
                raise PruneCliError(f"cannot tell the format of {path}; use .txt, .json, .jsonl, .csv or .parquet")
            ds = datasets.load_dataset(loader, data_files=str(path), split=split, streaming=True)
        elif path.is_dir():
            ds = datasets.load_dataset(str(path), subset, split=split, streaming=True)
        else:
            ds = datasets.load_dataset(name, subset, split=split, streaming=True)
    except PruneCliError:
        raise
    except Exception as exc:
        raise PruneCliError(f"cannot load dataset {name!r} (split {split!r}): {exc}") from exc
    features = getattr(ds, "features", None) or {}  # unknown before the first row for some streamed formats
    if column is None:
        if features:
            column = _text_column(features, {k: getattr(f, "dtype", None) in ("string", "large_string")
                                             for k, f in features.items()})
        else:
            first = next(iter(ds), {})
            column = _text_column(first, {k: isinstance(v, str) for k, v in first.items()})
    elif features and column not in features:
        raise PruneCliError(f"dataset {name!r} has no column {column!r}; columns: {', '.join(features)}")

    def texts() -> Iterator[str]:
        for row in ds:
            if column not in row:
                raise PruneCliError(f"dataset {name!r} has no column {column!r}; columns: {', '.join(row)}")
            value = row[column]
            if isinstance(value, str) and value.strip():
                yield value

    where = f"dataset:{path.resolve() if path.exists() else name}"
    return Corpus(f"{where}{'/' + subset if subset else ''}:{split}:{column}", texts())


def _text_column(columns: Iterable[str], is_string: dict[str, bool]) -> str:
    """`text` when there is one, else the first string column (else `text`, so the error names it)."""
    strings = [k for k in columns if is_string.get(k)]
    return "text" if "text" in is_string or not strings else strings[0]


def token_chunks(tokenizer: PreTrainedTokenizerBase, texts: Iterable[str], seq_len: int,
                 budget: int) -> Iterator[list[int]]:
    """Token id chunks of at most `seq_len` tokens, `budget` tokens in total (the last chunk is cut to fit)."""
    left = budget
    for text in texts:
        ids = tokenizer(text, verbose=False)["input_ids"]
        for start in range(0, len(ids), seq_len):
            chunk = ids[start:start + seq_len][:left]
            if chunk:
                yield list(chunk)
                left -= len(chunk)
            if left <= 0:
                return
