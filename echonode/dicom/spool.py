"""Durable receive: temp file → the object durable in the node's store → SQL commit → Success.

The dataset bytes are stored exactly as received on the wire (never decoded and
re-encoded, never transcoded), preceded by a File Meta Information group that we
write ourselves (PS3.10 §7.1: DIMSE carries no file meta). The file meta is
deterministic (SOP class, SOP instance, transfer syntax, our implementation UID), so
the same object received twice gives the same file and the same sha256.

Keys in the node's store (``echonode.storage``; the local store keeps them as paths under
``<data_dir>/``: temp file fsynced, hard-linked into place, directories fsynced; object
storage: one conditional PUT)::

    instances/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm
    instances/<Study>/<Series>/<SOPInstanceUID>.<sha256[:16]>.dcm  (a later, different
                                                       object with the same SOP Instance UID)
    quarantine/<UTC timestamp>-<random>.dcm            (rejected input, never DICOM-derived)

and, always on the local disk, ``<data_dir>/instances/.incoming/<random>.part`` (in flight).

Received datasets are streamed: the SCP hands each P-DATA fragment to an
:class:`Incoming` file (file meta first, then the dataset bytes, hashed as they
arrive), so an instance is never held whole in memory and the write overlaps the
receive. ``Spool.store`` (bytes already in memory) goes through the same path.

Statuses (PS3.4 Annex B.2.3 and GG.4): 0x0000 Success; 0xA700 Out of Resources
(free-space floor, disk full, instance above ``node.max_instance_mb``, object store
unreachable); 0xA900 Data Set does not match SOP Class (missing or
invalid UIDs, UIDs that disagree with the command); 0xC210 Cannot understand
(unparseable dataset, Deflated data inflating beyond its bound); 0xC211 processing failure (I/O or database error).
"""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import os
import secrets
import shutil
import threading
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional

from pydicom import dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID

from echonode import __version__
from echonode.config import Settings
from echonode.dicom import select as selection
from echonode.dicom.uids import UIDError, check_uid, is_valid_uid
from echonode.files import DIR_MODE, FILE_MODE, create_new, fsync_dir
from echonode.storage import QUARANTINE, Storage, StorageUnavailable, open_storage
from echonode.storage.local import file_sha256
from echonode.store.index import InstanceRecord, record_instance
from echonode.store.db import describe_error

LOG = logging.getLogger("echonode.spool")

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC210
PROCESSING_FAILURE = 0xC211

#: echonode's implementation class UID (under the UUID-derived 2.25 root).
IMPLEMENTATION_CLASS_UID = "2.25.195367744316419330117389218264546237731"
IMPLEMENTATION_VERSION = ("ECHONODE_" + __version__.replace(".", ""))[:16]

_CHUNK = 1 << 20
DEFLATED = "1.2.840.10008.1.2.1.99"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
# while a dataset streams in, start writeback every this many bytes (sync_file_range,
# asynchronous) so that the final fsync before Success has little left to write
_EARLY_SYNC = 1 << 20


def _load_sync_file_range():
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.sync_file_range
        fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
        fn.restype = ctypes.c_int
        return fn
    except (OSError, AttributeError):
        return None


_SYNC_FILE_RANGE = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


#: at most this many bytes are read while parsing a header (values above 4 KiB are skipped,
#: not read): a "header" of millions of tiny elements costs ~40x its size in Python objects
MAX_HEADER_BYTES = 2 * 1024 * 1024


class LimitExceeded(ValueError):
    """A bound of the node was hit while parsing (header size, inflated size). Its text is
    the node's own, with no header values in it, so it may be logged."""


class _BoundedReader(io.RawIOBase):
    """A read-only file whose reads stop the parse beyond ``limit`` bytes in total."""

    def __init__(self, fh, limit: int):
        self._fh, self._left = fh, limit
        self.name = fh.name  # deferred values are read later from the file by name

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self._fh.read(n)
        self._left -= len(data)
        if self._left < 0:
            raise LimitExceeded(f"dataset header above {MAX_HEADER_BYTES} bytes")
        return data

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._fh.seek(offset, whence)

    def tell(self) -> int:
        return self._fh.tell()


#: Binary values stay deferred (never read): a private blob or an icon is not needed by anyone.
_BINARY_VRS = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN"})


