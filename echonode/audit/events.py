"""The events echonode audits, each built as a PS3.15 A.5 message.

Every builder returns an :class:`Event`: the message (which may carry patient
identifiers, by design of the standard), plus PHI-free index fields for SQL
(``name``, study UID, patient key) and a PHI-free ``summary`` used in logs and in
``echonode audit list``.

Code choices (DICOM PS3.16 CID 400-404, PS3.15 A.5.3):

==============================  ==================================  ====================
event                            EventID                             EventTypeCode
==============================  ==================================  ====================
application start / stop         110100 Application Activity          110120 / 110121
configuration loaded             110113 Security Alert                110131 Software Configuration
model installed or changed       110113 Security Alert                110131 Software Configuration
outbox retry / purge             110113 Security Alert                110132 Use of Restricted Function
audit repository down / back     110113 Security Alert                110133 / 110134 Audit Recording Stopped / Started
peer TLS authentication failed   110113 Security Alert                110126 Node Authentication
association accepted/rejected    110114 User Authentication           110122 Login
association closed (counts)      110114 User Authentication           110123 Logout
instance received                110104 DICOM Instances Transferred   (action C, U on replace)
study analysed                   110103 DICOM Instances Accessed      (action R)
result created                   110103 DICOM Instances Accessed      (action C)
result delivered / dead letter   110104 DICOM Instances Transferred   (action R)
export of data                   110106 Export                        (action R)
audit log read / retention       110101 Audit Log Used                (action R / D)
==============================  ==================================  ====================
"""

from __future__ import annotations

import datetime as dt
import getpass
import hashlib
import os
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from echonode.audit.message import (
    MAJOR_FAILURE, MINOR_FAILURE, SERIOUS_FAILURE, SUCCESS, ActiveParticipant, AuditMessage, Code,
    ParticipantObject, sop_classes,
)

# ---- codes (DCM: PS3.16; RFC-3881 value sets of PS3.15 A.5.1.2)
APPLICATION_ACTIVITY = Code("110100", "DCM", "Application Activity")
AUDIT_LOG_USED = Code("110101", "DCM", "Audit Log Used")
INSTANCES_ACCESSED = Code("110103", "DCM", "DICOM Instances Accessed")
INSTANCES_TRANSFERRED = Code("110104", "DCM", "DICOM Instances Transferred")
EXPORT = Code("110106", "DCM", "Export")
SECURITY_ALERT = Code("110113", "DCM", "Security Alert")
USER_AUTHENTICATION = Code("110114", "DCM", "User Authentication")

APPLICATION_START = Code("110120", "DCM", "Application Start")
APPLICATION_STOP = Code("110121", "DCM", "Application Stop")
LOGIN = Code("110122", "DCM", "Login")
LOGOUT = Code("110123", "DCM", "Logout")
NODE_AUTHENTICATION = Code("110126", "DCM", "Node Authentication")
SOFTWARE_CONFIGURATION = Code("110131", "DCM", "Software Configuration")
USE_OF_RESTRICTED_FUNCTION = Code("110132", "DCM", "Use of Restricted Function")
AUDIT_RECORDING_STOPPED = Code("110133", "DCM", "Audit Recording Stopped")
AUDIT_RECORDING_STARTED = Code("110134", "DCM", "Audit Recording Started")

ROLE_APPLICATION = Code("110150", "DCM", "Application")
ROLE_LAUNCHER = Code("110151", "DCM", "Application Launcher")
ROLE_DESTINATION = Code("110152", "DCM", "Destination Role ID")
ROLE_SOURCE = Code("110153", "DCM", "Source Role ID")
ROLE_DESTINATION_MEDIA = Code("110154", "DCM", "Destination Media")

ID_STUDY = Code("110180", "DCM", "Study Instance UID")
ID_NODE = Code("110182", "DCM", "Node ID")
ID_PATIENT = Code("2", "RFC-3881", "Patient Number")
ID_REPORT_NAME = Code("8", "RFC-3881", "Report Name")
ID_USER = Code("11", "RFC-3881", "User Identifier")
ID_URI = Code("12", "RFC-3881", "URI")


