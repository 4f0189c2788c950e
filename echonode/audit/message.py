"""PS3.15 Annex A.5 audit messages: a small typed model and its XML form.

The model mirrors the schema of A.5.1.1 (``schema/audit-message.rnc``): one
EventIdentification, one or more ActiveParticipants, one AuditSourceIdentification and
any number of ParticipantObjectIdentifications. :func:`to_xml` writes the message on one
line (syslog transports and receivers treat a newline as a record separator).

Codes are (code, codeSystemName, originalText) triples; ``originalText`` is the DICOM
Code Meaning (PS3.15 A.5.1.1 CodedValueType).
"""

from __future__ import annotations

import base64
import datetime as dt
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Optional, Sequence

# EventOutcomeIndicator, A.5.1.1
SUCCESS = 0
MINOR_FAILURE = 4
SERIOUS_FAILURE = 8
MAJOR_FAILURE = 12


@dataclass(frozen=True)
class Code:
    code: str
    scheme: str
    meaning: str

    def attrs(self) -> dict:
        return {"csd-code": self.code, "codeSystemName": self.scheme, "originalText": self.meaning}


@dataclass(frozen=True)
class ActiveParticipant:
    user_id: str
    is_requestor: bool
    roles: tuple[Code, ...] = ()
    alternative_user_id: str = ""
    user_name: str = ""
    network_access_point: str = ""  # host name or IP address

    def attrs(self) -> dict:
        a = {"UserID": self.user_id or "-", "UserIsRequestor": "true" if self.is_requestor else "false"}
        if self.alternative_user_id:
            a["AlternativeUserID"] = self.alternative_user_id
        if self.user_name:
            a["UserName"] = self.user_name
        if self.network_access_point:
            a["NetworkAccessPointID"] = self.network_access_point
            a["NetworkAccessPointTypeCode"] = "2" if _is_ip(self.network_access_point) else "1"
        return a


@dataclass(frozen=True)
class SOPClassRef:
    """One SOPClass entry of a ParticipantObjectDescription (A.5.1.1 DICOMObjectDescriptionContents)."""

    uid: str
    instances: tuple[str, ...] = ()
    count: Optional[int] = None  # default: len(instances)


@dataclass(frozen=True)
class ParticipantObject:
    object_id: str
    id_type: Code
    name: str
    type_code: Optional[int] = None       # 1 person, 2 system object, 3 organization, 4 other
    role: Optional[int] = None            # ParticipantObjectTypeCodeRole
    life_cycle: Optional[int] = None      # ParticipantObjectDataLifeCycle
    details: tuple[tuple[str, str], ...] = ()   # (type, value) -> ParticipantObjectDetail (base64)
    sop_classes: tuple[SOPClassRef, ...] = ()
    accessions: tuple[str, ...] = ()


@dataclass(frozen=True)
class AuditMessage:
    event_id: Code
    action: str                 # C R U D E
    outcome: int
    when: dt.datetime           # aware or naive-UTC
    participants: tuple[ActiveParticipant, ...]
    source_id: str
    source_type: str = "4"      # application server process (A.5.1.2.1)
    enterprise_site_id: str = ""
    event_types: tuple[Code, ...] = ()
    outcome_description: str = ""
    objects: tuple[ParticipantObject, ...] = field(default_factory=tuple)


def _is_ip(s: str) -> bool:
    import ipaddress
    try:
        ipaddress.ip_address(s)
        return True
    except ValueError:
        return False


def _token(s: str) -> str:
    """xsd:token has no leading/trailing/double spaces, no tabs or newlines."""
    return " ".join(str(s).split())


def iso_utc(when: dt.datetime) -> str:
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return when.astimezone(dt.timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def to_element(msg: AuditMessage) -> ET.Element:
    root = ET.Element("AuditMessage")
    ev = ET.SubElement(root, "EventIdentification", {
        "EventActionCode": msg.action, "EventDateTime": iso_utc(msg.when),
        "EventOutcomeIndicator": str(int(msg.outcome))})
    ET.SubElement(ev, "EventID", msg.event_id.attrs())
    for t in msg.event_types:
        ET.SubElement(ev, "EventTypeCode", t.attrs())
    if msg.outcome_description:
        ET.SubElement(ev, "EventOutcomeDescription").text = msg.outcome_description[:1024]
    for p in msg.participants:
        el = ET.SubElement(root, "ActiveParticipant", {k: _token(v) if k == "NetworkAccessPointID" else v
                                                      for k, v in p.attrs().items()})
        for r in p.roles:
            ET.SubElement(el, "RoleIDCode", r.attrs())
    src = {"AuditSourceID": _token(msg.source_id) or "echonode"}
    if msg.enterprise_site_id:
        src["AuditEnterpriseSiteID"] = _token(msg.enterprise_site_id)
    src_el = ET.SubElement(root, "AuditSourceIdentification", src)
    ET.SubElement(src_el, "AuditSourceTypeCode", {"csd-code": msg.source_type})
    for o in msg.objects:
        a = {"ParticipantObjectID": _token(o.object_id) or "-"}
        if o.type_code is not None:
            a["ParticipantObjectTypeCode"] = str(o.type_code)
        if o.role is not None:
            a["ParticipantObjectTypeCodeRole"] = str(o.role)
        if o.life_cycle is not None:
            a["ParticipantObjectDataLifeCycle"] = str(o.life_cycle)
        el = ET.SubElement(root, "ParticipantObjectIdentification", a)
        ET.SubElement(el, "ParticipantObjectIDTypeCode", o.id_type.attrs())
        ET.SubElement(el, "ParticipantObjectName").text = _token(o.name) or "-"
        for typ, value in o.details:
            ET.SubElement(el, "ParticipantObjectDetail", {
                "type": _token(typ), "value": base64.b64encode(str(value).encode("utf-8")).decode("ascii")})
        if o.sop_classes or o.accessions:
            desc = ET.SubElement(el, "ParticipantObjectDescription")
            for acc in o.accessions:
                ET.SubElement(desc, "Accession", {"Number": _token(acc)})
            for sc in o.sop_classes:
                n = sc.count if sc.count is not None else len(sc.instances)
                sc_el = ET.SubElement(desc, "SOPClass", {"UID": _token(sc.uid), "NumberOfInstances": str(int(n))})
                for uid in sc.instances:
                    ET.SubElement(sc_el, "Instance", {"UID": _token(uid)})
    return root


def to_xml(msg: AuditMessage) -> str:
    """The message as one line of XML (no declaration; UTF-8 when encoded)."""
    return ET.tostring(to_element(msg), encoding="unicode")


def sop_classes(pairs: Sequence[tuple[str, str]]) -> tuple[SOPClassRef, ...]:
    """(sop_class_uid, sop_instance_uid) pairs grouped into SOPClass entries, order kept."""
    groups: dict[str, list[str]] = {}
    for cls, inst in pairs:
        groups.setdefault(cls or "", []).append(inst)
    return tuple(SOPClassRef(uid=c, instances=tuple(v)) for c, v in groups.items() if c)