def read_header(path: Path):
    """The dataset header (no pixel data), reading at most :data:`MAX_HEADER_BYTES`.

    Values above 4 KiB are deferred while parsing; the text ones among them (a long Series
    Description, Image Comments) are then read while the file is still open, because a
    deferred value cannot be read once it is closed and selection, the index and the audit
    read them. Binary values stay unread and read as absent."""
    with open(path, "rb") as fh:
        ds = dcmread(_BoundedReader(fh, MAX_HEADER_BYTES), stop_before_pixels=True, defer_size=4096)
        for tag in list(ds.keys()):
            raw = ds.get_item(tag)
            if raw is None or getattr(raw, "value", 0) is not None or raw.VR in _BINARY_VRS:
                continue
            try:
                ds[tag]   # reads the deferred value from the open file (within MAX_HEADER_BYTES)
            except Exception:
                del ds[tag]   # beyond the bound or malformed: absent, as a binary value would be
    return ds


def version_name_ok(name: str, sop: str) -> bool:
    """``name`` is one the spool gives a version of ``sop``: ``<SOP>.dcm`` (the first),
    ``<SOP>.<sha256[:16]>.dcm`` (later ones), ``<SOP>.<sha256[:16]>-<8 hex>.dcm`` (a prefix clash)."""
    if name == f"{sop}.dcm":
        return True
    if not (name.startswith(sop + ".") and name.endswith(".dcm")):
        return False
    tag = name[len(sop) + 1:-4]
    hexdigits = set("0123456789abcdef")
    return (len(tag) == 16 or (len(tag) == 25 and tag[16] == "-")) and set(tag.replace("-", "")) <= hexdigits


class Incoming(io.BytesIO):
    """One instance being received, written straight to a temp file under
    ``instances/.incoming`` (same file system as its final place).

    A ``BytesIO`` subclass only because pynetdicom's C-STORE primitive expects one for
    its DataSet; nothing is kept in memory: ``write`` appends to the file and the
    sha256. Beyond ``max_bytes`` the rest is counted and dropped (answered 0xA700).
    ``uid_error``: the command's UIDs cannot name a file; the dataset is still taken
    (for quarantine) but without file meta.
    """

    def __init__(self, directory: Path, meta: bytes, max_bytes: int, *, uid_error: str = "",
                 early_sync: Optional[Callable[[int], None]] = None):
        super().__init__()
        self.path = directory / f"{secrets.token_hex(12)}.part"
        self.meta_len = len(meta)
        self.uid_error = uid_error
        self.max_bytes = max_bytes
        self.size = 0
        self.overflow = False
        self.finished = False
        self.write_error: Optional[OSError] = None
        self._sha = hashlib.sha256()
        self._early_sync = early_sync
        self._next_sync = _EARLY_SYNC
        self.fd: Optional[int] = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        try:
            self.write(meta)
        except BaseException:
            self.abandon()
            raise

    # -- the file-like part pynetdicom uses
    def write(self, data) -> int:  # type: ignore[override]
        n = len(data)
        if self.fd is None or self.overflow:
            self.size += n
            return n
        if self.size + n > self.max_bytes:
            self.overflow = True
            self.size += n
            os.ftruncate(self.fd, 0)  # nothing of it will be kept: free the disk now
            return n
        view = memoryview(data)
        self._sha.update(view)
        try:
            while view:
                view = view[os.write(self.fd, view):]
        except OSError as exc:  # disk full, I/O error: answered when the dataset is complete
            self.write_error = exc
            os.close(self.fd)
            self.fd = None
            self.size += n
            return n
        self.size += n
        if self._early_sync is not None and self.size >= self._next_sync:
            self._next_sync = self.size + _EARLY_SYNC
            if _SYNC_FILE_RANGE is not None:  # start writeback of everything so far; returns at once
                _SYNC_FILE_RANGE(self.fd, 0, 0, _SYNC_FILE_RANGE_WRITE)
            else:
                self._early_sync(self.fd)
        return n

    def getvalue(self) -> bytes:  # never the data: it is on disk
        return b""

    def getbuffer(self):
        return memoryview(b"")

    def tell(self) -> int:
        return self.size

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()

    def release_fd(self) -> int:
        fd, self.fd = self.fd, None
        self.finished = True
        return fd  # type: ignore[return-value]

    def abandon(self) -> None:
        """Association ended before the dataset was stored: drop the partial file."""
        self.finished = True
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None
        try:
            self.path.unlink()
        except OSError:
            pass


