"""Deliver result objects to the PACS: result files, outbox, C-STORE, storage commitment.

Flow (every step durable, so a crash repeats nothing visible and loses nothing):

1. :func:`write_results` writes each SR/SC to the node's store as
   ``results/<study UID>/<SOP UID>.dcm`` (UIDs validated first; atomic, durable).
2. :func:`enqueue` adds one outbox row per (object, destination) *before* anything is
   sent (``echonode.store.outbox``; re-enqueueing the same SOP Instance UID resets its
   row, it never duplicates it).
3. :func:`deliver_pending` claims due rows, opens one association per destination,
   sends each file by C-STORE and records the answer: Success → delivered (or
   ``committing`` when the destination asks for storage commitment); a Warning status
   (0xB000, 0xB006, 0xB007) counts as stored and is recorded; a Failure status, a
   refused/aborted association or a timeout → retry with exponential backoff
   (``delivery.backoff_initial_s`` doubling up to ``delivery.backoff_max_s``) and
   ``dead`` once failing for ``delivery.retry_for_s`` (default a day; or after
   ``delivery.max_attempts`` when set).
4. Storage commitment (per destination ``storage_commitment = true``): after the
   stores, an N-ACTION (Storage Commitment Push Model, PS3.4 Annex J) lists the sent
   instances under a new Transaction UID. The PACS answers with an N-EVENT-REPORT on a
   new association to our AE, as Orthanc does (:class:`CommitmentListener`, or bind
   :func:`commitment_report_handler` in the node's SCP); a report that arrives before
   we release the sending association goes to the same handler. Only then is a row ``delivered``; rows without a report within
   ``delivery.commitment_timeout_s`` are sent again.

This module never imports torch; it writes no SQL itself (``echonode.store.outbox``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import logging
import ssl
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Optional, Sequence, Union

import pydicom
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from echonode.config import Destination, Settings
from echonode.dicom.uids import check_uid
from echonode.storage import RESULTS
from echonode.store import outbox as ob

if TYPE_CHECKING:
    from echonode.storage import Storage

log = logging.getLogger(__name__)

__all__ = [
    "write_results", "result_kind", "enqueue", "deliver_pending", "DeliverySummary", "CommitmentListener",
    "commitment_report_handler", "DeliveryError", "STORAGE_COMMITMENT_PUSH", "STORAGE_COMMITMENT_INSTANCE",
]

STORAGE_COMMITMENT_PUSH = "1.2.840.10008.1.20.1"
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"  # well-known SOP Instance
WARNING_STATUSES = {0xB000, 0xB006, 0xB007}
KIND_BY_CLASS = {"1.2.840.10008.5.1.4.1.1.88.34": "sr", "1.2.840.10008.5.1.4.1.1.7": "sc",
                 "1.2.840.10008.5.1.4.1.1.7.4": "cine", "1.2.840.10008.5.1.4.1.1.104.1": "pdf"}


def result_kind(sop_class_uid: str, series_number=None) -> str:
    """The outbox ``kind`` of a result object: its SOP class names it, except that the
    key-results page and the PromptCAM overlays share the Secondary Capture class and
    are told apart by their fixed series number (``page.PAGE_SERIES_NUMBER``)."""
    from echonode.dicom.page import PAGE_SERIES_NUMBER   # lazy: page pulls in highdicom

    kind = KIND_BY_CLASS.get(sop_class_uid, "")
    if kind == "sc" and series_number is not None and str(series_number).strip() == str(PAGE_SERIES_NUMBER):
        return "page"
    return kind


class DeliveryError(RuntimeError):
    """A result object cannot be written or enqueued."""


# ------------------------------------------------------------------ result files
def write_results(store: "Storage", datasets: Iterable[Dataset]) -> list[ob.OutboxObject]:
    """Write each dataset to the node's store as ``results/<StudyInstanceUID>/<SOPInstanceUID>.dcm``
    (the outbox row's ``path`` is that key).

    UIDs are validated before they become key components; the write is atomic (a reader
    sees the old object or the new one, never half of one) and durable on return.
    """
    out = []
    for ds in datasets:
        study = check_uid(getattr(ds, "StudyInstanceUID", None), "result StudyInstanceUID", strict=False)
        sop = check_uid(getattr(ds, "SOPInstanceUID", None), "result SOPInstanceUID")
        cls = check_uid(getattr(ds, "SOPClassUID", None), "result SOPClassUID")
        key = f"{RESULTS}/{study}/{sop}.dcm"
        store.write(key, lambda fh, ds=ds: ds.save_as(fh, enforce_file_format=True))
        out.append(ob.OutboxObject(path=key, sop_instance_uid=sop, sop_class_uid=cls,
                                   study_instance_uid=study, kind=result_kind(cls, ds.get("SeriesNumber"))))
    return out


def _object_from_path(path: Union[str, Path]) -> ob.OutboxObject:
    p = Path(path)
    try:
        ds = pydicom.dcmread(p, stop_before_pixels=True, specific_tags=[
            "StudyInstanceUID", "SOPInstanceUID", "SOPClassUID", "SeriesNumber"])
    except Exception as exc:  # noqa: BLE001 - any unreadable file is refused
        raise DeliveryError(f"{p}: not a readable DICOM file ({exc.__class__.__name__})") from None
    cls = check_uid(getattr(ds, "SOPClassUID", None), f"{p.name}: SOPClassUID")
    return ob.OutboxObject(path=str(p.resolve()),
                           sop_instance_uid=check_uid(getattr(ds, "SOPInstanceUID", None), f"{p.name}: SOPInstanceUID"),
                           sop_class_uid=cls,
                           study_instance_uid=check_uid(getattr(ds, "StudyInstanceUID", None), f"{p.name}: StudyInstanceUID",
                                                        strict=False),
                           kind=result_kind(cls, ds.get("SeriesNumber")))


def _dest_names(destinations: Sequence[Union[Destination, str]]) -> list[str]:
    names = []
    for d in destinations:
        name = d.name if isinstance(d, Destination) else str(d)
        if not name:
            raise DeliveryError("a destination has no name")
        names.append(name)
    return names


def enqueue(session, objects: Sequence[Union[Dataset, str, Path, ob.OutboxObject]],
            destinations: Sequence[Union[Destination, str]], *,
            store: Optional["Storage"] = None,
            now: Optional[dt.datetime] = None) -> list[int]:
    """Outbox rows for every object × destination; returns the row ids. Commits.

    ``objects``: Datasets, or paths of DICOM files (both are written to ``store`` first,
    which is then required: the delivery may run on another machine), or
    :class:`OutboxObject` already in the store.
    """
    items: list[ob.OutboxObject] = []
    datasets = [o for o in objects if isinstance(o, Dataset)]
    files = [o for o in objects if isinstance(o, (str, Path))]
    if (datasets or files) and store is None:
        raise DeliveryError("enqueue: Datasets and files need the node's store to be written to before they are enqueued")
    if datasets:
        items.extend(write_results(store, datasets))
    for o in objects:
        if isinstance(o, ob.OutboxObject):
            items.append(o)
    for f in files:
        obj = _object_from_path(f)
        key = f"{RESULTS}/{obj.study_instance_uid}/{obj.sop_instance_uid}.dcm"
        store.put(key, Path(f))
        items.append(dataclasses.replace(obj, path=key))
    names = _dest_names(destinations)
    if not names or not items:
        return []
    return ob.add(session, items, names, now=now)


# ------------------------------------------------------------------ delivery
@dataclass
class DeliverySummary:
    claimed: int = 0
    delivered: int = 0
    committing: int = 0
    warnings: int = 0
    retrying: int = 0
    dead: int = 0
    expired_commitments: int = 0
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def tls_context(dest: Destination) -> Optional[tuple[ssl.SSLContext, str]]:
    """``tls_args`` for pynetdicom: see :func:`echonode.dicom.tls.client_context` (TLS 1.2+,
    chain and host name or IP always verified, optional certificate pin, mutual TLS)."""
    from echonode.dicom.tls import client_context

    return client_context(dest)


def _status_of(rsp: Optional[Dataset]) -> Optional[int]:
    if rsp is None or "Status" not in rsp:
        return None
    return int(rsp.Status)


def _make_ae(settings: Settings, dest: Destination):
    from pynetdicom import AE

    ae = AE(ae_title=dest.calling_ae or settings.node.ae_title)
    ae.acse_timeout = settings.node.acse_timeout_s
    ae.dimse_timeout = settings.node.dimse_timeout_s
    ae.network_timeout = settings.node.network_timeout_s
    return ae


def _transfer_syntaxes(path: str) -> list[str]:
    try:
        meta = pydicom.filereader.read_file_meta_info(path)
        ts = str(meta.TransferSyntaxUID)
    except Exception:  # noqa: BLE001
        ts = ExplicitVRLittleEndian
    out = [ts]
    for t in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        if t not in out:
            out.append(t)
    return out


class _Delivery:
    """One delivery run to one destination: the outbox bookkeeping every step shares."""

    def __init__(self, settings: Settings, dest: Destination, session, summary: DeliverySummary,
                 now_fn: Callable[[], dt.datetime]):
        self.settings, self.dest, self.session, self.summary, self.now_fn = settings, dest, session, summary, now_fn

    def failed(self, row: ob.OutboxRow, error: str, status: Optional[int] = None, count: bool = True) -> None:
        """Retry later with backoff, or ``dead`` after ``delivery.max_attempts``."""
        d = self.settings.delivery
        state = ob.mark_failed(self.session, row.id, error, status, now=self.now_fn(), count_attempt=count,
                               **d.retry_policy())
        if state == ob.DEAD:
            self.summary.dead += 1
            log.error("outbox %d (%s to %s) is dead (delivery.retry_for_s=%g, max_attempts=%d): %s", row.id,
                      row.kind or "object", self.dest.name, d.retry_for_s, d.max_attempts, error)
        else:
            self.summary.retrying += 1
            log.warning("outbox %d to %s failed (%s); will retry", row.id, self.dest.name, error)

    def fail_all(self, rows, error: str) -> None:
        for row in rows:
            self.failed(row, error)

    def files_present(self, rows: list[ob.OutboxRow], stack: contextlib.ExitStack) -> list[ob.OutboxRow]:
        """The rows whose object the store gives; ``self.files`` holds their local files until
        ``stack`` closes (C-STORE and STOW-RS both send from them). A missing object, or a
        row naming no object of the store (a path written by an older version beside another
        store), cannot come back: that row is dead at once. A store that cannot answer now
        is a failure like a PACS that cannot: retried."""
        from echonode.storage import StorageUnavailable, open_storage

        store = open_storage(self.settings)
        self.files = {}
        for row in rows:
            try:
                self.files[row.id] = stack.enter_context(store.fetch(row.path))
            except (FileNotFoundError, ValueError) as exc:
                why = f"result file missing: {row.path}" if isinstance(exc, FileNotFoundError) else \
                    f"result not in the node's store ({exc})"
                ob.mark_failed(self.session, row.id, why, None, now=self.now_fn(), max_attempts=row.attempts + 1,
                               backoff_initial_s=0, backoff_max_s=0, retry_for_s=0)
                self.summary.dead += 1
                log.error("outbox %d to %s is dead: %s", row.id, self.dest.name, why)
            except StorageUnavailable as exc:
                self.failed(row, str(exc))
        return [row for row in rows if row.id in self.files]

    def associate(self, rows: list[ob.OutboxRow], commitment_handler):
        """An established association with a context per (SOP class, transfer syntaxes) of the
        rows, or None after failing every row with the reason."""
        from pynetdicom import evt

        dest = self.dest
        ae = _make_ae(self.settings, dest)
        contexts = []
        for row in rows:
            key = (row.sop_class_uid, tuple(_transfer_syntaxes(self.files[row.id])))
            if key not in contexts:
                contexts.append(key)
        for cls, syntaxes in contexts[:120]:     # PS3.8: at most 128 presentation contexts
            ae.add_requested_context(cls, list(syntaxes))
        handlers = []
        if dest.storage_commitment:
            ae.add_requested_context(STORAGE_COMMITMENT_PUSH)
            if commitment_handler is not None:   # a report may arrive on this association
                handlers.append((evt.EVT_N_EVENT_REPORT, commitment_handler))
        try:
            tls_args = tls_context(dest)
        except (OSError, ssl.SSLError) as exc:
            self.fail_all(rows, f"TLS configuration error: {exc}")
            return None
        try:
            assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls_args,
                                 evt_handlers=handlers or None)
        except (OSError, ssl.SSLError) as exc:
            self.fail_all(rows, f"cannot connect to {dest.host}:{dest.port}: {exc.__class__.__name__}")
            return None
        if not assoc.is_established:
            why = "association rejected" if assoc.is_rejected else "association aborted or connection failed"
            self.fail_all(rows, f"{why} by {dest.ae_title}@{dest.host}:{dest.port}")
            return None
        return assoc

    def store_all(self, assoc, rows: list[ob.OutboxRow]) -> list[tuple[ob.OutboxRow, int]]:
        """C-STORE each row's file; returns the stored rows with their (success or warning) status."""
        stored = []
        for i, row in enumerate(rows):
            if not assoc.is_established:
                self.failed(row, "association lost")
                continue
            try:
                rsp = assoc.send_c_store(str(self.files[row.id]), msg_id=(i % 65535) + 1)
            except ValueError as exc:  # no accepted presentation context for this SOP class
                self.failed(row, f"not accepted by {self.dest.ae_title}: {exc}")
                continue
            status = _status_of(rsp)
            if status is None:
                self.failed(row, "no C-STORE response (timeout or connection lost)")
            elif status == 0x0000 or status in WARNING_STATUSES:
                if status in WARNING_STATUSES:
                    self.summary.warnings += 1
                    log.warning("outbox %d: %s stored with warning status 0x%04X", row.id, self.dest.name, status)
                stored.append((row, status))
            elif status & 0xFF00 == 0xA900:
                # "Data Set does not match SOP Class": the same bytes will be refused again;
                # dead at once (healthz alerts; `echonode outbox retry` after a fix)
                self.summary.dead += 1
                log.error("outbox %d refused by %s with status 0x%04X (permanent)", row.id, self.dest.name, status)
                ob.mark_failed(self.session, row.id, f"C-STORE refused with status 0x{status:04X} (permanent)", status,
                               now=self.now_fn(), max_attempts=row.attempts + 1, backoff_initial_s=0,
                               backoff_max_s=0, retry_for_s=0)
            else:  # 0xA7xx out of resources, 0xCxxx, ...: the PACS may accept it later
                self.failed(row, f"C-STORE failed with status 0x{status:04X}", status)
        return stored

    def mark_delivered(self, stored: list[tuple[ob.OutboxRow, int]]) -> None:
        for row, status in stored:
            note = "" if status == 0 else f"stored with warning status 0x{status:04X}"
            ob.mark_delivered(self.session, row.id, status, now=self.now_fn(), note=note)
            self.summary.delivered += 1

    def request_commitment(self, assoc, stored: list[tuple[ob.OutboxRow, int]]) -> None:
        """Storage commitment (PS3.4 Annex J): one N-ACTION for the stored rows under a new
        Transaction UID; the rows are ``committing`` until the report says delivered."""
        tx = generate_uid()
        req = Dataset()
        req.TransactionUID = tx
        refs = []
        for row, _ in stored:
            item = Dataset()
            item.ReferencedSOPClassUID = row.sop_class_uid
            item.ReferencedSOPInstanceUID = row.sop_instance_uid
            refs.append(item)
        req.ReferencedSOPSequence = refs
        # rows must be 'committing' before the report can arrive
        for row, status in stored:
            ob.mark_committing(self.session, [row.id], tx, status, now=self.now_fn(),
                               note="" if status == 0 else f"stored with warning status 0x{status:04X}")
        try:
            st, _reply = assoc.send_n_action(req, 1, STORAGE_COMMITMENT_PUSH, STORAGE_COMMITMENT_INSTANCE)
        except ValueError as exc:
            st = None
            log.warning("storage commitment not accepted by %s: %s", self.dest.name, exc)
        status = _status_of(st)
        if status != 0x0000:
            err = ("storage commitment request refused" if status is None
                   else f"storage commitment N-ACTION failed with status 0x{status:04X}")
            for row, _ in stored:
                self.failed(row, err, status, count=False)
            return
        self.summary.committing += len(stored)


def _deliver_to(settings: Settings, dest: Destination, rows: list[ob.OutboxRow], session,
                summary: DeliverySummary, now_fn: Callable[[], dt.datetime],
                commitment_handler=None) -> None:
    """Send ``rows`` to ``dest`` on one association and record every outcome."""
    run = _Delivery(settings, dest, session, summary, now_fn)
    if dest.kind == "dicomweb":  # STOW-RS, the same outbox transitions (echonode.dicom.web)
        from echonode.dicom import web
        return web.stow_rows(run, rows)
    with contextlib.ExitStack() as stack:
        sendable = run.files_present(rows, stack)
        if not sendable:
            return
        assoc = run.associate(sendable, commitment_handler)
        if assoc is None:
            return
        try:
            stored = run.store_all(assoc, sendable)
            if not stored:
                return
            if dest.storage_commitment:
                run.request_commitment(assoc, stored)
            else:
                run.mark_delivered(stored)
        finally:
            if assoc.is_established:
                assoc.release()


def deliver_pending(settings: Settings, session_factory, now: Optional[dt.datetime] = None, *,
                    limit: int = 500, commitment_handler=None) -> DeliverySummary:
    """Send every due outbox row; returns what happened. Safe to call from several
    workers and repeatedly (e.g. every few seconds from the scheduler).

    ``now`` fixes the clock (tests); otherwise UTC now is read at each step.
    ``commitment_handler``: an ``EVT_N_EVENT_REPORT`` handler for reports sent on the
    same association (default: one that writes through ``session_factory``).
    """
    def now_fn() -> dt.datetime:
        return now or ob.utcnow()

    summary = DeliverySummary()
    d = settings.delivery
    dests = {x.name: x for x in d.destinations}
    if commitment_handler is None:
        commitment_handler = commitment_report_handler(settings, session_factory)
    with session_factory() as session:
        summary.expired_commitments = ob.expire_commitments(
            session, d.commitment_timeout_s, now=now_fn(), **d.retry_policy())
        rows = ob.claim_due(session, now=now_fn(), limit=limit)
        summary.claimed = len(rows)
        by_dest: dict[str, list[ob.OutboxRow]] = {}
        for row in rows:
            by_dest.setdefault(row.destination, []).append(row)
        for name, dest_rows in by_dest.items():
            dest = dests.get(name)
            if dest is None:
                for row in dest_rows:
                    ob.mark_failed(session, row.id, f"destination {name!r} is not configured", None,
                                   now=now_fn(), **d.retry_policy())
                    summary.retrying += 1
                summary.errors.append(f"destination {name!r} is not configured")
                continue
            try:
                _deliver_to(settings, dest, dest_rows, session, summary, now_fn, commitment_handler)
            except Exception as exc:  # noqa: BLE001 - one destination must not stop the others
                log.exception("delivery to %s failed", name)
                summary.errors.append(f"{name}: {exc.__class__.__name__}: {exc}")
                for row in dest_rows:
                    session.rollback()
                    r = session.get(ob.OutboxRow, row.id)
                    if r is not None and r.state == ob.SENDING:
                        ob.mark_failed(session, row.id, f"internal error: {exc.__class__.__name__}", None,
                                       now=now_fn(), **d.retry_policy())
    return summary


# ------------------------------------------------------------------ storage commitment reports
def commitment_report_handler(settings: Settings, session_factory):
    """A pynetdicom ``EVT_N_EVENT_REPORT`` handler that applies Storage Commitment
    results (PS3.4 J.3.3) to the outbox. Bind it in any SCP that receives reports."""
    d = settings.delivery

    def handle(event):
        try:
            req = event.request
            if str(getattr(req, "AffectedSOPClassUID", "")) != STORAGE_COMMITMENT_PUSH:
                return 0x0118, None   # no such SOP class
            info = event.event_information
            tx = check_uid(str(info.TransactionUID), "TransactionUID")
            ok = [str(i.ReferencedSOPInstanceUID) for i in info.get("ReferencedSOPSequence", [])]
            bad = [(str(i.ReferencedSOPInstanceUID), int(i.get("FailureReason", 0x0110)))
                   for i in info.get("FailedSOPSequence", [])]
        except Exception as exc:  # noqa: BLE001
            log.warning("malformed storage commitment report: %s", exc.__class__.__name__)
            return 0x0110, None
        with session_factory() as session:
            n_ok, n_bad = ob.apply_commitment(session, tx, ok, bad, **d.retry_policy())
        log.info("storage commitment %s: %d committed, %d failed", tx, n_ok, n_bad)
        return 0x0000, None

    return handle


class CommitmentListener:
    """A small SCP that receives Storage Commitment N-EVENT-REPORTs on a new association.

    Use it where the node's main SCP is not running (tools, tests); ``echonode serve``
    can bind :func:`commitment_report_handler` in its own SCP instead.
    """

    def __init__(self, settings: Settings, session_factory, host: str = "127.0.0.1",
                 port: Optional[int] = None, ae_title: Optional[str] = None):
        self.settings = settings
        self.session_factory = session_factory
        self.host = host
        self.port = settings.node.port if port is None else port
        self.ae_title = ae_title or settings.node.ae_title
        self._server = None
        self._lock = threading.Lock()

    def start(self) -> "CommitmentListener":
        from pynetdicom import AE, evt

        ae = AE(ae_title=self.ae_title)
        ae.add_supported_context(STORAGE_COMMITMENT_PUSH, scu_role=True, scp_role=True)
        ae.network_timeout = self.settings.node.network_timeout_s
        handler = commitment_report_handler(self.settings, self.session_factory)
        self._server = ae.start_server((self.host, self.port), block=False,
                                       evt_handlers=[(evt.EVT_N_EVENT_REPORT, handler)])
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
