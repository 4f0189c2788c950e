"""Reconciler: the index and the files under ``instances/`` agree, and nothing is lost silently.

Run by ``echonode serve`` before it accepts associations (repair, no hashing) and by
``echonode fsck`` (read-only unless ``--repair``; hashes every indexed file unless ``--quick``).

* a file under ``instances/`` that no row names (a commit that failed or a crash between
  placing the file and its commit) is indexed through the spool's own path
  (:meth:`echonode.dicom.spool.Spool.index_file`); as a new instance, or, when the SOP
  Instance UID is already indexed, as a non-current version (it was never acknowledged);
* a file that cannot be indexed (unparseable, not where its header says, a second copy of
  indexed bytes, not a regular file) is moved to ``<data_dir>/orphans/`` with a ``.txt``
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

from echonode.dicom.spool import DIR_MODE, FILE_MODE, Spool, _fsync_dir, file_sha256
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


def _move_to_orphans(root: Path, path: Path, reason: str) -> Path:
    """Rename ``path`` into ``<root>/orphans/`` (name: timestamp + random, never DICOM-derived)."""
    folder = root / ORPHANS
    if not folder.is_dir():
        folder.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        _fsync_dir(folder.parent)
    name = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(6)
    target = folder / f"{name}.dcm"
    note = folder / f"{name}.txt"
    fd = os.open(note, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(f"was: {path.relative_to(root)}\nreason: {reason}\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.rename(path, target)
    _fsync_dir(folder)
    _fsync_dir(path.parent)
    return target


def reconcile(settings, sessions, spool: Optional[Spool], *, repair: bool, verify: bool,
              min_age_s: float = 0.0) -> Report:
    """Compare ``instances/`` with the index; with ``repair`` (needs ``spool``) fix what can be."""
    root = Path(settings.data_path)
    storage = Path(settings.storage_path)
    incoming = storage / ".incoming"
    rep = Report(repair=repair, verify=verify)
    now = time.time()
    known = indexed_files(sessions)
    rep.indexed_rows = len(known)

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

    seen: set[str] = set()
    if storage.is_dir():
        for dirpath, dirnames, filenames in os.walk(storage):
            here = Path(dirpath)
            if here == storage:
                dirnames[:] = [d for d in dirnames if d != ".incoming"]
            dirnames.sort()
            for fname in sorted(filenames):
                path = here / fname
                rel = str(path.relative_to(root))
                try:
                    st = path.lstat()
                except FileNotFoundError:
                    continue
                rep.files += 1
                entry = known.get(rel)
                if entry is not None:
                    seen.add(rel)
                    if entry.size is not None and st.st_size != entry.size:
                        rep.size_mismatch.append(rel)
                    elif verify and file_sha256(path) != entry.sha256:
                        rep.sha_mismatch.append(rel)
                    continue
                if now - st.st_mtime < min_age_s:
                    rep.recent.append(rel)
                    continue
                if not repair:
                    rep.unindexed.append(rel)
                    continue
                _adopt(rep, root, spool, path, rel, st)
    for rel in sorted(set(known) - seen):
        if not (root / rel).is_file():
            rep.missing.append(rel)
    return rep


def _adopt(rep: Report, root: Path, spool: Optional[Spool], path: Path, rel: str, st: os.stat_result) -> None:
    assert spool is not None, "repair needs the spool"
    reason = ""
    if not stat.S_ISREG(st.st_mode):
        reason = "not a regular file"
    else:
        try:
            res = spool.index_file(path)
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
        target = _move_to_orphans(root, path, reason)
    except OSError as exc:
        rep.index_failed.append({"path": rel, "reason": f"{reason}; not moved: {exc.strerror or exc}"})
        return
    LOG.warning("file without a row moved to %s/%s: %s", ORPHANS, target.name, reason)
    rep.orphaned.append({"path": rel, "orphan": str(target.relative_to(root)), "reason": reason})
