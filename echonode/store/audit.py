"""The audit trail in SQL: append-only events and the record of what reached the repository.

* ``audit_events``: one row per audit event, written once and never changed. It holds the
  PS3.15 A.5 XML message exactly as sent (patient identifiers included, by design) and
  PHI-free index columns (event name, DICOM EventID, outcome, study UID, patient key)
  plus a PHI-free JSON summary. A database trigger refuses UPDATE; the only DELETE is
  :func:`retention`, which the ``echonode audit retention`` command audits itself.
* ``audit_sent``: the id of every event the syslog sender delivered, with the time. A
  separate table so that marking an event sent never touches the audit row.

Revision ``0005_audit`` creates both tables and the trigger; change them together.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Optional, Sequence

from sqlalchemy import DateTime, ForeignKey, Integer, String, Text, delete, exists, select
from sqlalchemy import insert as insert_stmt
from sqlalchemy.orm import Mapped, Session, mapped_column

from echonode.store.base import Base
from echonode.store.group import group_commit
from echonode.store.models import utcnow


class AuditEventRow(Base):
    __tablename__ = "audit_events"
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    occurred_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, index=True)
    recorded_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=utcnow)
    event: Mapped[str] = mapped_column(String(40), nullable=False, index=True)
    event_id: Mapped[str] = mapped_column(String(16), nullable=False)
    action: Mapped[str] = mapped_column(String(1), nullable=False)
    outcome: Mapped[int] = mapped_column(Integer, nullable=False)
    study_instance_uid: Mapped[Optional[str]] = mapped_column(String(64), index=True)
    patient_key: Mapped[Optional[str]] = mapped_column(String(64), index=True)
    summary: Mapped[str] = mapped_column(Text, nullable=False, default="{}")
    message: Mapped[str] = mapped_column(Text, nullable=False)

    def as_dict(self, *, with_message: bool = False) -> dict:
        d = {"id": self.id, "occurred_at": self.occurred_at.isoformat(timespec="microseconds") + "Z",
             "event": self.event, "event_id": self.event_id, "action": self.action, "outcome": self.outcome,
             "study_instance_uid": self.study_instance_uid or "", "patient_key": self.patient_key or "",
             "summary": json.loads(self.summary or "{}")}
        if with_message:
            d["message"] = self.message
        return d


class AuditSentRow(Base):
    __tablename__ = "audit_sent"

    event_pk: Mapped[int] = mapped_column(ForeignKey("audit_events.id", ondelete="CASCADE"), primary_key=True)
    sent_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=utcnow)


def _values(*, occurred_at: dt.datetime, event: str, event_id: str, action: str, outcome: int, message: str,
            study_uid: str = "", patient_key: str = "", summary: Optional[dict] = None) -> dict:
    return dict(occurred_at=occurred_at, recorded_at=utcnow(), event=event[:40], event_id=event_id,
                action=action, outcome=int(outcome), study_instance_uid=(study_uid or None),
                patient_key=(patient_key or None),
                summary=json.dumps(summary or {}, sort_keys=True, default=str), message=message)


def insert(session: Session, **fields) -> AuditEventRow:
    """Add one event to ``session`` (the caller commits, so it can share a transaction).
    ``fields``: occurred_at, event, event_id, action, outcome, message, and optionally
    study_uid, patient_key, summary."""
    row = AuditEventRow(**_values(**fields))
    session.add(row)
    return row


_ADD_EVENT = insert_stmt(AuditEventRow.__table__)


class _EventJob:
    """One event committed on its own or in a group commit (``echonode.store.group``)."""

    final_error = None

    def __init__(self, sessions, values: dict):
        self.sessions, self.values = sessions, values

    def statements(self, session):
        return session.connection().execute(_ADD_EVENT, self.values).inserted_primary_key[0], None

    def alone(self) -> int:
        with self.sessions() as session, session.begin():
            return self.statements(session)[0]


def record(sessions, **fields) -> int:
    """Insert one event and commit it; returns its id. Events written at the same moment by
    several threads (one per association) share one COMMIT with each other and with the
    instances being indexed (``echonode.store.group``). ``fields`` as for :func:`insert`."""
    return group_commit(sessions).run(_EventJob(sessions, _values(**fields)))


def pending(session: Session, limit: int = 200, after_id: int = 0) -> list[tuple[int, str, dt.datetime]]:
    """(id, message, occurred_at) of events not yet sent, oldest first."""
    sent = exists().where(AuditSentRow.event_pk == AuditEventRow.id)
    q = (select(AuditEventRow.id, AuditEventRow.message, AuditEventRow.occurred_at)
         .where(~sent, AuditEventRow.id > after_id).order_by(AuditEventRow.id).limit(limit))
    return [tuple(r) for r in session.execute(q).all()]


def pending_count(session: Session) -> int:
    from sqlalchemy import func
    sent = exists().where(AuditSentRow.event_pk == AuditEventRow.id)
    return int(session.execute(select(func.count()).select_from(AuditEventRow).where(~sent)).scalar_one())


def mark_sent(session: Session, ids: Sequence[int], now: Optional[dt.datetime] = None) -> None:
    now = now or utcnow()
    for i in ids:
        session.add(AuditSentRow(event_pk=int(i), sent_at=now))
    session.commit()


def query(session: Session, *, since: Optional[dt.datetime] = None, until: Optional[dt.datetime] = None,
          study_uid: str = "", patient_key: str = "", events: Sequence[str] = (), limit: int = 1000,
          ) -> list[AuditEventRow]:
    q = select(AuditEventRow)
    if since is not None:
        q = q.where(AuditEventRow.occurred_at >= since)
    if until is not None:
        q = q.where(AuditEventRow.occurred_at < until)
    if study_uid:
        q = q.where(AuditEventRow.study_instance_uid == study_uid)
    if patient_key:
        q = q.where(AuditEventRow.patient_key == patient_key)
    if events:
        names = [e for e in events if not e.isdigit()]
        codes = [e for e in events if e.isdigit()]
        cond = None
        if names:
            cond = AuditEventRow.event.in_(names)
        if codes:
            c2 = AuditEventRow.event_id.in_(codes)
            cond = c2 if cond is None else (cond | c2)
        q = q.where(cond)
    return list(session.execute(q.order_by(AuditEventRow.id).limit(limit)).scalars())


def sent_ids(session: Session) -> set[int]:
    return set(session.execute(select(AuditSentRow.event_pk)).scalars())


def retention(session: Session, older_than: dt.datetime, *, include_unsent: bool = False) -> int:
    """Delete events that occurred before ``older_than`` (only those already sent to the
    repository, unless ``include_unsent``). The one path that deletes audit rows; the
    caller audits it. Commits; returns the number of events deleted."""
    q = select(AuditEventRow.id).where(AuditEventRow.occurred_at < older_than)
    if not include_unsent:
        q = q.where(exists().where(AuditSentRow.event_pk == AuditEventRow.id))
    ids = list(session.execute(q).scalars())
    for i in range(0, len(ids), 500):
        chunk = ids[i:i + 500]
        session.execute(delete(AuditSentRow).where(AuditSentRow.event_pk.in_(chunk)))
        session.execute(delete(AuditEventRow).where(AuditEventRow.id.in_(chunk)))
    session.commit()
    return len(ids)
