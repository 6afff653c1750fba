"""Atomic outputs: a crash or Ctrl-C never leaves a half-written checkpoint or delta behind.

Everything is written to a temporary sibling of the target (same filesystem, so `os.replace` is atomic) and moved
into place only once complete. Existing outputs are refused unless the caller passes `force`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from prunecli.errors import PruneCliError


def check_output_path(path: Path, force: bool) -> None:
    """Fail early (before any heavy work) when `path` cannot be written."""
    if path.exists() and not force:
        raise PruneCliError(f"output {path} already exists (use --force to overwrite)")
    parent = path.resolve().parent
    if not parent.is_dir():
        raise PruneCliError(f"cannot write {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise PruneCliError(f"cannot write {path}: directory {parent} is not writable")


@contextlib.contextmanager
def atomic_file(path: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path; on normal exit it replaces `path`, on error it is removed."""
    path = Path(path)
    check_output_path(path, force)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.resolve().parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_directory(path: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory; on normal exit it becomes `path` (an old `path` is removed only then)."""
    path = Path(path)
    check_output_path(path, force)
    if path.exists() and not path.is_dir():
        raise PruneCliError(f"output {path} exists and is not a directory")
    tmp_path = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.resolve().parent))
    try:
        yield tmp_path
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp_path, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            shutil.rmtree(tmp_path, ignore_errors=True)
