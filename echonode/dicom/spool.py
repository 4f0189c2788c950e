"""Durable receive: temp file → fsync → rename → fsync dir → SQL commit → Success.

The dataset bytes are stored exactly as received on the wire (never decoded and
re-encoded, never transcoded), preceded by a File Meta Information group that we
write ourselves (PS3.10 §7.1: DIMSE carries no file meta). The file meta is
deterministic (SOP class, SOP instance, transfer syntax, our implementation UID), so
the same object received twice gives the same file and the same sha256.

Layout::

    <data_dir>/instances/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm
    <data_dir>/instances/.incoming/<random>.part       (in-flight, same file system)
    <data_dir>/quarantine/<UTC timestamp>-<random>.dcm (rejected input, never DICOM-derived)

Statuses (PS3.4 Annex B.2.3 and GG.4): 0x0000 Success; 0xA700 Out of Resources
(free-space floor, disk full); 0xA900 Data Set does not match SOP Class (missing or
invalid UIDs, UIDs that disagree with the command); 0xC210 Cannot understand
(unparseable dataset); 0xC211 processing failure (I/O or database error).
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
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
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

    @property
    def ok(self) -> bool:
        return self.status == SUCCESS


def _wait_quietly(fut: Future) -> None:
    try:
        fut.result()
    except Exception:
        pass


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
                 on_stored: Optional[Callable[[StoreResult], None]] = None):
        self.settings = settings
        self.sessions = session_factory
        self.root = settings.data_path
        self.storage = settings.storage_path
        self.incoming = self.storage / ".incoming"
        self.quarantine_dir = settings.quarantine_path
        self.min_free = int(settings.node.min_free_mb) * 1024 * 1024
        self.on_stored = on_stored
        self._locks = [threading.Lock() for _ in range(64)]
        # fsyncs run here so that they overlap with parsing and SQL statements; the order
        # temp fsync → rename → dir fsync → SQL COMMIT is kept (see _commit)
        self._io = ThreadPoolExecutor(max_workers=max(4, 2 * int(settings.node.max_associations)),
                                      thread_name_prefix="spool-fsync")
        for d in (self.storage, self.incoming, self.quarantine_dir):
            d.mkdir(parents=True, exist_ok=True)
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
        return Path("instances") / study / series / f"{sop}.dcm"

    def quarantine(self, meta: bytes, data, reason: str) -> Optional[Path]:
        """Keep a copy of rejected input; the name is a timestamp + random, never DICOM-derived."""
        name = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(6)
        target = self.quarantine_dir / f"{name}.dcm"
        try:
            with open(target, "wb") as fh:
                fh.write(meta)
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            (self.quarantine_dir / f"{name}.txt").write_text(reason + "\n", encoding="utf-8")
            return target
        except OSError as exc:
            LOG.error("could not write quarantine copy: %s", exc)
            return None

    @staticmethod
    def _fsync_close(fd: int) -> None:
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _write_temp(self, meta: bytes, data) -> tuple[Path, str, int, Future]:
        """Write meta + data to a new temp file; its fsync runs in the background (a Future)."""
        tmp = self.incoming / f"{secrets.token_hex(12)}.part"
        h = hashlib.sha256()
        h.update(meta)
        h.update(data)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            view = memoryview(meta)
            while view:
                view = view[os.write(fd, view):]
            view = memoryview(data)
            while view:
                n = os.write(fd, view[:64 * _CHUNK])
                view = view[n:]
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        return tmp, h.hexdigest(), len(meta) + len(data), self._io.submit(self._fsync_close, fd)

    # ------------------------------------------------------------------ main entry
    def store(self, *, sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str,
              data, calling_ae: str = "", peer: str = "") -> StoreResult:
        """Store one received dataset (``data``: the encoded dataset bytes, no file meta)."""
        try:
            check_uid(str(sop_class_uid).strip(), "Affected SOP Class UID", strict=False)
            sop_instance_uid = check_uid(str(sop_instance_uid).strip(), "Affected SOP Instance UID", strict=False)
            check_uid(str(transfer_syntax_uid).strip(), "Transfer Syntax UID", strict=False)
        except UIDError as exc:
            return self._reject(DATASET_MISMATCH, str(exc), b"", data)
        if not self.has_space():
            reason = f"free space below node.min_free_mb={self.settings.node.min_free_mb}"
            LOG.error("refusing instance: %s", reason)
            return StoreResult(OUT_OF_RESOURCES, reason, sop_instance_uid)

        if not is_valid_uid(sop_instance_uid, strict=True):
            LOG.info("non-conformant SOP Instance UID accepted (leading zero in a component)")
        meta = file_meta_bytes(sop_class_uid, sop_instance_uid, transfer_syntax_uid)
        try:
            tmp, sha, size, synced = self._write_temp(meta, data)
        except OSError as exc:
            status = OUT_OF_RESOURCES if exc.errno in (errno.ENOSPC, errno.EDQUOT) else PROCESSING_FAILURE
            LOG.error("could not write instance: %s", exc.strerror or exc)
            return StoreResult(status, f"write failed: {exc.strerror or exc}", sop_instance_uid)

        try:
            # ---- parse the stored bytes (header only) and validate
            try:
                ds = dcmread(tmp, stop_before_pixels=True, defer_size=4096)
                study_uid = check_uid(_text(ds, "StudyInstanceUID"), "Study Instance UID", strict=False)
                series_uid = check_uid(_text(ds, "SeriesInstanceUID"), "Series Instance UID", strict=False)
                ds_sop = check_uid(_text(ds, "SOPInstanceUID"), "SOP Instance UID", strict=False)
                ds_class = check_uid(_text(ds, "SOPClassUID"), "SOP Class UID", strict=False)
                if ds_sop != sop_instance_uid:
                    raise UIDError("SOP Instance UID in the dataset differs from the C-STORE request")
                if ds_class != str(sop_class_uid).strip():
                    raise UIDError("SOP Class UID in the dataset differs from the C-STORE request")
                attrs = index_attributes(ds)
                decision = selection.decide(ds, self.settings.select)
            except UIDError as exc:
                _wait_quietly(synced)
                return self._reject(DATASET_MISMATCH, str(exc), meta, data, tmp)
            except Exception as exc:  # pydicom raises many types on malformed input
                _wait_quietly(synced)
                return self._reject(CANNOT_UNDERSTAND,
                                    f"dataset cannot be parsed: {type(exc).__name__}: {str(exc)[:200]}",
                                    meta, data, tmp)

            rel = self.relpath(study_uid, series_uid, sop_instance_uid)
            lock = self._locks[hash(sop_instance_uid) % len(self._locks)]
            with lock:
                return self._commit(tmp, synced, rel, sha, size, attrs, decision, study_uid, series_uid,
                                    sop_instance_uid, str(sop_class_uid).strip(),
                                    str(transfer_syntax_uid).strip(), calling_ae)
        finally:
            _wait_quietly(synced)
            tmp.unlink(missing_ok=True)

    def _reject(self, status: int, reason: str, meta: bytes, data, tmp: Optional[Path] = None) -> StoreResult:
        q = None
        if tmp is not None and tmp.exists():
            name = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(6)
            q = self.quarantine_dir / f"{name}.dcm"
            try:
                os.replace(tmp, q)
                (self.quarantine_dir / f"{name}.txt").write_text(reason + "\n", encoding="utf-8")
            except OSError:
                q = None
        else:
            q = self.quarantine(meta, data, reason)
        LOG.warning("rejected instance with status 0x%04X: %s (quarantine: %s)", status, reason,
                    q.name if q else "none")
        return StoreResult(status, reason, quarantine=q)

    def _commit(self, tmp: Path, synced: Future, rel: Path, sha: str, size: int, attrs: dict, decision,
                study_uid: str, series_uid: str, sop_uid: str, sop_class: str, ts: str,
                calling_ae: str) -> StoreResult:
        final = self.root / rel
        dir_synced: list[Future] = []

        def wait_dir() -> None:
            for fut in dir_synced:
                fut.result()

        def place_file():
            # Runs inside the SQL transaction. Order: temp file durable → rename → directory
            # fsync (in the background while the SQL statements run) → wait_dir() → COMMIT.
            # A committed row therefore never points at a file that is not durably in place.
            synced.result()
            if tmp.exists():
                final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp, final)
                dir_synced.append(self._io.submit(_fsync_dir, final.parent))
            return wait_dir

        rec = InstanceRecord(
            sop_instance_uid=sop_uid, study_instance_uid=study_uid, series_instance_uid=series_uid,
            sop_class_uid=sop_class, transfer_syntax_uid=ts, path=str(rel), size=size, sha256=sha,
            calling_ae=(calling_ae or "")[:16] or None, decision=decision.decision, reason=decision.reason,
            view_code=decision.view_code, view_name=(decision.view_name or None) and decision.view_name[:128],
            attrs=attrs)
        try:
            outcome = record_instance(self.sessions, rec, place_file, exists=lambda p: (self.root / p).is_file())
        except OSError as exc:
            status = OUT_OF_RESOURCES if exc.errno in (errno.ENOSPC, errno.EDQUOT) else PROCESSING_FAILURE
            LOG.error("could not store instance: %s", exc.strerror or exc)
            return StoreResult(status, f"storage failed: {exc.strerror or exc}", sop_uid)
        except Exception as exc:
            LOG.error("could not index instance: %s", describe_error(exc))
            return StoreResult(PROCESSING_FAILURE, f"index failed: {type(exc).__name__}", sop_uid)
        if outcome.duplicate:
            return StoreResult(SUCCESS, "duplicate with identical bytes", sop_uid, study_uid,
                               duplicate=True, path=self.root / outcome.path)
        if outcome.old_path and outcome.old_path != str(rel):
            (self.root / outcome.old_path).unlink(missing_ok=True)
        if outcome.replaced:
            LOG.warning("instance replaced by a different object with the same SOP Instance UID "
                        "(calling AE %s); history recorded", calling_ae)
        res = StoreResult(SUCCESS, "replaced" if outcome.replaced else "stored", sop_uid, study_uid,
                          replaced=outcome.replaced, path=final)
        if self.on_stored:
            try:
                self.on_stored(res)
            except Exception:  # a callback never fails a store
                LOG.exception("on_stored callback failed")
        return res
