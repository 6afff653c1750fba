"""Atomic outputs: at every instant an output path holds the complete old output or the complete new one.

Everything is written to a temporary sibling of the target (same filesystem, so renames are atomic) and moved into
place only once complete:

- A new output (file or folder) is committed with a rename that refuses to replace anything (`RENAME_NOREPLACE`, or
  a hard link for files), so "already exists" is checked again at the very moment of the commit: of two concurrent
  writers without `--force`, exactly one succeeds.
- A file replaces an old one with `os.replace` (one atomic rename).
- A folder replaces an old one with `renameat2(RENAME_EXCHANGE)`, which swaps the two directory entries in one step;
  the old version then sits at the temporary name and is deleted. Where the filesystem cannot exchange, the swap is
  two renames recorded first in a journal beside the target; a run killed between them leaves the journal, and the
  next run that writes beside the target finishes the swap before doing anything else.
- Temporary names carry the writer's host and process id (`.NAME.prunecli-HOST-PID-TOKEN.tmp`): the next run that
  writes in the same folder removes those of processes of this host that no longer exist (a kill -9 leaves them).
- `--force` replaces only a regular file, or a folder that prunecli wrote (it holds the `.prunecli-output` marker that
  every folder output gets); never a device node, a FIFO, or a folder of someone else's files.
- An output may never be, contain, or sit inside one of the command's inputs (real paths and inode numbers are
  compared, so symlinks, hard links and bind mounts do not hide it).
- SIGINT/SIGTERM are held back during a commit, so `committed_outputs()` says truthfully what was written.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import os
import re
import secrets
import shutil
import signal
import socket
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from prunecli.errors import PruneCliError

MARKER = ".prunecli-output"
"""File in every folder prunecli writes: only such folders may be replaced with --force."""

_TEMP_RE = re.compile(r"^\..+\.prunecli-(?P<host>[A-Za-z0-9_-]+)-(?P<pid>\d+)-[0-9a-f]+\.(?P<kind>tmp|old|swap)$")
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_COMMITTED: list[Path] = []

Inputs = Iterable[tuple[str, "str | os.PathLike[str] | None"]]
"""A command's inputs as (what it is, path) pairs, e.g. ("base checkpoint", path); None paths are skipped."""


def committed_outputs() -> list[Path]:
    """Outputs this process has completely written so far (for a truthful message after an interrupt)."""
    return list(_COMMITTED)


# ------------------------------------------------------------------------------------------------ checks
def check_output_path(path: Path, force: bool, is_dir: bool | None = None,
                      inputs: Inputs = ()) -> None:
    """Fail early (before any heavy work) when `path` cannot be written (as a directory / a file, when `is_dir` says)
    or would overwrite, contain or sit inside one of `inputs` (checked first: --force never makes an input an output,
    so suggesting it would mislead)."""
    path = Path(path)
    check_disjoint(path, inputs)
    exists = os.path.lexists(path)
    if exists and not force:
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
    if exists:
        _check_replaceable(path)


def _check_replaceable(path: Path) -> None:
    """Only a regular file, a symlink (the link is replaced, not its target) or a folder prunecli wrote."""
    mode = os.lstat(path).st_mode
    if stat.S_ISLNK(mode) or stat.S_ISREG(mode):
        return
    if stat.S_ISDIR(mode):
        if not (path / MARKER).is_file():
            raise PruneCliError(f"refusing to replace {path}: it is a folder prunecli did not write (no {MARKER} "
                                "marker); remove it yourself or choose another output")
        return
    raise PruneCliError(f"refusing to replace {path}: it is not a regular file (a device, FIFO or socket)")


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _chain(path: Path) -> list[tuple[int, int]]:
    """Identities of `path` (if it exists) and of every existing folder above it, symlinks followed."""
    ids = []
    for p in [Path(os.path.abspath(path)), *Path(os.path.abspath(path)).parents]:
        ident = _identity(p)
        if ident is not None:
            ids.append(ident)
    return ids


