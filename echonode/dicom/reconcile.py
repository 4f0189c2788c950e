"""Reconciler: the index and the objects under ``instances/`` agree, and nothing is lost silently.

The objects are those of the node's store (``echonode.storage``): files under the data
directory, or an S3 bucket, where every receiver puts its instances.

Run by ``echonode serve`` before it accepts associations (repair, no hashing) and by
``echonode fsck`` (read-only unless ``--repair``; hashes every indexed file unless ``--quick``).

* a file under ``instances/`` that no row names (a commit that failed or a crash between
  placing the file and its commit) is indexed through the spool's own path
  (:meth:`echonode.dicom.spool.Spool.index_file`); as a new instance, or, when the SOP
  Instance UID is already indexed, as a non-current version (it was never acknowledged);
* a file that cannot be indexed (unparseable, not where its header says, a second copy of
  indexed bytes, not a regular file) is moved to ``orphans/`` in the store with a ``.txt``
  giving the reason and where it was; never deleted;
* a row whose file is missing, or whose size or sha256 disagrees with the file, is reported
  (nothing can repair it; the report names it);
* temp files in ``instances/.incoming`` (never acknowledged) are removed.

Beside a running node (``serve`` holds :data:`SERVE_LOCK`) files younger than ``min_age_s``
are left alone: they may be between placement and commit.
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from echonode.dicom.spool import Spool
from echonode.files import FILE_MODE
from echonode.storage import INSTANCES, Storage, StorageUnavailable, open_storage
from echonode.storage.local import file_sha256
from echonode.store.index import indexed_files

LOG = logging.getLogger("echonode.reconcile")

SERVE_LOCK = ".serve.lock"
ORPHANS = "orphans"


def hold_serve_lock(data_path: Path) -> int:
    """Taken by ``serve`` for its lifetime (released by the kernel, even on kill -9)."""
    fd = os.open(Path(data_path) / SERVE_LOCK, os.O_RDWR | os.O_CREAT, FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise
    return fd


def serve_running(data_path: Path) -> bool:
    p = Path(data_path) / SERVE_LOCK
    if not p.exists():
        return False
    fd = os.open(p, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


@dataclass
class Report:
    repair: bool
    verify: bool
    files: int = 0                    # files seen under instances/ (without .incoming)
    indexed_rows: int = 0             # paths named by the index
    indexed: list[str] = field(default_factory=list)      # orphan files now indexed (repair)
    unindexed: list[str] = field(default_factory=list)    # files without a row (read-only run)
    orphaned: list[dict] = field(default_factory=list)    # moved to orphans/ (repair)
    index_failed: list[dict] = field(default_factory=list)  # could be indexed, but the database refused
    missing: list[str] = field(default_factory=list)      # rows without a file
    size_mismatch: list[str] = field(default_factory=list)
    sha_mismatch: list[str] = field(default_factory=list)
    incoming: list[str] = field(default_factory=list)     # temp files found (removed with repair)
    recent: list[str] = field(default_factory=list)       # left alone beside a running node

    def problems(self) -> int:
        """What is still wrong after this run (what a repair fixed does not count)."""
        n = len(self.missing) + len(self.size_mismatch) + len(self.sha_mismatch) + len(self.index_failed)
        if not self.repair:
            n += len(self.unindexed) + len(self.incoming)
        return n

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["problems"] = self.problems()
        return d

    def summary(self) -> str:
        return (f"{self.files} files, {self.indexed_rows} indexed paths: {len(self.indexed)} indexed now, "
                f"{len(self.unindexed)} without a row, {len(self.orphaned)} moved to orphans, "
                f"{len(self.index_failed)} not indexable now, {len(self.missing)} missing, "
                f"{len(self.size_mismatch)} size and {len(self.sha_mismatch)} sha256 mismatches, "
                f"{len(self.incoming)} temp files{' removed' if self.repair else ''}, "
                f"{len(self.recent)} recent files left alone")


def _move_to_orphans(store: Storage, rel: str, reason: str) -> str:
    """Move the object ``rel`` to ``orphans/`` (name: timestamp + random, never DICOM-derived)
    with a ``.txt`` naming where it was and why; returns the new key."""
    name = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(6)
    target = f"{ORPHANS}/{name}.dcm"
    store.put_bytes(f"{ORPHANS}/{name}.txt", f"was: {rel}\nreason: {reason}\n".encode("utf-8"))
    local = store.local_path(rel)
    if local is not None:
        store.put(target, local, move=True)   # a rename: the file itself, not a copy
    else:
        with store.fetch(rel) as tmp:
            store.put(target, tmp, move=True)
    store.delete(rel)
    return target


def reconcile(settings, sessions, spool: Optional[Spool], *, repair: bool, verify: bool,
              min_age_s: float = 0.0, objects: bool = True) -> Report:
    """Compare ``instances/`` in the node's store with the index; with ``repair`` (needs
    ``spool``) fix what can be. ``objects=False``: only the local temp files (``serve`` on
    object storage, where listing the bucket is ``echonode fsck``'s job)."""
    store = spool.objects if spool is not None else open_storage(settings)
    incoming = Path(settings.storage_path) / ".incoming"
    rep = Report(repair=repair, verify=verify)
    now = time.time()

    if incoming.is_dir():
        for p in sorted(incoming.iterdir()):
            try:
                st = p.lstat()
            except FileNotFoundError:
                continue
            if now - st.st_mtime < min_age_s:
                continue  # in flight on a running node
            rep.incoming.append(p.name)
            if repair:
                p.unlink(missing_ok=True)
    if not objects:
        return rep

    known = indexed_files(sessions)
    rep.indexed_rows = len(known)
    seen: set[str] = set()
    for obj in store.list(INSTANCES):
        rel = obj.key
        rep.files += 1
        entry = known.get(rel)
        if entry is not None:
            seen.add(rel)
            if entry.size is not None and obj.size != entry.size:
                rep.size_mismatch.append(rel)
            elif verify:
                with store.fetch(rel) as path:
                    if file_sha256(path) != entry.sha256:
                        rep.sha_mismatch.append(rel)
            continue
        if now - obj.mtime < min_age_s:
            rep.recent.append(rel)
            continue
        if not repair:
            rep.unindexed.append(rel)
            continue
        _adopt(rep, store, spool, rel)
    for rel in sorted(set(known) - seen):
        if not store.exists(rel):
            rep.missing.append(rel)
    return rep


def _adopt(rep: Report, store: Storage, spool: Optional[Spool], rel: str) -> None:
    assert spool is not None, "repair needs the spool"
    reason = ""
    local = store.local_path(rel)
    if local is not None and not stat.S_ISREG(local.lstat().st_mode):
        reason = "not a regular file"
    else:
        try:
            with store.fetch(rel) as path:
                res = spool.index_file(path, key=rel)
        except StorageUnavailable as exc:
            rep.index_failed.append({"path": rel, "reason": str(exc)})
            return
        except Exception as exc:  # unreadable, not DICOM, not where its header says
            reason = f"cannot be indexed: {type(exc).__name__}: {str(exc)[:200]}"
        else:
            if not res.ok:  # database refused: leave the file, report it, try again next run
                rep.index_failed.append({"path": rel, "reason": res.reason})
                return
            if res.duplicate and res.reason != "already indexed":
                reason = "identical copy of bytes indexed at another path"
            else:
                rep.indexed.append(rel)
                return
    try:
        target = _move_to_orphans(store, rel, reason)
    except OSError as exc:
        rep.index_failed.append({"path": rel, "reason": f"{reason}; not moved: {exc.strerror or exc}"})
        return
    LOG.warning("file without a row moved to %s: %s", target, reason)
    rep.orphaned.append({"path": rel, "orphan": target, "reason": reason})