# ------------------------------------------------------------------ who we are
@dataclass(frozen=True)
class AuditContext:
    """The reporting application: set once per process by :func:`configure`."""

    ae_title: str = "ECHONODE"
    source_id: str = ""
    enterprise_site_id: str = ""
    hostname: str = field(default_factory=socket.gethostname)
    destinations: tuple = ()  # config Destinations, to name a result's receiver by AE title and host

    @property
    def source(self) -> str:
        return self.source_id or f"{self.ae_title}@{self.hostname}"


_context = AuditContext()
_lock = threading.Lock()


def configure(settings: Any) -> AuditContext:
    global _context
    a = getattr(settings, "audit", None)
    ctx = AuditContext(ae_title=settings.node.ae_title,
                       source_id=getattr(a, "source_id", "") or "",
                       enterprise_site_id=getattr(a, "enterprise_site_id", "") or "",
                       destinations=tuple(getattr(getattr(settings, "delivery", None), "destinations", ()) or ()))
    with _lock:
        _context = ctx
    return ctx


def context() -> AuditContext:
    return _context


def os_user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry (containers)
        return f"uid:{os.getuid()}"


# ------------------------------------------------------------------ the recorded unit
@dataclass(frozen=True)
class Event:
    """One audit event: the A.5 message and its PHI-free index fields."""

    name: str
    message: AuditMessage
    study_uid: str = ""
    patient_key: str = ""
    summary: dict = field(default_factory=dict)

    @property
    def occurred_at(self) -> dt.datetime:
        w = self.message.when
        return w.astimezone(dt.timezone.utc).replace(tzinfo=None) if w.tzinfo else w


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _message(event_id: Code, action: str, outcome: int, participants: Sequence[ActiveParticipant], *,
             types: Sequence[Code] = (), description: str = "",
             objects: Sequence[ParticipantObject] = ()) -> AuditMessage:
    ctx = _context
    return AuditMessage(event_id=event_id, action=action, outcome=outcome, when=_now(),
                        participants=tuple(participants), source_id=ctx.source,
                        enterprise_site_id=ctx.enterprise_site_id, event_types=tuple(types),
                        outcome_description=description, objects=tuple(objects))


def _app(requestor: bool = False, roles: Sequence[Code] = (ROLE_APPLICATION,), ae_title: str = "") -> ActiveParticipant:
    ctx = _context
    return ActiveParticipant(user_id=ae_title or ctx.ae_title, is_requestor=requestor, roles=tuple(roles),
                             alternative_user_id=str(os.getpid()), network_access_point=ctx.hostname)


def _user(roles: Sequence[Code] = ()) -> ActiveParticipant:
    return ActiveParticipant(user_id=os_user(), is_requestor=True, roles=tuple(roles))


# ------------------------------------------------------------------ patients
@dataclass(frozen=True)
class PatientRef:
    """A patient as the audit message names it. ``key`` is the node's PHI-free patient key."""

    patient_id: str = ""
    issuer: str = ""
    name: str = ""

    @property
    def key(self) -> str:
        from echonode.store.interpretations import patient_key
        return patient_key(self.patient_id, self.issuer)

    @property
    def object_id(self) -> str:
        # HL7 CX form used by IHE ATNA: ID^^^Issuer
        return f"{self.patient_id}^^^{self.issuer}" if self.issuer else self.patient_id


DEFLATED_TS = "1.2.840.10008.1.2.1.99"


def patient_from_file(path: Optional[os.PathLike | str]) -> tuple[Optional[PatientRef], dict]:
    """Patient and study identifiers read from a stored DICOM file's header (no pixels).

    Returns (patient or None, {study, series, sop_class, sop_instance, accession})."""
    info: dict = {}
    if not path:
        return None, info
    # The file may be a hostile peer's rejected input (quarantine): read it the way the spool
    # does, at most spool.MAX_HEADER_BYTES, and never inflate a Deflated dataset here (pydicom
    # inflates it whole in memory: a 1 MB bomb costs GiB); its file meta still names it.
    try:
        from pydicom.filereader import read_file_meta_info

        from echonode.dicom.spool import read_header
        meta = read_file_meta_info(str(path))
        if str(meta.get("TransferSyntaxUID", "")) == DEFLATED_TS:
            return None, {"sop_class": str(meta.get("MediaStorageSOPClassUID", "")).strip()[:64],
                          "sop_instance": str(meta.get("MediaStorageSOPInstanceUID", "")).strip()[:64]}
        ds = read_header(Path(path))
    except Exception:
        return None, info

    def text(kw: str) -> str:
        try:
            v = ds.get(kw)
        except Exception:
            return ""
        return "" if v is None else str(v).strip()[:64]

    info = {"study": text("StudyInstanceUID"), "series": text("SeriesInstanceUID"),
            "sop_class": text("SOPClassUID"), "sop_instance": text("SOPInstanceUID"),
            "accession": text("AccessionNumber")}
    if "PatientID" not in ds and "PatientName" not in ds:
        return None, info
    return PatientRef(text("PatientID"), text("IssuerOfPatientID"), text("PatientName")), info


