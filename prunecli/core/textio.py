"""Reading the user's text files (requests, hyper-parameters, corpora, reports): a bad one is one clear line."""

from __future__ import annotations

import os
from pathlib import Path

from prunecli.errors import PruneCliError


def read_text(path: str | os.PathLike[str], what: str) -> str:
    """The UTF-8 text of `path`; invalid UTF-8 or an unreadable file names the file, what it is, and the offset."""
    path = Path(path)
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PruneCliError(f"{what} {path} is not UTF-8 text (invalid byte at offset {exc.start})") from None
    except OSError as exc:
        raise PruneCliError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