def check_disjoint(output: Path, inputs: Inputs) -> None:
    """Refuse an output that is, contains, or sits inside an input (real paths and inode numbers, so symlinks, hard
    links and bind mounts are seen through)."""
    out_real = Path(os.path.realpath(output))
    out_id = _identity(output)
    out_chain = _chain(output)
    for label, raw in inputs:
        if raw is None or not os.path.exists(raw):
            continue
        inp = Path(raw)
        in_real, in_id = Path(os.path.realpath(inp)), _identity(inp)
        if out_real == in_real or (out_id is not None and out_id == in_id):
            raise PruneCliError(f"refusing to write {output}: it is the {label} {inp} (an input is never "
                                "overwritten in place)")
        if in_real in out_real.parents or (in_id is not None and in_id in out_chain[1:]):
            raise PruneCliError(f"refusing to write {output}: it lies inside the {label} {inp}")
        if out_real in in_real.parents or (out_id is not None and out_id in _chain(inp)[1:]):
            raise PruneCliError(f"refusing to write {output}: it contains the {label} {inp}")


def labelled(label: str, paths: Iterable[str | os.PathLike[str] | None] | None) -> list[tuple[str, object]]:
    """(label, path) pairs for `check_output_path(..., inputs=...)`."""
    return [(label, p) for p in (paths or [])]


def _parent(path: Path) -> Path:
    # Not `resolve()`: for a symlinked target the temporary file must sit next to the link we replace, not next to
    # the file it points at (which may be on another filesystem, where a rename fails).
    return Path(os.path.abspath(path)).parent


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def output_mode(is_dir: bool = False) -> int:
    """The mode `open`/`mkdir` would give a new file/folder under the current umask."""
    return (0o777 if is_dir else 0o666) & ~_umask()


# ------------------------------------------------------------------------------------- renames and signals
@functools.cache
def _libc_renameat2() -> Any:
    return getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)  # Linux (glibc >= 2.28, musl)


def _renameat2(src: Path, dest: Path, flags: int) -> bool:
    """renameat2(2); False where the platform or filesystem does not support `flags`, an OSError on failure."""
    func = _libc_renameat2()
    if func is None:
        return False
    at_fdcwd = -100
    if func(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dest), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(dest))