def patient_of(ds: Any) -> Optional[PatientRef]:
    """The patient of a pydicom Dataset (None when it names none)."""
    if ds is None:
        return None

    def text(kw: str) -> str:
        try:
            v = ds.get(kw)
        except Exception:
            return ""
        return "" if v is None else str(v).strip()[:64]
    if "PatientID" not in ds and "PatientName" not in ds:
        return None
    return PatientRef(text("PatientID"), text("IssuerOfPatientID"), text("PatientName"))


def _patient_object(p: Optional[PatientRef]) -> list[ParticipantObject]:
    if p is None:
        return []
    return [ParticipantObject(object_id=p.object_id or "-", id_type=ID_PATIENT, name=p.name or p.patient_id or "-",
                              type_code=1, role=1)]


def _study_object(study_uid: str, pairs: Sequence[tuple[str, str]] = (), *, accession: str = "",
                  details: Sequence[tuple[str, str]] = (), life_cycle: Optional[int] = None) -> ParticipantObject:
    return ParticipantObject(object_id=study_uid, id_type=ID_STUDY, name=study_uid, type_code=2, role=3,
                             life_cycle=life_cycle, details=tuple(details), sop_classes=sop_classes(pairs),
                             accessions=(accession,) if accession else ())


def _ev(name, msg, *, study="", patient: Optional[PatientRef] = None, **summary) -> Event:
    return Event(name=name, message=msg, study_uid=study or "", patient_key=patient.key if patient else "",
                 summary={k: v for k, v in summary.items() if v not in (None, "")})