@dataclass
class StoreResult:
    status: int
    reason: str = ""
    sop_instance_uid: str = ""
    study_instance_uid: str = ""
    duplicate: bool = False
    replaced: bool = False
    path: Optional[Path] = None
    quarantine: Optional[Path] = None
    # What the audit record names, taken from the header parsed (bounded) once here, so
    # that nothing re-reads the stored or quarantined file: series, SOP class, accession
    # and the patient (an audit.PatientRef; PHI by design of PS3.15, never logged).
    series_instance_uid: str = ""
    sop_class_uid: str = ""
    accession_number: str = ""
    patient: Any = None

    @property
    def ok(self) -> bool:
        return self.status == SUCCESS

    def with_header(self, ds: Any) -> "StoreResult":
        """This result plus the audit facts of the parsed header ``ds`` (None: unchanged)."""
        if ds is None:
            return self
        from echonode.audit.events import patient_of
        return replace(self, study_instance_uid=self.study_instance_uid or _text(ds, "StudyInstanceUID") or "",
                       series_instance_uid=_text(ds, "SeriesInstanceUID") or "",
                       sop_class_uid=_text(ds, "SOPClassUID") or "",
                       accession_number=_text(ds, "AccessionNumber") or "", patient=patient_of(ds))


def _wait_quietly(fut: Future) -> None:
    try:
        fut.result()
    except Exception:
        pass


def file_meta_bytes(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str) -> bytes:
    """Preamble + 'DICM' + File Meta Information group for a received dataset."""
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = UID(transfer_syntax_uid)
    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    buf = io.BytesIO()
    buf.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buf, meta, enforce_standard=True)
    return buf.getvalue()


def _explicit_meta(meta: bytes) -> bytes:
    """The same file meta with Explicit VR Little Endian as its transfer syntax (for the
    inflated copy that is parsed; the stored file keeps the Deflated one)."""
    from pydicom import dcmread as _read

    fm = _read(io.BytesIO(meta), stop_before_pixels=True).file_meta
    return file_meta_bytes(str(fm.MediaStorageSOPClassUID), str(fm.MediaStorageSOPInstanceUID), EXPLICIT_LE)


def _text(ds: Any, keyword: str, limit: int = 64) -> Optional[str]:
    try:
        value = ds.get(keyword)
    except Exception:
        return None
    if value is None:
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = "\\".join(str(v) for v in value)
    text = str(value).strip().replace("\x00", "")
    return text[:limit] if text else None


_INT_MIN, _INT_MAX = -2**31, 2**31 - 1  # IS range (PS3.5 §6.2) and the SQL INTEGER columns


def _int(ds: Any, keyword: str) -> Optional[int]:
    """An integer attribute, or None when absent, unparsable or outside the 32-bit range
    (an out-of-range InstanceNumber must not make PostgreSQL refuse the whole instance)."""
    try:
        value = ds.get(keyword)
        if value is None or value == "":
            return None
        n = int(value)
    except Exception:
        return None
    return n if _INT_MIN <= n <= _INT_MAX else None


def _float(ds: Any, keyword: str) -> Optional[float]:
    try:
        value = ds.get(keyword)
        return None if value is None or value == "" else float(value)
    except Exception:
        return None


def _date(ds: Any, keyword: str) -> Optional[str]:
    """DA as YYYYMMDD; the old ACR-NEMA form YYYY.MM.DD is normalised; anything else kept (≤ 8)."""
    text = _text(ds, keyword, 16)
    if text and len(text) == 10 and text[4] == "." and text[7] == ".":
        text = text.replace(".", "")
    return text[:8] if text else None


