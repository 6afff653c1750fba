"""Reading the user's text files (requests, hyper-parameters, corpora, reports): a bad one is one clear line."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from prunecli.errors import PruneCliError

STDIN = "-"
"""The path that names standard input, as in most Unix tools."""


def read_text(path: str | os.PathLike[str], what: str) -> str:
    """The UTF-8 text of `path` (`-`: standard input); invalid UTF-8 or an unreadable file names the file, what it
    is, and the offset."""
    path = Path(path)
    try:
        data = sys.stdin.buffer.read() if str(path) == STDIN else path.read_bytes()
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PruneCliError(f"{what} {path} is not UTF-8 text (invalid byte at offset {exc.start})") from None
    except OSError as exc:
        raise PruneCliError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def read_json_object(path: str | os.PathLike[str], what: str) -> dict[str, Any]:
    """The JSON object in `path` (a config, an index): unreadable, not UTF-8, not JSON, nested too deeply for the
    parser, or another JSON value, each is one line naming the file."""
    doc = parse_json(read_text(path, what), f"{what} {path}")
    if not isinstance(doc, dict):
        raise PruneCliError(f"cannot read {what} {path}: it holds a JSON {type(doc).__name__}, expected an object")
    return doc


def parse_json(text: str, where: str) -> Any:
    """`json.loads` whose failures are one line about `where` (a file, a metadata entry)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise PruneCliError(f"{where} is not JSON ({exc})") from None
    except RecursionError:
        raise PruneCliError(f"{where} is nested too deeply") from None
