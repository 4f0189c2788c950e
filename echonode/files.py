"""Where echonode's own files go and how they are written: private directories, atomic writes.

Everything under the data directory (the local store's objects, the SQLite database, models, caches) holds
patient data or what was derived from it, so directories are created ``0750`` and files
``0640``: the service account and its group, nobody else. Received instances, results
and quarantine go through the node's store (``echonode.storage``), whose local backend
writes with the helpers here.

An atomic write is temp file in the same directory, fsync, rename, fsync of the
directory: a reader (the delivery, a PACS fetching a file, a restarted worker) sees the
old file or the new one, never half of one, and a power cut keeps one of them.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Union

__all__ = ["DIR_MODE", "FILE_MODE", "ensure_dir", "make_dirs", "fsync_dir", "create_new", "atomic_write",
           "atomic_write_bytes", "restrict"]

DIR_MODE = 0o750
FILE_MODE = 0o640


def ensure_dir(path: Union[str, Path]) -> Path:
    """``path`` and its missing parents, created ``0750``; an existing directory is left as it is
    (an operator may have opened it up on purpose)."""
    p = Path(path)
    if not p.is_dir():
        # mkdir's mode is masked by the umask; chmod what we created so 0750 holds either way
        missing = [q for q in (p, *p.parents) if not q.exists()]
        p.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        for q in missing:
            try:
                os.chmod(q, DIR_MODE)
            except OSError:
                pass
    return p


def make_dirs(path: Union[str, Path], base: Union[str, Path]) -> list[Path]:
    """mkdir -p with DIR_MODE on every level below ``base`` (``base`` too when missing).
    Returns the directories it created below ``base``: their parents need an fsync for
    them to last (the spool's placement waits for those before the SQL commit)."""
    path, base = Path(path), Path(base)
    if path.is_dir():
        return []
    if not base.is_dir():
        ensure_dir(base)
    missing = []
    p = path
    while p != base and not p.is_dir():
        missing.append(p)
        p = p.parent
    created = []
    for d in reversed(missing):
        try:
            d.mkdir(mode=DIR_MODE)
            os.chmod(d, DIR_MODE)
            created.append(d)
        except FileExistsError:
            pass
    return created


def fsync_dir(path: Union[str, Path], *, strict: bool = False) -> None:
    """Make a rename or a new file in ``path`` durable. ``strict``: an error is raised (the
    spool's acknowledgement depends on it); otherwise best effort where directories cannot
    be opened."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        if strict:
            raise
        return
    try:
        os.fsync(fd)
    except OSError:
        if strict:
            raise
    finally:
        os.close(fd)


def create_new(path: Union[str, Path]) -> BinaryIO:
    """A new file opened for writing, ``0640``, never over an existing one (``FileExistsError``)."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE), "wb")


def atomic_write(path: Union[str, Path], write: Callable[[BinaryIO], None]) -> Path:
    """Write ``path`` atomically (mode ``0640``): ``write(fh)`` fills a temp file in the same
    directory, which is fsynced and renamed over ``path``. The directory is created ``0750``."""
    final = Path(path)
    folder = ensure_dir(final.parent)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=final.suffix, dir=folder)
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(folder)
    return final


def atomic_write_bytes(path: Union[str, Path], data: bytes) -> Path:
    return atomic_write(path, lambda fh: fh.write(data))


def restrict(folder: Union[str, Path]) -> None:
    """``folder`` 0750 and the regular files directly in it 0640 (files another library wrote)."""
    folder = Path(folder)
    os.chmod(folder, DIR_MODE)
    for p in folder.iterdir():
        if p.is_file() and not p.is_symlink():
            os.chmod(p, FILE_MODE)
