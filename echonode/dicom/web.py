"""A small DICOMweb client (PS3.18) on the standard library: QIDO-RS, WADO-RS, STOW-RS.

* TLS always verifies the server's chain and host name (system CAs, or ``ca_file``);
  authentication is none, HTTP bearer or HTTP basic.
* Every read is bounded: JSON answers at most :data:`MAX_JSON_BYTES`, multipart parts at
  most ``max_bytes`` each and :data:`MAX_PARTS` in all, part headers at most
  :data:`MAX_PART_HEADER`; multipart bodies are streamed to files in the caller's folder,
  never held in memory. A socket timeout bounds every network read.
* :func:`stow_rows` sends outbox rows by STOW-RS with the outbox semantics of C-STORE
  (``echonode.dicom.scu``): delivered, or failed with backoff and ``dead`` after
  ``delivery.max_attempts``.

Answers carry patient identifiers; nothing here logs an answer's content.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import logging
import os
import re
import ssl
import urllib.parse
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

log = logging.getLogger("echonode.dicomweb")

MAX_JSON_BYTES = 16 * 1024 * 1024
MAX_PART_HEADER = 8192
MAX_PREAMBLE = 64 * 1024
MAX_PARTS = 10000
CHUNK = 256 * 1024
DICOM_MULTIPART = 'multipart/related; type="application/dicom"'


class DicomWebError(RuntimeError):
    """A DICOMweb request failed (HTTP status, TLS, timeout, malformed answer). No PHI in the text."""

    def __init__(self, message: str, status: Optional[int] = None):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class WebTarget:
    url: str                 # base URL of the DICOMweb service (…/dicom-web)
    auth: str = "none"       # none | bearer | basic
    token: str = ""
    username: str = ""
    password: str = ""
    ca_file: str = ""
    timeout_s: float = 30.0

    @classmethod
    def of(cls, cfg) -> "WebTarget":
        """From a PriorSource or a Destination (same field names)."""
        return cls(cfg.url, cfg.auth, cfg.token, cfg.username, cfg.password, cfg.ca_file, float(cfg.timeout_s))


class DicomWebClient:
    def __init__(self, target: WebTarget):
        self.t = target
        u = urllib.parse.urlsplit(target.url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise DicomWebError(f"not an http(s) URL: {target.url!r}")
        self.scheme, self.host, self.port = u.scheme, u.hostname, u.port
        self.base = u.path.rstrip("/")

    # ------------------------------------------------------------------ transport
    def _conn(self) -> http.client.HTTPConnection:
        if self.scheme == "https":
            ctx = ssl.create_default_context(cafile=self.t.ca_file or None)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            return http.client.HTTPSConnection(self.host, self.port, timeout=self.t.timeout_s, context=ctx)
        return http.client.HTTPConnection(self.host, self.port, timeout=self.t.timeout_s)

    def _headers(self, extra: Optional[dict] = None) -> dict:
        h = {"User-Agent": "echonode"}
        if self.t.auth == "bearer":
            h["Authorization"] = f"Bearer {self.t.token}"
        elif self.t.auth == "basic":
            raw = f"{self.t.username}:{self.t.password}".encode("utf-8")
            h["Authorization"] = "Basic " + base64.b64encode(raw).decode("ascii")
        h.update(extra or {})
        return h

    def request(self, method: str, path: str, *, headers: Optional[dict] = None, body=None,
                ok=(200,)) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """Send a request; the caller reads the response and closes the connection."""
        conn = self._conn()
        try:
            conn.request(method, self.base + path, body=body, headers=self._headers(headers))
            resp = conn.getresponse()
        except ssl.SSLError as exc:
            conn.close()
            raise DicomWebError(f"TLS error with {self.host}: {exc.reason or type(exc).__name__}") from None
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise DicomWebError(f"{method} {self.host}: {type(exc).__name__}") from None
        if resp.status not in ok:
            # the body of an error may echo the query (a PatientID): never quoted; UIDs in the
            # path are replaced too, so the message can go to logs and the SR
            conn.close()
            where = re.sub(r"[0-9]+(\.[0-9]+)+", "…", path.split("?")[0])
            raise DicomWebError(f"{method} {where} answered HTTP {resp.status}", resp.status)
        return conn, resp

    def _json(self, path: str) -> list:
        conn, resp = self.request("GET", path, headers={"Accept": "application/dicom+json"}, ok=(200, 204))
        try:
            if resp.status == 204:
                return []
            data = resp.read(MAX_JSON_BYTES + 1)
        except (OSError, http.client.HTTPException) as exc:
            raise DicomWebError(f"reading a QIDO-RS answer: {type(exc).__name__}") from None
        finally:
            conn.close()
        if len(data) > MAX_JSON_BYTES:
            raise DicomWebError(f"QIDO-RS answer larger than {MAX_JSON_BYTES} bytes")
        try:
            value = json.loads(data or b"[]")
        except ValueError:
            raise DicomWebError("QIDO-RS answer is not JSON") from None
        if not isinstance(value, list):
            raise DicomWebError("QIDO-RS answer is not a JSON array")
        return value

    # ------------------------------------------------------------------ QIDO-RS
    def qido(self, path: str, params: dict, *, limit: int) -> list[dict]:
        """QIDO-RS search (``/studies``, ``/studies/{uid}/series`` …): DICOM JSON objects, at most ``limit``."""
        q = dict(params)
        q["limit"] = str(int(limit))
        answers = self._json(path + "?" + urllib.parse.urlencode(q, doseq=True))
        return [a for a in answers[:limit] if isinstance(a, dict)]

    # ------------------------------------------------------------------ WADO-RS
    def retrieve(self, path: str, folder: Path, *, max_bytes: int, max_parts: int = MAX_PARTS,
                 accept: str = DICOM_MULTIPART + "; transfer-syntax=*") -> list[Path]:
        """WADO-RS retrieve of ``path`` (a study, series or instance) as multipart/related
        application/dicom, each part streamed to a file in ``folder``. Returns the files."""
        conn, resp = self.request("GET", path, headers={"Accept": accept})
        try:
            return list(read_multipart(resp, resp.getheader("Content-Type", ""), Path(folder),
                                       max_bytes=max_bytes, max_parts=max_parts))
        finally:
            conn.close()

    def instance(self, study: str, series: str, sop: str, folder: Path, *, max_bytes: int) -> Path:
        files = self.retrieve(f"/studies/{study}/series/{series}/instances/{sop}", folder, max_bytes=max_bytes,
                              max_parts=1)
        if len(files) != 1:
            raise DicomWebError(f"WADO-RS instance retrieve returned {len(files)} parts, expected 1")
        return files[0]

    def metadata(self, study: str, series: str, sop: str) -> dict:
        """WADO-RS instance metadata (DICOM JSON, bulk data by reference)."""
        value = self._json(f"/studies/{study}/series/{series}/instances/{sop}/metadata")
        if len(value) != 1 or not isinstance(value[0], dict):
            raise DicomWebError(f"WADO-RS metadata answered {len(value)} object(s), expected 1")
        return value[0]

    def frames(self, study: str, series: str, sop: str, numbers: Sequence[int], folder: Path, *,
               max_bytes: int) -> tuple[list[Path], str]:
        """WADO-RS frame retrieval (frame numbers 1-based), in the stored transfer syntax where
        the server allows it: ``(one file per frame in the order asked, transfer syntax UID)``."""
        lst = ",".join(str(int(n)) for n in numbers)
        conn, resp = self.request("GET", f"/studies/{study}/series/{series}/instances/{sop}/frames/{lst}",
                                  headers={"Accept": 'multipart/related; type="application/octet-stream"; '
                                                     'transfer-syntax=*'})
        try:
            ct = resp.getheader("Content-Type", "")
            files = list(read_multipart(resp, ct, Path(folder), max_bytes=max_bytes, max_parts=len(numbers)))
        finally:
            conn.close()
        m = re.search(r'transfer-syntax\s*=\s*"?([0-9.]{1,64})', ct[:1024])
        ts = m.group(1) if m else ("1.2.840.10008.1.2.1" if "octet-stream" in ct[:1024] else "")
        if len(files) != len(numbers) or not ts:
            for f in files:
                f.unlink(missing_ok=True)
            raise DicomWebError(f"WADO-RS frames: {len(files)} of {len(numbers)} frame(s), "
                                f"transfer syntax {'unknown' if not ts else ts}")
        return files, ts

    # ------------------------------------------------------------------ STOW-RS
    def stow(self, files: Sequence[Path], study_uid: str = "") -> dict:
        """POST the files as one multipart/related request; the server's DICOM JSON answer
        (``{}`` when it sent none). HTTP 200 (all stored) and 202 (some failed) return; others raise."""
        boundary = uuid.uuid4().hex
        head = lambda: (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n").encode("ascii")
        total = sum(len(head()) + os.path.getsize(f) + 2 for f in files) + len(f"--{boundary}--\r\n")

        def body() -> Iterator[bytes]:
            for f in files:
                yield head()
                with open(f, "rb") as fh:
                    while True:
                        b = fh.read(CHUNK)
                        if not b:
                            break
                        yield b
                yield b"\r\n"
            yield f"--{boundary}--\r\n".encode("ascii")

        path = "/studies" + (f"/{study_uid}" if study_uid else "")
        conn, resp = self.request(
            "POST", path, body=body(), ok=(200, 202),
            headers={"Content-Type": f'{DICOM_MULTIPART}; boundary="{boundary}"',
                     "Content-Length": str(total), "Accept": "application/dicom+json"})
        try:
            data = resp.read(MAX_JSON_BYTES + 1)
        finally:
            conn.close()
        if len(data) > MAX_JSON_BYTES:
            raise DicomWebError("STOW-RS answer too large")
        try:
            answer = json.loads(data) if data.strip() else {}
        except ValueError:
            answer = {}
        return {"status": resp.status, "answer": answer if isinstance(answer, dict) else {}}


# --------------------------------------------------------------------------- multipart

# RFC 2046 allows 70 characters; some servers (Orthanc) send longer ones: accept up to 200.
_BOUNDARY = re.compile(r'boundary\s*=\s*(?:"([^"]{1,200})"|([^;\s"]{1,200}))', re.IGNORECASE)


def _boundary(content_type: str) -> bytes:
    ct = content_type[:1024]
    if not ct.lower().startswith("multipart/related"):
        raise DicomWebError(f"expected multipart/related, got {ct.split(';')[0][:80]!r}")
    m = _BOUNDARY.search(ct)
    if not m:
        raise DicomWebError("multipart answer without a boundary")
    return (m.group(1) or m.group(2)).encode("latin-1")


def read_multipart(stream, content_type: str, folder: Path, *, max_bytes: int,
                   max_parts: int = MAX_PARTS) -> Iterator[Path]:
    """Split a multipart/related body read from ``stream`` into files under ``folder``.

    Bounded by construction: the buffer never holds more than one read plus a delimiter
    (or a part header of at most MAX_PART_HEADER bytes); a part over ``max_bytes``, more than
    ``max_parts`` parts, an over-long preamble or a truncated body raise DicomWebError (the
    partial file is removed)."""
    delim = b"--" + _boundary(content_type)
    folder.mkdir(parents=True, exist_ok=True)
    buf = b""
    state = "preamble"
    skipped = 0
    parts = 0
    fh = None
    path: Optional[Path] = None
    size = 0
    eof = False

    def more() -> bool:
        nonlocal buf, eof
        if eof:
            return False
        try:
            chunk = stream.read(CHUNK)
        except (OSError, http.client.HTTPException) as exc:
            raise DicomWebError(f"reading a multipart answer: {type(exc).__name__}") from None
        if not chunk:
            eof = True
            return False
        buf += chunk
        return True

    try:
        while True:
            if state == "preamble":
                i = buf.find(delim)
                if i < 0:
                    keep = len(delim)
                    skipped += max(0, len(buf) - keep)
                    buf = buf[-keep:]
                    if skipped > MAX_PREAMBLE:
                        raise DicomWebError("multipart answer: no boundary in the first 64 KiB")
                    if not more():
                        raise DicomWebError("multipart answer without any part")
                    continue
                buf = buf[i + len(delim):]
                state = "after"
            elif state == "after":
                if len(buf) < 2:
                    if not more():
                        raise DicomWebError("multipart answer truncated after a boundary")
                    continue
                if buf.startswith(b"--"):
                    return
                if not buf.startswith(b"\r\n"):
                    raise DicomWebError("multipart answer: malformed boundary line")
                buf = buf[2:]
                state = "headers"
            elif state == "headers":
                if len(buf) < 2 and more():
                    continue
                # a part without headers starts with the blank line at once
                i = -2 if buf.startswith(b"\r\n") else buf.find(b"\r\n\r\n")
                if i == -1:
                    if len(buf) > MAX_PART_HEADER:
                        raise DicomWebError(f"multipart part header longer than {MAX_PART_HEADER} bytes")
                    if not more():
                        raise DicomWebError("multipart answer truncated in a part header")
                    continue
                parts += 1
                if parts > max_parts:
                    raise DicomWebError(f"multipart answer has more than {max_parts} part(s)")
                buf = buf[i + 4:]
                path = folder / f"part-{uuid.uuid4().hex}.dcm"
                fh = open(path, "wb")
                size = 0
                state = "body"
            else:  # body
                i = buf.find(b"\r\n" + delim)
                if i < 0:
                    keep = len(delim) + 2
                    n = max(0, len(buf) - keep)
                    if n:
                        size += n
                        if size > max_bytes:
                            raise DicomWebError(f"a multipart part is larger than {max_bytes} bytes")
                        fh.write(buf[:n])
                        buf = buf[n:]
                    if not more():
                        raise DicomWebError("multipart answer truncated in a part")
                    continue
                size += i
                if size > max_bytes:
                    raise DicomWebError(f"a multipart part is larger than {max_bytes} bytes")
                fh.write(buf[:i])
                fh.close()
                fh = None
                buf = buf[i + 2 + len(delim):]
                state = "after"
                done, path = path, None
                yield done
    finally:
        if fh is not None:
            fh.close()
        if path is not None:
            try:
                path.unlink()
            except OSError:
                pass


# --------------------------------------------------------------------------- DICOM JSON

def value(obj: dict, tag: str, default: str = "") -> str:
    """The first value of ``tag`` (8 hex digits) of a DICOM JSON object as text ('' if absent)."""
    el = obj.get(tag) if isinstance(obj, dict) else None
    if not isinstance(el, dict):
        return default
    vals = el.get("Value")
    if not isinstance(vals, list) or not vals:
        return default
    v = vals[0]
    if isinstance(v, dict):  # PN
        v = v.get("Alphabetic", "")
    return str(v)[:1024]


def values(obj: dict, tag: str, limit: int = 64) -> list[str]:
    el = obj.get(tag) if isinstance(obj, dict) else None
    vals = el.get("Value") if isinstance(el, dict) else None
    if not isinstance(vals, list):
        return []
    return [str(v)[:1024] for v in vals[:limit] if not isinstance(v, (dict, list))]


# --------------------------------------------------------------------------- delivery

def stow_rows(run, rows) -> None:
    """Deliver outbox rows to a ``kind = "dicomweb"`` destination by STOW-RS, grouped by
    study (one request per study). ``run``: the C-STORE path's delivery run
    (``echonode.dicom.scu._Delivery``), whose fetch and failure bookkeeping both share."""
    from echonode.store import outbox as ob

    dest, session, summary, now_fn = run.dest, run.session, run.summary, run.now_fn
    failed = run.failed
    with contextlib.ExitStack() as stack:
        by_study: dict[str, list] = {}
        for row in run.files_present(rows, stack):
            by_study.setdefault(row.study_instance_uid or "", []).append(row)
        files = run.files
        client = DicomWebClient(WebTarget.of(dest))
        for study, group in by_study.items():
            try:
                res = client.stow([files[r.id] for r in group], study)
            except DicomWebError as exc:
                for row in group:
                    failed(row, f"STOW-RS: {exc}", exc.status)
                continue
            failed_uids: dict[str, str] = {}
            for item in (res["answer"].get("00081198", {}) or {}).get("Value", []) or []:
                if isinstance(item, dict):
                    failed_uids[value(item, "00081155")] = value(item, "00081197") or "failed"
            for row in group:
                if row.sop_instance_uid in failed_uids:
                    reason = failed_uids[row.sop_instance_uid]
                    failed(row, f"STOW-RS refused the instance (failure reason {reason})")
                elif res["status"] == 202 and not failed_uids:
                    failed(row, "STOW-RS answered 202 without saying which instances failed")
                else:
                    ob.mark_delivered(session, row.id, 0, now=now_fn(), note="STOW-RS")
                    summary.delivered += 1


# --------------------------------------------------------------------------- frames -> instance

NATIVE_SYNTAXES = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2")


def instance_from_frames(metadata: dict, frame_files: Sequence[Path], transfer_syntax: str, path: Path) -> Path:
    """A DICOM file holding only the retrieved frames: the WADO-RS metadata (bulk data
    dropped) with ``NumberOfFrames`` = the frames given and their Pixel Data, encapsulated
    for a compressed transfer syntax. The frames are already bounded by the retrieve."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import UID

    md = {k: v for k, v in metadata.items()
          if k != "7FE00010" and isinstance(v, dict) and "BulkDataURI" not in v and "InlineBinary" not in v}
    try:
        ds = Dataset.from_json(md, bulk_data_uri_handler=lambda *_a: b"")
    except Exception as exc:
        raise DicomWebError(f"WADO-RS metadata not usable: {type(exc).__name__}") from None
    frames = [Path(f).read_bytes() for f in frame_files]
    ds.NumberOfFrames = len(frames)
    if transfer_syntax in NATIVE_SYNTAXES:
        data = b"".join(frames)
        ds.PixelData = data + (b"\0" if len(data) % 2 else b"")
        ds["PixelData"].VR = "OB" if int(ds.get("BitsAllocated", 8) or 8) <= 8 else "OW"
    else:
        ds.PixelData = encapsulate(frames, has_bot=True)
        ds["PixelData"].VR = "OB"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(str(ds.SOPClassUID))
    meta.MediaStorageSOPInstanceUID = UID(str(ds.SOPInstanceUID))
    meta.TransferSyntaxUID = UID(transfer_syntax)
    ds.file_meta = meta
    path = Path(path)
    tmp = path.with_suffix(".part")
    ds.save_as(tmp, enforce_file_format=True)
    os.replace(tmp, path)
    for f in frame_files:
        Path(f).unlink(missing_ok=True)
    return path