def _safe(builder):
    """An audit builder never breaks the audited work: on an unexpected error it logs the
    event kind and the error class (no values) and returns None, which record() ignores."""
    import functools
    import logging

    @functools.wraps(builder)
    def wrapper(*args, **kwargs):
        try:
            return builder(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            logging.getLogger("echonode.audit").error("could not build audit event %s: %s",
                                                      builder.__name__, type(exc).__name__)
            return None
    return wrapper


# ------------------------------------------------------------------ application
@_safe
def application_start(what: str = "serve") -> Event:
    msg = _message(APPLICATION_ACTIVITY, "E", SUCCESS, [_app(), _user([ROLE_LAUNCHER])],
                   types=[APPLICATION_START])
    return _ev("application-start", msg, process=what)


@_safe
def application_stop(what: str = "serve") -> Event:
    msg = _message(APPLICATION_ACTIVITY, "E", SUCCESS, [_app(), _user([ROLE_LAUNCHER])],
                   types=[APPLICATION_STOP])
    return _ev("application-stop", msg, process=what)


def config_sha256(path: Optional[os.PathLike | str]) -> str:
    if not path:
        return ""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return ""


@_safe
def configuration_loaded(settings: Any, path: Optional[os.PathLike | str] = None) -> Event:
    """The configuration in force: the file's sha256 and the sha256 of the effective settings
    (file + environment), so a change by either is visible."""
    import dataclasses
    import json

    path = path or os.environ.get("ECHONODE_CONFIG") or ""
    effective = hashlib.sha256(json.dumps(dataclasses.asdict(settings), sort_keys=True, default=str)
                               .encode("utf-8")).hexdigest()
    file_sha = config_sha256(path)
    uri = Path(path).resolve().as_uri() if path else "builtin-defaults"
    obj = ParticipantObject(object_id=uri, id_type=ID_URI, name=Path(path).name if path else "defaults",
                            type_code=2, role=13,
                            details=(("file-sha256", file_sha or "-"), ("effective-sha256", effective)))
    msg = _message(SECURITY_ALERT, "E", SUCCESS, [_app(requestor=True)], types=[SOFTWARE_CONFIGURATION],
                   objects=[obj])
    return _ev("configuration-loaded", msg, file=str(path) or "-", file_sha256=file_sha, effective_sha256=effective)


# ------------------------------------------------------------------ associations
def _peer(calling_ae: str, host: str, tls_subject: str = "") -> ActiveParticipant:
    return ActiveParticipant(user_id=calling_ae or "-", is_requestor=True, alternative_user_id=tls_subject,
                             network_access_point=host)


@_safe
def association(calling_ae: str, called_ae: str, peer_host: str, peer_port: int | str = "", *,
                accepted: bool, reason: str = "", tls_subject: str = "") -> Event:
    """An association request answered: accepted, or rejected with the reason."""
    desc = reason if not accepted else ""
    msg = _message(USER_AUTHENTICATION, "E", SUCCESS if accepted else MINOR_FAILURE,
                   [_peer(calling_ae, peer_host, tls_subject), _app(ae_title=called_ae)], types=[LOGIN],
                   description=desc)
    return _ev("association-accepted" if accepted else "association-rejected", msg, calling_ae=calling_ae,
               called_ae=called_ae, peer=f"{peer_host}:{peer_port}" if peer_port != "" else peer_host,
               tls_subject=tls_subject, reason=reason)


@_safe
def association_closed(calling_ae: str, called_ae: str, peer: str, *, stored: int, duplicates: int = 0,
                       failures: int = 0, aborted: bool = False, statuses: Optional[dict] = None,
                       tls_subject: str = "") -> Event:
    host = peer.rsplit(":", 1)[0] if peer.count(":") == 1 else peer
    status_text = ",".join(f"0x{k:04X}x{v}" for k, v in sorted((statuses or {}).items()))
    desc = (f"{'aborted' if aborted else 'released'}; stored {stored} (duplicates {duplicates}); "
            f"failures {failures}" + (f"; statuses {status_text}" if status_text else ""))
    outcome = SUCCESS if not aborted and not failures else MINOR_FAILURE
    msg = _message(USER_AUTHENTICATION, "E", outcome, [_peer(calling_ae, host, tls_subject),
                                                      _app(ae_title=called_ae)],
                   types=[LOGOUT], description=desc)
    return _ev("association-closed", msg, calling_ae=calling_ae, called_ae=called_ae, peer=peer,
               stored=stored, duplicates=duplicates, failures=failures,
               outcome="aborted" if aborted else "released", statuses=status_text)


def tls_subject(assoc: Any) -> str:
    """The verified peer certificate's subject of a pynetdicom association ("" without TLS)."""
    try:
        sock = assoc.dul.socket.socket
        cert = sock.getpeercert() if hasattr(sock, "getpeercert") else None
    except Exception:
        return ""
    if not cert:
        return ""
    try:
        return ",".join("=".join(pair) for rdn in cert.get("subject", ()) for pair in rdn)[:256]
    except Exception:
        return ""


@_safe
def node_authentication_failed(peer_host: str, reason: str) -> Event:
    msg = _message(SECURITY_ALERT, "E", MINOR_FAILURE, [_peer("-", peer_host), _app()],
                   types=[NODE_AUTHENTICATION], description=reason,
                   objects=[ParticipantObject(object_id=peer_host or "-", id_type=ID_NODE, name=peer_host or "-",
                                              type_code=2, role=13)])
    return _ev("node-authentication-failed", msg, peer=peer_host, reason=reason)


# ------------------------------------------------------------------ instances received
@_safe
def instance_received(result: Any, *, calling_ae: str, peer: str, called_ae: str = "", status: Optional[int] = None,
                      sop_class_uid: str = "", sop_instance_uid: str = "") -> Event:
    """A C-STORE answered. ``result`` is the spool's StoreResult (status, reason, UIDs, path,
    quarantine path, duplicate/replaced). Patient identifiers are read from the stored
    (or quarantined) file's header."""
    status = int(result.status if status is None else status)
    path = getattr(result, "path", None) or getattr(result, "quarantine", None)
    patient, info = patient_from_file(path)
    sop_uid = getattr(result, "sop_instance_uid", "") or info.get("sop_instance", "") or sop_instance_uid
    study = getattr(result, "study_instance_uid", "") or info.get("study", "")
    series = info.get("series", "")
    sop_class = sop_class_uid or info.get("sop_class", "")
    ok = status == 0 or (status & 0xF000) == 0xB000
    replaced = bool(getattr(result, "replaced", False))
    duplicate = bool(getattr(result, "duplicate", False))
    quarantined = getattr(result, "quarantine", None) is not None
    if ok:
        name = "instance-replaced" if replaced else "instance-stored"
    else:
        name = "instance-quarantined" if quarantined else "instance-refused"
    host = peer.rsplit(":", 1)[0] if peer.count(":") == 1 else peer
    desc = "" if ok and not duplicate else (
        f"status 0x{status:04X}: {getattr(result, 'reason', '')}"[:500] if not ok else "duplicate with identical bytes")
    objects = []
    if study:
        details = [("SOPInstanceUID", sop_uid)] if sop_uid else []
        if series:
            details.append(("SeriesInstanceUID", series))
        details.append(("DICOMStatus", f"0x{status:04X}"))
        objects.append(_study_object(study, [(sop_class, sop_uid)] if sop_class and sop_uid else [],
                                     accession=info.get("accession", ""), details=details, life_cycle=2))
    objects += _patient_object(patient)
    msg = _message(INSTANCES_TRANSFERRED, "U" if replaced else "C", SUCCESS if ok else MINOR_FAILURE,
                   [ActiveParticipant(user_id=calling_ae or "-", is_requestor=True, roles=(ROLE_SOURCE,),
                                      network_access_point=host),
                    _app(roles=(ROLE_DESTINATION,), ae_title=called_ae)],
                   description=desc, objects=objects)
    return _ev(name, msg, study=study, patient=patient, sop_instance_uid=sop_uid, series_instance_uid=series,
               status=f"0x{status:04X}", calling_ae=calling_ae, peer=peer, duplicate=duplicate or None,
               quarantine=Path(str(getattr(result, "quarantine"))).name if quarantined else None)


# ------------------------------------------------------------------ analysis and results
@_safe
def study_analysed(study_uid: str, clips: Sequence[tuple[str, str]], *, model: str, weights_sha256: str,
                   patient: Optional[PatientRef] = None, clip_path: Optional[str] = None,
                   ok: bool = True, error: str = "") -> Event:
    """The model read these clips ((sop_class, sop_instance) pairs) of a study."""
    if patient is None and clip_path:
        patient, _ = patient_from_file(clip_path)
    obj = _study_object(study_uid, clips, details=[("model", model), ("weights-sha256", weights_sha256)],
                        life_cycle=6)
    msg = _message(INSTANCES_ACCESSED, "R", SUCCESS if ok else SERIOUS_FAILURE, [_app(requestor=True)],
                   description=error, objects=[obj, *_patient_object(patient)])
    return _ev("study-analysed", msg, study=study_uid, patient=patient, model=model, weights_sha256=weights_sha256,
               clips=len(clips), error=error)


@_safe
def result_created(study_uid: str, objects: Sequence[tuple[str, str]], *, paths: Sequence[str] = (),
                   model: str = "", weights_sha256: str = "", patient: Optional[PatientRef] = None) -> Event:
    """Result objects ((sop_class, sop_instance) pairs) written into a study."""
    if patient is None and paths:
        patient, _ = patient_from_file(paths[0])
    details = [(k, v) for k, v in (("model", model), ("weights-sha256", weights_sha256)) if v]
    msg = _message(INSTANCES_ACCESSED, "C", SUCCESS, [_app(requestor=True)],
                   objects=[_study_object(study_uid, objects, details=details, life_cycle=1),
                            *_patient_object(patient)])
    return _ev("result-created", msg, study=study_uid, patient=patient, objects=len(objects),
               sop_instance_uids=[u for _, u in objects][:50], model=model)


@_safe
def analysis(interp: Any, objects: Sequence[Any], sources: Sequence[Any] = ()) -> list[Event]:
    """Study analysed + result created, from an Interpretation, the written result objects
    (anything with sop_class_uid / sop_instance_uid / path) and the source Datasets."""
    patient = patient_of(sources[0]) if sources else None
    m = interp.model
    clips = [(c.sop_class_uid, c.sop_instance_uid) for c in interp.clips]
    analysed = study_analysed(interp.study_instance_uid, clips, model=m.name, weights_sha256=m.weights_sha256,
                              patient=patient)
    created = result_created(interp.study_instance_uid, [(o.sop_class_uid, o.sop_instance_uid) for o in objects],
                             model=m.name, weights_sha256=m.weights_sha256, patient=patient)
    return [e for e in (analysed, created) if e is not None]


@_safe
def result_sent(row: Any, destination: Any = None, *, state: str, status: Optional[int] = None,
                commitment: str = "", error: str = "") -> Event:
    """An outbox row reached a final state: ``state`` is "delivered" or "dead".

    ``row`` has sop_instance_uid, sop_class_uid, study_instance_uid, destination, path;
    ``destination`` (a config Destination, optional) gives the AE title and address."""
    if row is None:
        return None
    patient, _ = patient_from_file(getattr(row, "path", None))
    dest_name = getattr(row, "destination", "") or ""
    if destination is None:
        destination = next((d for d in _context.destinations if getattr(d, "name", None) == dest_name), None)
    dest_ae = getattr(destination, "ae_title", "") or dest_name
    dest_host = getattr(destination, "host", "") or ""
    delivered = state == "delivered"
    status_txt = "" if status is None else f"0x{int(status):04X}"
    desc = "" if delivered and not commitment else "; ".join(
        x for x in (f"destination {dest_name}", f"status {status_txt}" if status_txt else "",
                    f"storage commitment {commitment}" if commitment else "", error[:300]) if x)
    study = getattr(row, "study_instance_uid", "")
    details = [("destination", dest_name)]
    if status_txt:
        details.append(("DICOMStatus", status_txt))
    if commitment:
        details.append(("StorageCommitment", commitment))
    msg = _message(INSTANCES_TRANSFERRED, "R", SUCCESS if delivered else SERIOUS_FAILURE,
                   [_app(requestor=True, roles=(ROLE_SOURCE,)),
                    ActiveParticipant(user_id=dest_ae, is_requestor=False, roles=(ROLE_DESTINATION,),
                                      alternative_user_id=dest_name if dest_name != dest_ae else "",
                                      network_access_point=dest_host)],
                   description=desc,
                   objects=[_study_object(study, [(row.sop_class_uid, row.sop_instance_uid)], details=details,
                                          life_cycle=10),
                            *_patient_object(patient)])
    return _ev("result-delivered" if delivered else "result-dead-lettered", msg, study=study, patient=patient,
               destination=dest_name, sop_instance_uid=row.sop_instance_uid, status=status_txt,
               commitment=commitment, error=error[:200] if error else "")


# ------------------------------------------------------------------ exports and administration
@_safe
def export(kind: str, target: str, studies: Iterable[tuple[str, Optional[PatientRef]]], *, count: int = 0,
           deidentified: bool = False, detail: str = "") -> Event:
    """Data leaving the node (a training manifest, an audit export, ...).

    ``studies``: (study UID, patient or None) pairs; ``target``: where it went (path or URI)."""
    objs: list[ParticipantObject] = []
    seen_patients: set = set()
    n = 0
    for study_uid, patient in studies:
        n += 1
        objs.append(_study_object(study_uid, life_cycle=10))
        if patient is not None and patient.object_id not in seen_patients:
            seen_patients.add(patient.object_id)
            objs += _patient_object(patient)
    media = ActiveParticipant(user_id=target or "-", is_requestor=False, roles=(ROLE_DESTINATION_MEDIA,))
    objs.append(ParticipantObject(object_id=kind, id_type=ID_REPORT_NAME, name=kind, type_code=2, role=3,
                                  details=tuple((k, v) for k, v in (("count", str(count or n)),
                                                                    ("deidentified", str(bool(deidentified)).lower()),
                                                                    ("detail", detail)) if v)))
    msg = _message(EXPORT, "R", SUCCESS, [_user(), _app(roles=(ROLE_SOURCE,)), media], objects=objs)
    return _ev("export", msg, kind=kind, target=target, studies=n, count=count or n, deidentified=deidentified)


@_safe
def model_installed(name: str, target: str, sha256: str, *, previous_sha256: str = "", source: str = "",
                    changed: bool = False) -> Event:
    obj = ParticipantObject(object_id=Path(target).resolve().as_uri() if target else name, id_type=ID_URI,
                            name=name, type_code=2, role=4, life_cycle=2 if not previous_sha256 else 3,
                            details=tuple((k, v) for k, v in (("weights-sha256", sha256),
                                                              ("previous-sha256", previous_sha256),
                                                              ("source", source)) if v))
    changed = changed or bool(previous_sha256)
    msg = _message(SECURITY_ALERT, "U" if changed else "C", SUCCESS, [_user(), _app()],
                   types=[SOFTWARE_CONFIGURATION], objects=[obj])
    return _ev("model-changed" if changed else "model-installed", msg, model=name, sha256=sha256,
               previous_sha256=previous_sha256)


@_safe
def outbox_admin(action: str, *, count: int, ids: Sequence[int] = (), states: Sequence[str] = (),
                 detail: str = "") -> Event:
    obj = ParticipantObject(object_id="outbox", id_type=ID_URI, name="outbox", type_code=2, role=22,
                            details=tuple((k, v) for k, v in (("action", action), ("rows", str(count)),
                                                              ("ids", ",".join(map(str, ids))[:500]),
                                                              ("states", ",".join(states)), ("detail", detail)) if v))
    msg = _message(SECURITY_ALERT, "U" if action == "retry" else "D", SUCCESS, [_user(), _app()],
                   types=[USE_OF_RESTRICTED_FUNCTION], description=f"outbox {action}: {count} row(s)",
                   objects=[obj])
    return _ev(f"outbox-{action}", msg, rows=count, ids=list(ids)[:50], states=list(states), detail=detail)


@_safe
def audit_log_used(action: str, *, count: int, query: str = "", target: str = "") -> Event:
    """Someone read (``R``: list, export) or deleted (``D``: retention) audit records."""
    obj = ParticipantObject(object_id="echonode-audit-log", id_type=ID_URI, name="audit_events", type_code=2,
                            role=13, details=tuple((k, v) for k, v in (("records", str(count)), ("query", query),
                                                                      ("target", target)) if v))
    msg = _message(AUDIT_LOG_USED, action, SUCCESS, [_user(), _app()], objects=[obj])
    return _ev("audit-log-read" if action == "R" else "audit-retention", msg, records=count, query=query,
               target=target)


@_safe
def repository_failing(url: str, error: str) -> Event:
    msg = _message(SECURITY_ALERT, "E", SERIOUS_FAILURE, [_app(requestor=True)], types=[AUDIT_RECORDING_STOPPED],
                   description=f"audit repository {url} unreachable ({error}); messages are kept and sent later",
                   objects=[ParticipantObject(object_id=url, id_type=ID_URI, name="audit repository", type_code=2,
                                              role=13)])
    return _ev("audit-repository-failing", msg, url=url, error=error)


@_safe
def repository_restored(url: str, pending: int) -> Event:
    msg = _message(SECURITY_ALERT, "E", SUCCESS, [_app(requestor=True)], types=[AUDIT_RECORDING_STARTED],
                   description=f"audit repository {url} reachable again; {pending} waiting message(s) sent",
                   objects=[ParticipantObject(object_id=url, id_type=ID_URI, name="audit repository", type_code=2,
                                              role=13)])
    return _ev("audit-repository-restored", msg, url=url, pending=pending)


__all__ = [
    "AuditContext", "Event", "PatientRef", "configure", "context", "os_user", "patient_from_file", "patient_of",
    "application_start", "application_stop", "configuration_loaded", "config_sha256", "association",
    "association_closed", "node_authentication_failed", "tls_subject", "instance_received", "study_analysed", "result_created",
    "analysis", "result_sent", "export", "model_installed", "outbox_admin", "audit_log_used",
    "repository_failing", "repository_restored", "MAJOR_FAILURE", "MINOR_FAILURE", "SERIOUS_FAILURE", "SUCCESS",
]