def index_attributes(ds: Any) -> dict:
    """The indexed header attributes of one parsed dataset (no UIDs, no pixel data)."""
    return {
        "patient_id": _text(ds, "PatientID") or "",
        "issuer": _text(ds, "IssuerOfPatientID") or "",
        "birth_date": _date(ds, "PatientBirthDate"),
        "sex": _text(ds, "PatientSex", 16),
        "study_date": _date(ds, "StudyDate"),
        "study_time": _text(ds, "StudyTime", 16),
        "accession_number": _text(ds, "AccessionNumber"),
        "study_id": _text(ds, "StudyID", 16),
        "study_description": _text(ds, "StudyDescription"),
        "modality": _text(ds, "Modality", 16),
        "series_number": _int(ds, "SeriesNumber"),
        "series_description": _text(ds, "SeriesDescription"),
        "instance_number": _int(ds, "InstanceNumber"),
        "image_type": _text(ds, "ImageType", 128),
        "rows": _int(ds, "Rows"),
        "columns": _int(ds, "Columns"),
        "number_of_frames": _int(ds, "NumberOfFrames"),
        "frame_time_ms": _float(ds, "FrameTime"),
        "cine_rate": _float(ds, "CineRate") or _float(ds, "RecommendedDisplayFrameRate"),
        "photometric": _text(ds, "PhotometricInterpretation", 16),
        "manufacturer": _text(ds, "Manufacturer"),
        "model_name": _text(ds, "ManufacturerModelName"),
    }