def _rename_noreplace(src: Path, dest: Path, is_dir: bool) -> None:
    """Move `src` to `dest` only if `dest` does not exist, atomically with that check."""
    try:
        if _renameat2(src, dest, _RENAME_NOREPLACE):
            return
        if not is_dir:
            try:
                os.link(src, dest)  # fails with EEXIST if dest exists: a no-clobber commit on POSIX filesystems
                os.unlink(src)
                return
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                    raise
        if os.path.lexists(dest):  # last resort (no renameat2, no hard links): check, then rename
            raise FileExistsError(errno.EEXIST, "exists", str(dest))
        os.rename(src, dest)  # a non-empty folder or a file at dest makes this fail
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise PruneCliError(f"output {dest} already exists (it appeared while this run was writing; use "
                                "--force to overwrite)") from None
        raise


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT/SIGTERM back while a commit and its bookkeeping run (delivered right after)."""
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _temp_name(path: Path, kind: str) -> Path:
    return _parent(path) / f".{path.name}.prunecli-{_host()}-{os.getpid()}-{secrets.token_hex(4)}.{kind}"


@functools.cache
def _host() -> str:
    """This machine's name as it appears in temporary names: a process id means something only on its own host."""
    return re.sub(r"[^A-Za-z0-9-]", "_", socket.gethostname() or "host")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def clean_leftovers(folder: Path) -> None:
    """Finish half-done folder swaps and delete temporary outputs of processes that no longer exist in `folder`."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    dead = []
    for name in names:
        match = _TEMP_RE.match(name)
        # another machine's (over a network filesystem): not ours to judge
        if match is None or match["host"] != _host():
            continue
        pid = int(match["pid"])
        if pid != os.getpid() and not _alive(pid):
            dead.append((match["kind"], Path(folder) / name))
    for kind, journal in dead:  # journals first: they may still point at the only complete copy of an output
        if kind == "swap":
            _recover_swap(journal)
    for _, leftover in dead:
        _remove(leftover)


def _recover_swap(journal: Path) -> None:
    """A killed two-rename swap: put whichever complete version is left back at the target."""
    try:
        doc = json.loads(journal.read_text(encoding="utf-8"))
        folder = journal.parent
        target, new, old = folder / doc["target"], folder / doc["new"], folder / doc["old"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    if not os.path.lexists(target):
        for candidate in (new, old):  # the new version was complete before the journal was written
            if candidate.is_dir():
                os.rename(candidate, target)
                break


def _swap_folders(tmp: Path, path: Path) -> Path:
    """Put folder `tmp` at `path`, which holds an old folder; returns where the old version now is."""
    if _renameat2(tmp, path, _RENAME_EXCHANGE):
        return tmp
    old = _temp_name(path, "old")
    journal = _temp_name(path, "swap")
    journal_tmp = journal.with_suffix(".tmp")
    journal_tmp.write_text(json.dumps({"target": path.name, "new": tmp.name, "old": old.name}), encoding="utf-8")
    os.replace(journal_tmp, journal)
    _fsync_dir(path.parent)
    os.rename(path, old)
    os.rename(tmp, path)
    journal.unlink()
    return old


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_error(path: Path, exc: OSError) -> PruneCliError:
    return PruneCliError(f"cannot write {path}: {exc.strerror or exc} (nothing was written)")


# ---------------------------------------------------------------------------------------------- writers
def atomic_file(path: Path, force: bool = False, inputs: Inputs = ()) -> contextlib.AbstractContextManager[Path]:
    """Yield a temporary path; on normal exit it becomes `path`, on error it is removed."""
    return _atomic_output(Path(path), force, inputs, is_dir=False)


def atomic_directory(path: Path, force: bool = False,
                     inputs: Inputs = ()) -> contextlib.AbstractContextManager[Path]:
    """Yield a temporary directory (holding the prunecli marker); on normal exit it becomes `path`."""
    return _atomic_output(Path(path), force, inputs, is_dir=True)


@contextlib.contextmanager
def _atomic_output(path: Path, force: bool, inputs: Inputs, is_dir: bool) -> Iterator[Path]:
    """The one commit protocol of every output: checked target, temporary beside it (created inside the `try`, so an
    interrupt right after its creation still removes it), write errors as one line, then the rename (or, with
    --force, the replacement: a file by `os.replace`, a folder by an exchange) with signals held, and cleanup of
    whatever is left on any exit."""
    check_output_path(path, force, is_dir=is_dir, inputs=inputs)
    clean_leftovers(_parent(path))
    tmp_path = _temp_name(path, "tmp")
    old: Path | None = None
    try:
        if is_dir:
            os.mkdir(tmp_path, output_mode(is_dir=True))
            (tmp_path / MARKER).write_text(json.dumps({"written_by": "prunecli"}) + "\n", encoding="utf-8")
        else:
            os.close(os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, output_mode()))
        try:
            yield tmp_path
        except OSError as exc:
            if exc.errno in _WRITE_ERRNOS:
                raise _write_error(path, exc) from exc
            raise
        with _signals_held():
            if force and os.path.lexists(path):
                _check_replaceable(path)
                if is_dir:
                    old = _swap_folders(tmp_path, path)
                else:
                    os.replace(tmp_path, path)
            else:
                _rename_noreplace(tmp_path, path, is_dir=is_dir)
            _COMMITTED.append(path)
        _fsync_dir(_parent(path))
    finally:
        for leftover in (tmp_path, old):
            if leftover is not None and os.path.lexists(leftover):
                _remove(leftover)
