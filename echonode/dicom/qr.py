"""DIMSE query/retrieve of prior studies (PS3.4 Annex C): C-FIND, C-GET, C-MOVE.

Study Root Query/Retrieve Information Model only. Every call is bounded:

* each association uses the source's ``timeout_s`` for ACSE, DIMSE and network reads;
* every loop over pending responses stops at ``max_results`` answers (the association is
  aborted: the PACS is told nothing more is wanted, and the caller learns the answer was
  partial) and at the caller's ``deadline`` (``time.monotonic()`` value);
* a C-GET C-STORE sub-operation bigger than ``max_bytes`` is refused (0xA700) and not
  written; files are written to the caller's folder under their (checked) SOP Instance UID;
* ``cancel`` (a ``threading.Event``) aborts the running association from another thread.

Answers carry patient identifiers (PatientID, IssuerOfPatientID): they are returned to
the caller for matching and are never logged here.

Nothing here writes SQL, imports torch or decides what an A4C clip is (the caller applies
``echonode.dicom.select``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

from pydicom.dataset import Dataset

from echonode.dicom.uids import UIDError, check_uid

log = logging.getLogger("echonode.priors")


def _quiet_identifiers() -> None:
    """pynetdicom can log C-FIND identifiers (patient data): never."""
    from pynetdicom import _config

    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False

FIND = "1.2.840.10008.5.1.4.1.2.2.1"   # Study Root Q/R Information Model - FIND
MOVE = "1.2.840.10008.5.1.4.1.2.2.2"   # - MOVE
GET = "1.2.840.10008.5.1.4.1.2.2.3"    # - GET

#: Storage SOP classes accepted as C-GET sub-operations: ultrasound only (priors are echo clips).
US_STORAGE = (
    "1.2.840.10008.5.1.4.1.1.3.1",   # Ultrasound Multi-frame Image Storage
    "1.2.840.10008.5.1.4.1.1.6.1",   # Ultrasound Image Storage
)
#: Transfer syntaxes offered for C-GET sub-operations (what frames.py decodes).
GET_SYNTAXES = (
    "1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51",
    "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81",
    "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.5",
)

PENDING = (0xFF00, 0xFF01)
#: Pending answers read (and dropped) after a C-CANCEL before the association is aborted.
DRAIN_MAX = 1000
OUT_OF_RESOURCES = 0xA700
#: C-MOVE answers that mean "this PACS will not move to that destination" (PS3.4 C.4.2.1.5):
#: Move Destination unknown (0xA801), refused / not authorised (0x0124, 0xA701, 0xA702, 0xC000-0xCFFF).
MOVE_REFUSED = {0xA801, 0x0124, 0xA701, 0xA702}


class QRError(RuntimeError):
    """A query or retrieve failed (association refused, error status, timeout). No PHI in the text."""


class MoveRefused(QRError):
    """The PACS refused the C-MOVE itself (unknown destination, not authorised…)."""


@dataclass(frozen=True)
class DimsePeer:
    """Where to ask: the called AE, its address, our calling AE and the per-operation timeout."""

    ae_title: str
    host: str
    port: int
    calling_ae: str
    timeout_s: float = 30.0


@dataclass
class FindResult:
    """Answers of one C-FIND (identifiers as pydicom Datasets) and whether they are complete."""

    answers: list[Dataset] = field(default_factory=list)
    partial: bool = False
    reason: str = ""        # why partial (no PHI)


@dataclass
class RetrieveResult:
    files: list[Path] = field(default_factory=list)    # C-GET: files written
    completed: int = 0
    failed: int = 0
    warning: int = 0
    refused: list[str] = field(default_factory=list)   # reasons for refused sub-operations (no PHI)
    status: Optional[int] = None


def _make_ae(peer: DimsePeer):
    from pynetdicom import AE

    _quiet_identifiers()
    ae = AE(ae_title=peer.calling_ae)
    ae.acse_timeout = peer.timeout_s
    ae.dimse_timeout = peer.timeout_s
    ae.network_timeout = peer.timeout_s
    ae.maximum_pdu_size = 1048576  # what we accept per PDU (bounded)
    return ae


def _status(rsp) -> Optional[int]:
    try:
        return int(rsp.Status) if rsp is not None and "Status" in rsp else None
    except (TypeError, ValueError):
        return None


class _Assoc:
    """One association, aborted when ``cancel`` is set or the deadline has passed."""

    def __init__(self, peer: DimsePeer, contexts, *, ext_neg=None, handlers=None,
                 cancel: Optional[threading.Event] = None):
        self.peer = peer
        self.cancel = cancel
        ae = _make_ae(peer)
        for ctx in contexts:
            ae.add_requested_context(*ctx) if isinstance(ctx, tuple) else ae.add_requested_context(ctx)
        try:
            self.assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, ext_neg=ext_neg,
                                      evt_handlers=handlers)
        except (OSError, ValueError) as exc:
            raise QRError(f"cannot connect to {peer.ae_title}@{peer.host}:{peer.port}: {type(exc).__name__}") from None
        if not self.assoc.is_established:
            why = "rejected" if self.assoc.is_rejected else "aborted or connection failed"
            raise QRError(f"association with {peer.ae_title}@{peer.host}:{peer.port} {why}")
        self._watch = None
        if cancel is not None:
            self._watch = threading.Thread(target=self._watcher, daemon=True, name="qr-cancel")
            self._watch.start()

    def _watcher(self) -> None:
        while self.assoc.is_established:
            if self.cancel.wait(0.2):
                if self.assoc.is_established:
                    self.assoc.abort()
                return

    def close(self) -> None:
        if self.assoc.is_established:
            try:
                self.assoc.release()
            except Exception:  # a broken peer: abort instead
                self.assoc.abort()

    def abort(self) -> None:
        if self.assoc.is_established:
            self.assoc.abort()


class QRSession:
    """One association for the queries and the C-GET of one prior study (FIND + GET +
    the US storage classes as SCP role), so a study costs one association, not one per
    request. ``with QRSession(peer) as qs: c_find(..., session=qs); c_get(..., session=qs)``."""

    def __init__(self, peer: DimsePeer, *, get: bool = True, cancel: Optional[threading.Event] = None):
        from pynetdicom import build_role, evt

        self.peer = peer
        self.store_handler = None
        contexts: list = [FIND]
        roles = None
        handlers = None
        if get:
            contexts += [GET] + [(cls, list(GET_SYNTAXES)) for cls in US_STORAGE]
            roles = [build_role(cls, scp_role=True) for cls in US_STORAGE]
            handlers = [(evt.EVT_C_STORE, self._on_store)]
        self.a = _Assoc(peer, contexts, ext_neg=roles, handlers=handlers, cancel=cancel)

    def _on_store(self, event) -> int:
        h = self.store_handler
        return h(event) if h is not None else 0xC000   # a C-STORE nobody asked for

    def assoc_for(self, what: str) -> _Assoc:
        if not self.a.assoc.is_established:
            raise QRError(f"{what} at {self.peer.ae_title}: association no longer open")
        return self.a

    def close(self) -> None:
        self.a.close()

    def __enter__(self) -> "QRSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _expired(deadline: Optional[float], cancel: Optional[threading.Event]) -> Optional[str]:
    if cancel is not None and cancel.is_set():
        return "cancelled"
    if deadline is not None and time.monotonic() > deadline:
        return "time limit reached"
    return None


def c_find(peer: DimsePeer, query: Dataset, *, max_results: int, deadline: Optional[float] = None,
           cancel: Optional[threading.Event] = None, session: Optional["QRSession"] = None) -> FindResult:
    """One Study Root C-FIND; at most ``max_results`` answers. With ``session``, on its
    association (left open), else on an association of its own."""
    a = session.assoc_for("C-FIND") if session is not None else _Assoc(peer, [FIND], cancel=cancel)
    out = FindResult()
    final = None
    cancelled, drained = False, 0
    try:
        try:
            responses = a.assoc.send_c_find(query, FIND)
        except ValueError:
            raise QRError(f"C-FIND not accepted by {peer.ae_title}") from None
        for status, ident in responses:
            st = _status(status)
            if st in PENDING:
                if cancelled:   # answers sent before the PACS saw our C-CANCEL: dropped, bounded
                    drained += 1
                    if drained > DRAIN_MAX or _expired(deadline, cancel):
                        a.abort()
                        break
                    continue
                if len(out.answers) >= max_results:
                    # one answer too many: C-CANCEL (PS3.4 C.4.1.2.3) keeps the association usable
                    out.partial, out.reason = True, f"more than {max_results} answers (priors.max_results)"
                    try:
                        a.assoc.send_c_cancel(1, query_model=FIND)
                    except Exception:
                        a.abort()
                        break
                    cancelled = True
                    continue
                if ident is not None:
                    out.answers.append(ident)
                why = _expired(deadline, cancel)
                if why:
                    out.partial, out.reason = True, why
                    a.abort()
                    break
                continue
            final = st
            break
        if not out.partial:
            if final is None:
                raise QRError(f"C-FIND at {peer.ae_title}: no final response (timeout or connection lost)")
            if final != 0x0000:
                if out.answers:
                    out.partial, out.reason = True, f"C-FIND ended with status 0x{final:04X}"
                else:
                    raise QRError(f"C-FIND at {peer.ae_title} failed with status 0x{final:04X}")
    finally:
        if session is None:
            a.close()
    return out


# ------------------------------------------------------------------------- queries

def study_query(patient_id: str, issuer: str, *, before: str = "", since: str = "") -> Dataset:
    """Study-level identifier: US studies of the patient (or of everyone, for backfill)
    with StudyDate before ``before`` (exclusive, YYYYMMDD) or from ``since`` on."""
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.PatientID = patient_id
    ds.IssuerOfPatientID = issuer
    ds.ModalitiesInStudy = "US"
    if before:
        import datetime as dt

        day = dt.datetime.strptime(before, "%Y%m%d").date() - dt.timedelta(days=1)
        ds.StudyDate = "-" + day.strftime("%Y%m%d")
    elif since:
        ds.StudyDate = since + "-"
    else:
        ds.StudyDate = ""
    ds.StudyTime = ""
    ds.StudyInstanceUID = ""
    ds.NumberOfStudyRelatedInstances = ""
    return ds


def series_query(study_uid: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "SERIES"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = ""
    ds.Modality = ""
    ds.SeriesDescription = ""
    ds.ProtocolName = ""
    ds.NumberOfSeriesRelatedInstances = ""
    return ds


def instance_query(study_uid: str, series_uid: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "IMAGE"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.SOPInstanceUID = ""
    ds.SOPClassUID = ""
    ds.NumberOfFrames = ""
    ds.InstanceNumber = ""
    ds.ImageComments = ""
    ds.ViewName = ""
    return ds


def valid_uid(value) -> Optional[str]:
    """A UID from an answer, checked (None when absent or malformed)."""
    try:
        return check_uid(str(value or "").strip(), "UID", strict=False)
    except UIDError:
        return None


# ------------------------------------------------------------------------- retrieve

def _retrieve_identifier(study_uid: str, series_uid: str, sop_uids: Sequence[str]) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "IMAGE"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.SOPInstanceUID = list(sop_uids) if len(sop_uids) > 1 else sop_uids[0]
    return ds


def _count(result: RetrieveResult, rsp) -> None:
    for kw, attr in (("NumberOfCompletedSuboperations", "completed"), ("NumberOfFailedSuboperations", "failed"),
                     ("NumberOfWarningSuboperations", "warning")):
        try:
            v = rsp.get(kw)
            if v is not None:
                setattr(result, attr, int(v))
        except (TypeError, ValueError):
            pass


def c_get(peer: DimsePeer, study_uid: str, series_uid: str, sop_uids: Sequence[str], folder: Path, *,
          max_bytes: int, deadline: Optional[float] = None,
          cancel: Optional[threading.Event] = None, session: Optional["QRSession"] = None) -> RetrieveResult:
    """C-GET the given instances of one series into ``folder`` (``<SOP UID>.dcm``). With
    ``session``, on its association (left open), else on an association of its own."""
    from echonode.dicom.spool import file_meta_bytes

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    wanted = set(sop_uids)
    out = RetrieveResult()

    def on_store(event) -> int:
        try:
            req = event.request
            sop = valid_uid(req.AffectedSOPInstanceUID)
            if sop is None or sop not in wanted:
                out.refused.append("an instance that was not asked for")
                return 0xC000  # cannot understand: not ours
            data = req.DataSet.getbuffer() if req.DataSet is not None else memoryview(b"")
            try:
                if len(data) > max_bytes:
                    out.refused.append(f"an instance larger than priors.max_bytes={max_bytes}")
                    return OUT_OF_RESOURCES
                meta = file_meta_bytes(str(req.AffectedSOPClassUID), sop, str(event.context.transfer_syntax))
                path = folder / f"{sop}.dcm"
                tmp = path.with_suffix(".part")
                with open(tmp, "wb") as fh:
                    fh.write(meta)
                    fh.write(data)
                os.replace(tmp, path)
            finally:
                try:
                    data.release()
                except BufferError:
                    pass
            out.files.append(path)
            return 0x0000
        except OSError as exc:
            out.refused.append(f"write failed: {exc.strerror or type(exc).__name__}")
            return OUT_OF_RESOURCES
        except Exception as exc:  # never leave a sub-operation unanswered
            out.refused.append(f"{type(exc).__name__}")
            return 0xC000

    own = session is None
    if own:
        session = QRSession(peer, get=True, cancel=cancel)
    a = session.assoc_for("C-GET")
    session.store_handler = on_store
    try:
        try:
            responses = a.assoc.send_c_get(_retrieve_identifier(study_uid, series_uid, list(sop_uids)), GET)
        except ValueError:
            raise QRError(f"C-GET not accepted by {peer.ae_title}") from None
        final, _ = _drain_retrieve(responses, out, a, deadline, cancel, f"C-GET from {peer.ae_title}")
        out.status = final
        if final is None:
            raise QRError(f"C-GET from {peer.ae_title}: no final response (timeout or connection lost)")
        if final not in (0x0000, 0xB000) and not out.files:
            raise QRError(f"C-GET from {peer.ae_title} failed with status 0x{final:04X}")
    finally:
        session.store_handler = None
        if own:
            session.close()
    return out


def _drain_retrieve(responses, out: "RetrieveResult", a, deadline: Optional[float],
                    cancel: Optional[threading.Event], what: str) -> tuple[Optional[int], int]:
    """Read a C-GET/C-MOVE's responses up to the final one, counting sub-operations;
    aborts when ``deadline`` passes or ``cancel`` is set. Returns (final status or None,
    number of pending responses)."""
    final, pending = None, 0
    for status, _ident in responses:
        st = _status(status)
        if st in PENDING:
            pending += 1
            _count(out, status)
            why = _expired(deadline, cancel)
            if why:
                a.abort()
                raise QRError(f"{what}: {why}")
            continue
        final = st
        if status is not None:
            _count(out, status)
        break
    return final, pending


def c_move(peer: DimsePeer, study_uid: str, series_uid: str, sop_uids: Sequence[str], destination: str, *,
           deadline: Optional[float] = None, cancel: Optional[threading.Event] = None) -> RetrieveResult:
    """C-MOVE the given instances to AE ``destination`` (the node's own SCP). Returns
    when the PACS sends its final response, i.e. after every C-STORE sub-operation."""
    out = RetrieveResult()
    a = _Assoc(peer, [MOVE], cancel=cancel)
    t0 = time.monotonic()
    try:
        try:
            responses = a.assoc.send_c_move(_retrieve_identifier(study_uid, series_uid, list(sop_uids)),
                                            destination, MOVE)
        except ValueError:  # no accepted presentation context: the PACS offers no C-MOVE
            raise MoveRefused(f"C-MOVE not accepted by {peer.ae_title}") from None
        final, pending = _drain_retrieve(responses, out, a, deadline, cancel, f"C-MOVE from {peer.ae_title}")
        out.status = final
        if final is None:
            # Some PACS (Orthanc among them) answer a C-MOVE they do not allow by closing the
            # association at once; a timeout takes the whole DIMSE timeout.
            if pending == 0 and time.monotonic() - t0 < 0.9 * peer.timeout_s and not (cancel and cancel.is_set()):
                raise MoveRefused(f"C-MOVE refused by {peer.ae_title} (association closed without a response)")
            raise QRError(f"C-MOVE from {peer.ae_title}: no final response (timeout or connection lost)")
        if final in MOVE_REFUSED or (0xC000 <= final <= 0xCFFF and out.completed == 0):
            raise MoveRefused(f"C-MOVE to {destination} refused by {peer.ae_title} (status 0x{final:04X})")
        if final not in (0x0000, 0xB000):
            raise QRError(f"C-MOVE from {peer.ae_title} failed with status 0x{final:04X}")
    finally:
        a.close()
    return out


def iter_answers(result: FindResult) -> Iterator[Dataset]:
    yield from result.answers
