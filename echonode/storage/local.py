"""The default store: files under the data directory, as the node always kept them.

A new object is hard-linked into place from a temp file the caller fsynced, never renamed
over an existing file, and every directory created on the way is fsynced with its parent,
so a committed row never names a file a power cut can take back (docs/durability.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Optional

from echonode.files import FILE_MODE, atomic_write, fsync_dir, make_dirs
from echonode.storage import Storage, StoredObject, check_key

_CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class LocalStorage(Storage):
    kind = "local"
    needs_synced_source = True

    def __init__(self, root: Path, *, fsync_workers: int = 4):
        self.root = Path(root)
        self._io: Optional[ThreadPoolExecutor] = None
        self._workers = fsync_workers

    def _pool(self) -> ThreadPoolExecutor:
        if self._io is None:
            self._io = ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="storage-fsync")
        return self._io

    def path(self, key: str) -> Path:
        """The file of ``key``. Rows written before keys may hold an absolute path: accepted
        when it lies under the data directory, refused otherwise."""
        if key.startswith("/"):
            p = Path(key).resolve()
            if self.root.resolve() not in p.parents:
                raise ValueError("path outside the data directory refused")
            return p
        return self.root / check_key(key)

    local_path = path

    def put_new(self, key: str, src: Path, sha256: str) -> Optional[Callable[[], None]]:
        final = self.path(key)
        created = make_dirs(final.parent, self.root)
        os.link(src, final)  # FileExistsError: never over an existing object
        futures: list[Future] = [self._pool().submit(fsync_dir, d)
                                 for d in {final.parent, *(c.parent for c in created)}]

        def wait() -> None:
            for f in futures:
                f.result()
        return wait

    def put(self, key: str, src: Path, *, move: bool = False) -> None:
        final = self.path(key)
        if Path(src).resolve() == final.resolve():
            return
        created = make_dirs(final.parent, self.root)
        if move:
            os.chmod(src, FILE_MODE)
            os.replace(src, final)
            for d in {final.parent, *(c.parent for c in created)}:
                fsync_dir(d)
            return
        with open(src, "rb") as fin:
            atomic_write(final, lambda fout: shutil.copyfileobj(fin, fout, _CHUNK))
        for d in {c.parent for c in created}:
            fsync_dir(d)

    def write(self, key: str, write: Callable[[BinaryIO], None]) -> None:
        atomic_write(self.path(key), write)

    def sha256(self, key: str) -> Optional[str]:
        try:
            return file_sha256(self.path(key))
        except FileNotFoundError:
            return None

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def size(self, key: str) -> Optional[int]:
        p = self.path(key)
        return p.stat().st_size if p.is_file() else None

    @contextlib.contextmanager
    def fetch(self, key: str) -> Iterator[Path]:
        p = self.path(key)
        if not p.is_file():
            raise FileNotFoundError(f"no object {key}")
        yield p

    def delete(self, key: str) -> None:
        p = self.path(key)
        p.unlink(missing_ok=True)
        fsync_dir(p.parent)

    def list(self, prefix: str) -> Iterator[StoredObject]:
        base = self.root / check_key(prefix)
        if not base.is_dir():
            return
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if name.startswith("."):
                    continue
                p = Path(dirpath) / name
                try:
                    st = p.lstat()
                except FileNotFoundError:
                    continue
                yield StoredObject(str(p.relative_to(self.root)), st.st_size, st.st_mtime)

    def close(self) -> None:
        if self._io is not None:
            self._io.shutdown(wait=True)