class Spool:
    """Receives one dataset at a time, durably. Thread-safe; one per process.

    ``session_factory`` is a SQLAlchemy ``sessionmaker``; ``on_stored(result)`` is an
    optional callback after each successful commit (metrics, tests).
    """

    def __init__(self, settings: Settings, session_factory, *,
                 on_stored: Optional[Callable[[StoreResult], None]] = None, clean_incoming: bool = True,
                 store: Optional[Storage] = None):
        self.settings = settings
        self.sessions = session_factory
        self.root = settings.data_path
        self.storage = settings.storage_path
        self.incoming = self.storage / ".incoming"   # local in every deployment: temp files only
        self.quarantine_dir = settings.quarantine_path
        self.objects: Storage = store if store is not None else open_storage(settings)
        self.min_free = int(settings.node.min_free_mb) * 1024 * 1024
        self.on_stored = on_stored
        self._locks = [threading.Lock() for _ in range(64)]
        # fsyncs run here so that they overlap with parsing and SQL statements; the order
        # temp fsync → rename → dir fsync → SQL COMMIT is kept (see _commit)
        self._io = ThreadPoolExecutor(max_workers=max(4, 2 * int(settings.node.max_associations)),
                                      thread_name_prefix="spool-fsync")
        self.max_instance = int(settings.node.max_instance_mb) * 1024 * 1024
        self.max_ratio = int(settings.node.max_inflate_ratio)
        for d in (self.storage, self.incoming, self.quarantine_dir):
            d.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            os.chmod(d, DIR_MODE)  # also tightens directories made by older versions
        # the entries of these directories (and of data_dir) must last too, not only the files in them
        for d in {self.storage, self.quarantine_dir, self.root, self.root.parent}:
            fsync_dir(d, strict=True)
        if clean_incoming:  # not for `fsck` beside a running node: those files are in flight
            self._clean_incoming()

    def close(self) -> None:
        self._io.shutdown(wait=True)

    # ------------------------------------------------------------------ helpers
    def _clean_incoming(self) -> None:
        """Partial files from a crash were never acknowledged: remove them."""
        for p in self.incoming.glob("*.part"):
            try:
                p.unlink()
            except OSError:
                pass

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.storage).free

    def has_space(self) -> bool:
        return self.free_bytes() >= self.min_free

    def relpath(self, study: str, series: str, sop: str) -> Path:
        """Where the first version of an instance goes (later versions: :func:`version_name_ok`)."""
        return Path("instances") / study / series / f"{sop}.dcm"

    def quarantine(self, meta: bytes, data, reason: str, tmp: Optional[Path] = None) -> Optional[Path]:
        """Keep rejected input (``tmp``: the received file, moved; else ``meta`` + ``data``)
        in the store's ``quarantine/`` with its reason beside it. The name is a timestamp +
        random, never DICOM-derived. Returns where it went (a key for object storage)."""
        name = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(6)
        key = f"{QUARANTINE}/{name}.dcm"
        ours = tmp is None   # a temp file made here is removed here, whatever happens
        try:
            if tmp is None:
                tmp = self.incoming / f"{name}.part"
                with create_new(tmp) as fh:
                    fh.write(meta)
                    fh.write(data)
                    if self.objects.needs_synced_source:
                        fh.flush()
                        os.fsync(fh.fileno())
            self.objects.put(key, tmp, move=True)
            self.objects.put_bytes(f"{QUARANTINE}/{name}.txt", (reason + "\n").encode("utf-8"))
        except OSError as exc:
            LOG.error("could not write quarantine copy: %s", exc.strerror or exc)
            if ours and tmp is not None:
                tmp.unlink(missing_ok=True)
            return None
        local = self.objects.local_path(key)
        return local if local is not None else Path(key)

    @staticmethod
    def _fsync_close(fd: int) -> None:
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _early_sync(self, fd: int) -> None:
        # start writeback of what has arrived so far while the rest is still on the wire
        # (on a duplicate descriptor: the Incoming may close its own before this runs)
        dup = os.dup(fd)

        def sync() -> None:
            try:
                os.fdatasync(dup)
            finally:
                os.close(dup)

        self._io.submit(sync)

    def begin(self, sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str) -> Incoming:
        """A new :class:`Incoming` for a C-STORE whose command set just arrived."""
        try:
            check_uid(str(sop_class_uid).strip(), "Affected SOP Class UID", strict=False)
            sop_instance_uid = check_uid(str(sop_instance_uid).strip(), "Affected SOP Instance UID", strict=False)
            check_uid(str(transfer_syntax_uid).strip(), "Transfer Syntax UID", strict=False)
            meta = file_meta_bytes(str(sop_class_uid).strip(), sop_instance_uid, str(transfer_syntax_uid).strip())
            err = ""
        except (UIDError, ValueError, TypeError) as exc:
            meta, err = b"", str(exc)[:200]
        # object storage: the acknowledged PUT is the durability, the temp file needs no fsync
        return Incoming(self.incoming, meta, self.max_instance, uid_error=err,
                        early_sync=self._early_sync if self.objects.needs_synced_source else None)

    # ------------------------------------------------------------------ main entry
    def store(self, *, sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str,
              data, calling_ae: str = "", peer: str = "") -> StoreResult:
        """Store one dataset already in memory (``data``: encoded dataset, no file meta)."""
        try:
            inc = self.begin(sop_class_uid, sop_instance_uid, transfer_syntax_uid)
        except OSError as exc:
            return self._write_failed(exc, str(sop_instance_uid))
        try:
            view = memoryview(data)
            for i in range(0, len(view), 64 * _CHUNK):
                inc.write(view[i:i + 64 * _CHUNK])
        except OSError as exc:
            inc.abandon()
            return self._write_failed(exc, str(sop_instance_uid))
        return self.store_incoming(inc, sop_class_uid=sop_class_uid, sop_instance_uid=sop_instance_uid,
                                   transfer_syntax_uid=transfer_syntax_uid, calling_ae=calling_ae, peer=peer)

    def _write_failed(self, exc: OSError, sop: str) -> StoreResult:
        status = OUT_OF_RESOURCES if exc.errno in (errno.ENOSPC, errno.EDQUOT) else PROCESSING_FAILURE
        LOG.error("could not write instance: %s", exc.strerror or exc)
        return StoreResult(status, f"write failed: {exc.strerror or exc}", sop)

    def _inflated_copy(self, tmp: Path, meta_len: int, size: int) -> Path:
        """Deflated input: inflate into a second temp file (Explicit VR LE meta) with a
        bound on the inflated size, so parsing never holds the inflated dataset in memory.
        Raises ValueError beyond min(max_inflate_ratio x compressed, max_instance_mb), and
        when the deflate stream is cut short (bytes after its end are ignored, as in a
        full read: a pad byte may follow it)."""
        limit = min(self.max_instance, self.max_ratio * max(size - meta_len, 1))
        out = self.incoming / f"{secrets.token_hex(12)}.part"
        d = zlib.decompressobj(-zlib.MAX_WBITS)
        total = 0
        with open(tmp, "rb") as src:
            meta = src.read(meta_len)
            with create_new(out) as dst:
                try:
                    dst.write(_explicit_meta(meta))
                    while True:
                        chunk = src.read(_CHUNK)
                        if not chunk:
                            break
                        while chunk:
                            piece = d.decompress(chunk, _CHUNK)
                            total += len(piece)
                            if total > limit:
                                raise LimitExceeded(f"Deflated dataset inflates beyond {limit} bytes "
                                                 f"(node.max_inflate_ratio={self.max_ratio}, node.max_instance_mb)")
                            dst.write(piece)
                            chunk = d.unconsumed_tail
                    rest = d.flush()
                    total += len(rest)
                    if total > limit:
                        raise LimitExceeded(f"Deflated dataset inflates beyond {limit} bytes")
                    if not d.eof:
                        # a cut stream still inflates to a header that parses, but the stored
                        # file would be unreadable (a full read of it fails at the cut)
                        raise ValueError("Deflated dataset: the deflate stream ends before its final block")
                    dst.write(rest)
                except BaseException:
                    dst.close()
                    out.unlink(missing_ok=True)
                    raise
        return out

    def store_incoming(self, inc: Incoming, *, sop_class_uid: str, sop_instance_uid: str,
                       transfer_syntax_uid: str, calling_ae: str = "", peer: str = "") -> StoreResult:
        """Store a fully received :class:`Incoming` (its fd is closed here, whatever happens)."""
        tmp = inc.path
        sop_instance_uid = str(sop_instance_uid).strip()
        fd = inc.release_fd()
        if inc.write_error is not None:
            tmp.unlink(missing_ok=True)
            return self._write_failed(inc.write_error, sop_instance_uid)
        if fd is None:
            tmp.unlink(missing_ok=True)
            return StoreResult(PROCESSING_FAILURE, "incoming file already closed", sop_instance_uid)
        synced: Future = self._io.submit(self._fsync_close if self.objects.needs_synced_source else os.close, fd)
        try:
            if inc.uid_error:
                _wait_quietly(synced)
                return self._reject(DATASET_MISMATCH, inc.uid_error, b"", b"", tmp)
            if inc.overflow:
                reason = f"instance of {inc.size} bytes above node.max_instance_mb={self.settings.node.max_instance_mb}"
                LOG.error("refusing instance: %s", reason)
                return StoreResult(OUT_OF_RESOURCES, reason, sop_instance_uid)
            if not self.has_space():
                reason = f"free space below node.min_free_mb={self.settings.node.min_free_mb}"
                LOG.error("refusing instance: %s", reason)
                return StoreResult(OUT_OF_RESOURCES, reason, sop_instance_uid)
            if not is_valid_uid(sop_instance_uid, strict=True):
                LOG.info("non-conformant SOP Instance UID accepted (leading zero in a component)")
            sha, size = inc.sha256, inc.size
            seen: dict = {}   # the parsed header, for the audit's patient (never re-read)
            # ---- parse the stored bytes (header only) and validate
            try:
                if str(transfer_syntax_uid).strip() == DEFLATED:
                    _wait_quietly(synced)
                study_uid, series_uid, attrs, decision = self._parse(
                    tmp, inc.meta_len, size, sop_class_uid, sop_instance_uid, transfer_syntax_uid, seen)
            except UIDError as exc:
                _wait_quietly(synced)
                return self._reject(DATASET_MISMATCH, str(exc), b"", b"", tmp).with_header(seen.get("ds"))
            except Exception as exc:  # pydicom raises many types on malformed input
                _wait_quietly(synced)
                # The reason (quarantine .txt, audit record) keeps pydicom's text, which can
                # quote header values; the log line names the error class only, unless the
                # error is one of the node's own bounds.
                reason = f"dataset cannot be parsed: {type(exc).__name__}: {str(exc)[:200]}"
                return self._reject(CANNOT_UNDERSTAND, reason, b"", b"", tmp,
                                    log_reason=reason if isinstance(exc, LimitExceeded)
                                    else f"dataset cannot be parsed: {type(exc).__name__}").with_header(seen.get("ds"))

            rel = self.relpath(study_uid, series_uid, sop_instance_uid)
            lock = self._locks[hash(sop_instance_uid) % len(self._locks)]
            with lock:
                res = self._commit(tmp, synced, rel, sha, size, attrs, decision, study_uid, series_uid,
                                   sop_instance_uid, str(sop_class_uid).strip(),
                                   str(transfer_syntax_uid).strip(), calling_ae)
            return res.with_header(seen.get("ds"))
        except OSError as exc:
            return self._write_failed(exc, sop_instance_uid)
        finally:
            _wait_quietly(synced)
            tmp.unlink(missing_ok=True)

    def _parse(self, path: Path, meta_len: int, size: int, sop_class_uid: str, sop_instance_uid: str,
               transfer_syntax_uid: str, seen: Optional[dict] = None):
        """Header of a stored file (bounded; Deflated input inflated to a bounded temp copy),
        checked against the command's UIDs: (study UID, series UID, index attributes,
        selection decision). Raises UIDError, ValueError or pydicom's errors."""
        parse_path, inflated = path, None
        try:
            if str(transfer_syntax_uid).strip() == DEFLATED:
                inflated = parse_path = self._inflated_copy(path, meta_len, size)
            ds = read_header(parse_path)
            if seen is not None:
                seen["ds"] = ds
            study_uid = check_uid(_text(ds, "StudyInstanceUID"), "Study Instance UID", strict=False)
            series_uid = check_uid(_text(ds, "SeriesInstanceUID"), "Series Instance UID", strict=False)
            ds_sop = check_uid(_text(ds, "SOPInstanceUID"), "SOP Instance UID", strict=False)
            ds_class = check_uid(_text(ds, "SOPClassUID"), "SOP Class UID", strict=False)
            if ds_sop != str(sop_instance_uid).strip():
                raise UIDError("SOP Instance UID in the dataset differs from the C-STORE request")
            if ds_class != str(sop_class_uid).strip():
                raise UIDError("SOP Class UID in the dataset differs from the C-STORE request")
            return study_uid, series_uid, index_attributes(ds), selection.decide(ds, self.settings.select)
        finally:
            if inflated is not None:
                inflated.unlink(missing_ok=True)

    def index_file(self, path: Path, key: Optional[str] = None) -> StoreResult:
        """Index a file found under ``instances/`` that no row names (the reconciler).

        ``key``: the object's key when ``path`` is a fetched copy (object storage).
        The same parse and the same SQL path as a received instance, but the file stays
        where it is and never becomes the current version of an instance that has one.
        Raises (UIDError, ValueError, OSError, pydicom errors) when it cannot be indexed:
        unreadable, no file meta written by a DICOM writer, or not at the place its header names."""
        path = Path(path)
        rel = Path(key) if key is not None else path.relative_to(self.root)
        with open(path, "rb") as fh:
            ds = dcmread(_BoundedReader(fh, MAX_HEADER_BYTES), stop_before_pixels=True,
                         specific_tags=["SOPInstanceUID"])
        fm = ds.file_meta
        group_len = fm.get("FileMetaInformationGroupLength")
        if group_len is None:
            raise ValueError("no File Meta Information Group Length")
        meta_len = 128 + 4 + 12 + int(group_len)
        sop_class = check_uid(str(fm.get("MediaStorageSOPClassUID", "")).strip(), "Media Storage SOP Class UID",
                              strict=False)
        sop = check_uid(str(fm.get("MediaStorageSOPInstanceUID", "")).strip(), "Media Storage SOP Instance UID",
                        strict=False)
        ts = check_uid(str(fm.get("TransferSyntaxUID", "")).strip(), "Transfer Syntax UID", strict=False)
        size = path.stat().st_size
        sha = file_sha256(path)
        study_uid, series_uid, attrs, decision = self._parse(path, meta_len, size, sop_class, sop, ts)
        if rel.parent != Path("instances") / study_uid / series_uid or not version_name_ok(rel.name, sop):
            raise ValueError("file is not at the place its header names")
        with self._locks[hash(sop) % len(self._locks)]:
            return self._commit(None, None, rel, sha, size, attrs, decision, study_uid, series_uid, sop,
                                sop_class, ts, "", adopt=True)

    def _reject(self, status: int, reason: str, meta: bytes, data, tmp: Optional[Path] = None,
                log_reason: str = "") -> StoreResult:
        q = self.quarantine(meta, data, reason, tmp if tmp is not None and tmp.exists() else None)
        LOG.warning("rejected instance with status 0x%04X: %s (quarantine: %s)", status, log_reason or reason,
                    q.name if q else "none")
        return StoreResult(status, reason, quarantine=q)

    def _where(self, key: str) -> Path:
        local = self.objects.local_path(key)
        return local if local is not None else Path(key)

    def _commit(self, tmp: Optional[Path], synced: Optional[Future], rel: Path, sha: str, size: int, attrs: dict,
                decision, study_uid: str, series_uid: str, sop_uid: str, sop_class: str, ts: str,
                calling_ae: str, *, adopt: bool = False) -> StoreResult:
        series_key = rel.parent.as_posix()
        placed: list[str] = []  # the key this store put in place (kept on an earlier try's retry)

        def place_file(versioned: bool, reuse: Optional[str]):
            # Runs inside the SQL transaction. Order: the object durable in the store (local:
            # temp file fsynced, linked, never over an existing file, directories fsynced in
            # the background while the SQL statements run; S3: conditional PUT acknowledged)
            # → wait() → COMMIT. A committed row therefore never names an object that is not
            # durably there, and acknowledged bytes are never overwritten.
            if adopt:
                return str(rel), None
            if reuse is not None:
                return reuse, None
            assert tmp is not None and synced is not None
            if self.objects.needs_synced_source:
                synced.result()
            names = ([] if versioned else [f"{sop_uid}.dcm"]) + [f"{sop_uid}.{sha[:16]}.dcm"]
            for name in names:
                key = f"{series_key}/{name}"
                try:
                    wait = self.objects.put_new(key, tmp, sha)
                    placed.append(key)
                    return key, wait
                except FileExistsError:
                    # our own object from an earlier try, or the same bytes left by a commit
                    # that failed: use it; anything else there is another object: leave it
                    if key in placed or self.objects.sha256(key) == sha:
                        return key, None
            # a 64-bit name prefix shared by different bytes
            key = f"{series_key}/{sop_uid}.{sha[:16]}-{secrets.token_hex(4)}.dcm"
            wait = self.objects.put_new(key, tmp, sha)
            placed.append(key)
            return key, wait

        rec = InstanceRecord(
            sop_instance_uid=sop_uid, study_instance_uid=study_uid, series_instance_uid=series_uid,
            sop_class_uid=sop_class, transfer_syntax_uid=ts, path=str(rel), size=size, sha256=sha,
            calling_ae=(calling_ae or "")[:16] or None, decision=decision.decision, reason=decision.reason,
            view_code=decision.view_code, view_name=(decision.view_name or None) and decision.view_name[:128],
            attrs=attrs)
        try:
            outcome = record_instance(self.sessions, rec, place_file, exists=self.objects.exists,
                                      on_conflict=self.settings.node.on_conflict, adopt=adopt)
        except StorageUnavailable as exc:
            # the cart sends again later; nothing was acknowledged
            LOG.error("could not store instance: %s", exc)
            return StoreResult(OUT_OF_RESOURCES, f"storage unavailable: {exc}", sop_uid)
        except OSError as exc:
            status = OUT_OF_RESOURCES if exc.errno in (errno.ENOSPC, errno.EDQUOT) else PROCESSING_FAILURE
            LOG.error("could not store instance: %s", exc.strerror or exc)
            return StoreResult(status, f"storage failed: {exc.strerror or exc}", sop_uid)
        except Exception as exc:
            LOG.error("could not index instance: %s", describe_error(exc))
            return StoreResult(PROCESSING_FAILURE, f"index failed: {type(exc).__name__}", sop_uid)
        if outcome.duplicate:
            return StoreResult(SUCCESS, "already indexed" if outcome.known_path else "duplicate with identical bytes",
                               sop_uid, study_uid, duplicate=True, path=self._where(outcome.path))
        # nothing is deleted here: the version that is no longer current keeps its file and
        # its history row until `echonode retention` removes it
        if outcome.replaced:
            LOG.warning("instance replaced by a different object with the same SOP Instance UID "
                        "(calling AE %s); both versions kept, history recorded", calling_ae)
        elif outcome.kept_first:
            LOG.warning("a different object with a stored SOP Instance UID (calling AE %s) was kept as "
                        "a non-current version (%s)", calling_ae,
                        "found by the reconciler" if adopt else "node.on_conflict = keep-first")
        reason = "replaced" if outcome.replaced else "kept as a version" if outcome.kept_first else "stored"
        res = StoreResult(SUCCESS, reason, sop_uid, study_uid, replaced=outcome.replaced,
                          path=self._where(outcome.path))
        if self.on_stored:
            try:
                self.on_stored(res)
            except Exception:  # a callback never fails a store
                LOG.exception("on_stored callback failed")
        return res
