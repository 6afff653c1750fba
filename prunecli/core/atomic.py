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


def check_output_path(path: Path, force: bool, is_dir: bool | None = None) -> None:
    """Fail early (before any heavy work) when `path` cannot be written (as a directory / a file, when `is_dir` says)."""
    path = Path(path)
    if path.exists() and not force:
        raise PruneCliError(f"output {path} already exists (use --force to overwrite)")
    if is_dir is False and path.is_dir():
        raise PruneCliError(f"output {path} is a directory, expected a file path")
    if is_dir is True and path.exists() and not path.is_dir():
        raise PruneCliError(f"output {path} exists and is not a directory")
    parent = _parent(path)
    if not parent.exists():
        raise PruneCliError(f"cannot write {path}: directory {parent} does not exist")
    if not parent.is_dir():
        raise PruneCliError(f"cannot write {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PruneCliError(f"cannot write {path}: directory {parent} is not writable")


def _parent(path: Path) -> Path:
    # Not `resolve()`: for a symlinked target the temporary file must sit next to the link we replace, not next to
    # the file it points at (which may be on another filesystem, where `os.replace` fails).
    return Path(os.path.abspath(path)).parent


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path; on normal exit it replaces `path`, on error it is removed."""
    path = Path(path)
    check_output_path(path, force, is_dir=False)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=_parent(path))
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp creates 0600 files; an output should get the usual permissions (as `open` would give it).
    os.chmod(tmp_path, 0o666 & ~_umask())
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_directory(path: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory; on normal exit it becomes `path` (an old `path` is removed only then)."""
    path = Path(path)
    check_output_path(path, force, is_dir=True)
    parent = _parent(path)
    tmp_path = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent))
    os.chmod(tmp_path, 0o777 & ~_umask())  # mkdtemp creates 0700 directories
    try:
        yield tmp_path
        if path.exists():
            # Renaming a directory onto an empty one is atomic on POSIX; a fresh name avoids clashes with leftovers.
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=parent))
            os.replace(path, old)
            os.replace(tmp_path, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            shutil.rmtree(tmp_path, ignore_errors=True)
