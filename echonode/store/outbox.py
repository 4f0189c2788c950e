"""The outbox: every result object to send is a row before anything is sent.

One row per (SOP Instance UID, destination). States::

    pending ──claim──▶ sending ──C-STORE ok──▶ delivered            (no storage commitment)
       ▲                  │          └──────▶ committing ──N-EVENT-REPORT ok──▶ delivered
       │                  │                      │  └── failure / timeout ──┐
       └── backoff ◀──────┴── failure ◀──────────┴──────────────────────────┘
                          └── attempts >= max_attempts ──▶ dead   (``echonode outbox retry``)

* ``sending`` carries a lease (``lease_until``): a worker that dies mid-send leaves a
  row that another worker re-claims once the lease has expired.
* Enqueuing the same SOP Instance UID again for the same destination (a re-run with
  deterministic UIDs) resets the row to ``pending`` with the new file; it never adds
  a second row, so the PACS receives the same instance again, never a duplicate.
* ``last_status`` keeps the last DICOM status a destination answered (failure or
  warning, e.g. 0xB000), ``last_error`` a short reason without PHI.

Schema revision ``0002_outbox`` creates exactly this table; change both together.
This module is the only one that writes outbox SQL.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

from sqlalchemy import DateTime, Integer, String, Text, UniqueConstraint, and_, delete, func, or_, select, update
from sqlalchemy.orm import Mapped, Session, mapped_column

from echonode import audit
from echonode.store.base import Base
from echonode.store.models import utcnow  # one clock for every table (naive UTC)

PENDING = "pending"
SENDING = "sending"
COMMITTING = "committing"
DELIVERED = "delivered"
DEAD = "dead"
STATES = (PENDING, SENDING, COMMITTING, DELIVERED, DEAD)

__all__ = [
    "OutboxRow", "OutboxObject", "PENDING", "SENDING", "COMMITTING", "DELIVERED", "DEAD", "STATES",
    "add", "claim_due", "mark_delivered", "mark_failed", "mark_committing", "apply_commitment",
    "expire_commitments", "list_rows", "counts", "retry", "purge", "backoff_delay", "utcnow", "backlog", "Backlog",
]


class OutboxRow(Base):
    __tablename__ = "outbox"
    __table_args__ = (UniqueConstraint("sop_instance_uid", "destination", name="uq_outbox_sop_instance_uid"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), nullable=False)
    sop_class_uid: Mapped[str] = mapped_column(String(64), nullable=False)
    study_instance_uid: Mapped[str] = mapped_column(String(64), nullable=False, index=True)
    destination: Mapped[str] = mapped_column(String(64), nullable=False)
    path: Mapped[str] = mapped_column(Text, nullable=False)
    kind: Mapped[str] = mapped_column(String(16), nullable=False, default="")   # "sr", "sc", ...
    state: Mapped[str] = mapped_column(String(16), nullable=False, default=PENDING, index=True)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=utcnow, index=True)
    lease_until: Mapped[Optional[dt.datetime]] = mapped_column(DateTime)
    last_status: Mapped[Optional[int]] = mapped_column(Integer)
    last_error: Mapped[str] = mapped_column(Text, nullable=False, default="")
    transaction_uid: Mapped[Optional[str]] = mapped_column(String(64), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=utcnow)
    sent_at: Mapped[Optional[dt.datetime]] = mapped_column(DateTime)
    # revision 0007_result_versions: first failure since the row was last made due
    failing_since: Mapped[Optional[dt.datetime]] = mapped_column(DateTime)
    delivered_at: Mapped[Optional[dt.datetime]] = mapped_column(DateTime)

    def as_dict(self) -> dict:
        def iso(x):
            return None if x is None else x.isoformat(timespec="seconds") + "Z"
        return {
            "id": self.id, "sop_instance_uid": self.sop_instance_uid, "sop_class_uid": self.sop_class_uid,
            "study_instance_uid": self.study_instance_uid, "destination": self.destination, "kind": self.kind,
            "state": self.state, "attempts": self.attempts, "next_attempt_at": iso(self.next_attempt_at),
            "last_status": None if self.last_status is None else f"0x{self.last_status:04X}",
            "last_error": self.last_error, "transaction_uid": self.transaction_uid,
            "created_at": iso(self.created_at), "sent_at": iso(self.sent_at),
            "delivered_at": iso(self.delivered_at), "path": self.path,
        }


@dataclass(frozen=True)
class OutboxObject:
    """A result file to send (already written and validated)."""

    path: str
    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    kind: str = ""


def backoff_delay(attempts: int, initial_s: float, max_s: float) -> float:
    """Exponential backoff after ``attempts`` failed attempts: initial * 2**(attempts-1), capped."""
    if attempts <= 0:
        return 0.0
    return float(min(max_s, initial_s * (2 ** min(attempts - 1, 30))))


def add(session: Session, objects: Iterable[OutboxObject], destinations: Sequence[str],
        now: Optional[dt.datetime] = None) -> list[int]:
    """Rows for every (object, destination); existing rows are reset to pending. Commits."""
    now = now or utcnow()
    ids = []
    objects = list(objects)
    for dest in destinations:
        for obj in objects:
            row = session.execute(select(OutboxRow).where(
                OutboxRow.sop_instance_uid == obj.sop_instance_uid,
                OutboxRow.destination == dest)).scalar_one_or_none()
            if row is None:
                row = OutboxRow(sop_instance_uid=obj.sop_instance_uid, sop_class_uid=obj.sop_class_uid,
                                study_instance_uid=obj.study_instance_uid, destination=dest, path=obj.path,
                                kind=obj.kind, state=PENDING, attempts=0, next_attempt_at=now,
                                created_at=now, updated_at=now, last_error="")
                session.add(row)
            else:
                row.path = obj.path
                row.sop_class_uid = obj.sop_class_uid
                row.kind = obj.kind
                row.state = PENDING
                row.attempts = 0
                row.next_attempt_at = now
                row.lease_until = None
                row.transaction_uid = None
                row.last_error = ""
                row.failing_since = None
                row.updated_at = now
            session.flush()
            ids.append(row.id)
    session.commit()
    return ids


def claim_due(session: Session, now: Optional[dt.datetime] = None, limit: int = 500,
              lease_s: float = 600.0) -> list[OutboxRow]:
    """Claim rows that are due (pending and past their backoff, or sending with an expired
    lease) by moving them to ``sending`` with a lease. Safe with several workers: a row
    is claimed only if its state did not change in between. Commits."""
    now = now or utcnow()
    due = or_(
        (OutboxRow.state == PENDING) & (OutboxRow.next_attempt_at <= now),
        (OutboxRow.state == SENDING) & (OutboxRow.lease_until < now),
    )
    candidates = session.execute(
        select(OutboxRow.id, OutboxRow.state, OutboxRow.lease_until).where(due)
        .order_by(OutboxRow.id).limit(limit)).all()
    lease = now + dt.timedelta(seconds=lease_s)
    claimed = []
    for row_id, state, old_lease in candidates:
        # the lease is part of the check: an expired 'sending' row claimed by another worker
        # in between is still 'sending' (PostgreSQL re-checks only the WHERE clause)
        same_lease = OutboxRow.lease_until.is_(None) if old_lease is None else OutboxRow.lease_until == old_lease
        res = session.execute(update(OutboxRow).where(OutboxRow.id == row_id, OutboxRow.state == state, same_lease)
                              .values(state=SENDING, lease_until=lease, updated_at=now))
        if res.rowcount == 1:
            claimed.append(row_id)
    session.commit()
    if not claimed:
        return []
    return list(session.execute(select(OutboxRow).where(OutboxRow.id.in_(claimed))
                                .order_by(OutboxRow.id)).scalars())


def mark_delivered(session: Session, row_id: int, status: Optional[int] = 0,
                   now: Optional[dt.datetime] = None, note: str = "") -> None:
    now = now or utcnow()
    session.execute(update(OutboxRow).where(OutboxRow.id == row_id).values(
        state=DELIVERED, last_status=status, last_error=note, lease_until=None,
        attempts=OutboxRow.attempts + 1, sent_at=now, delivered_at=now, updated_at=now))
    audit.record(session, audit.result_sent(session.get(OutboxRow, row_id), state=DELIVERED, status=status,
                                            error=note, session=session))
    session.commit()


def mark_committing(session: Session, row_ids: Sequence[int], transaction_uid: str, status: Optional[int] = 0,
                    now: Optional[dt.datetime] = None, note: str = "") -> None:
    """C-STORE succeeded and an N-ACTION asked for commitment: wait for the report."""
    now = now or utcnow()
    if not row_ids:
        return
    session.execute(update(OutboxRow).where(OutboxRow.id.in_(list(row_ids))).values(
        state=COMMITTING, transaction_uid=transaction_uid, last_status=status, last_error=note,
        lease_until=None, attempts=OutboxRow.attempts + 1, sent_at=now, updated_at=now))
    session.commit()


def mark_failed(session: Session, row_id: int, error: str, status: Optional[int] = None, *,
                max_attempts: int, backoff_initial_s: float, backoff_max_s: float,
                now: Optional[dt.datetime] = None, count_attempt: bool = True, retry_for_s: float = 0.0) -> str:
    """Record a failed attempt; back to ``pending`` with backoff, or ``dead``. Returns the new state.

    A row is given up (``dead``) once it has been failing for ``retry_for_s`` seconds
    (time bound: a day-long PACS outage is outlived whatever the backoff), or after
    ``max_attempts`` attempts; a bound of 0 is no bound."""
    now = now or utcnow()
    row = session.get(OutboxRow, row_id)
    if row is None:
        return ""
    if count_attempt:
        row.attempts += 1
    row.last_status = status
    row.last_error = error[:1000]
    row.lease_until = None
    row.transaction_uid = None
    row.updated_at = now
    if row.failing_since is None:
        row.failing_since = now
    by_count = max_attempts > 0 and row.attempts >= max_attempts
    by_time = retry_for_s > 0 and (now - row.failing_since).total_seconds() >= retry_for_s
    if by_count or by_time:
        row.state = DEAD
        audit.record(session, audit.result_sent(
            row, state=DEAD, status=status, error=row.last_error, session=session,
            commitment="failed" if "commitment" in row.last_error else ""))
    else:
        row.state = PENDING
        row.next_attempt_at = now + dt.timedelta(seconds=backoff_delay(row.attempts, backoff_initial_s,
                                                                        backoff_max_s))
    session.commit()
    return row.state


def apply_commitment(session: Session, transaction_uid: str, committed: Sequence[str],
                     failed: Sequence[tuple[str, int]], *, max_attempts: int, backoff_initial_s: float,
                     backoff_max_s: float, now: Optional[dt.datetime] = None,
                     retry_for_s: float = 0.0) -> tuple[int, int]:
    """An N-EVENT-REPORT arrived: committed SOP Instance UIDs become ``delivered``; failed
    ones (uid, failure reason) go back to pending (or dead). Returns (delivered, failed)."""
    now = now or utcnow()
    rows = list(session.execute(select(OutboxRow).where(OutboxRow.transaction_uid == transaction_uid,
                                                        OutboxRow.state == COMMITTING)).scalars())
    by_uid = {r.sop_instance_uid: r for r in rows}
    n_ok = n_bad = 0
    for uid in committed:
        r = by_uid.get(uid)
        if r is not None:
            r.state = DELIVERED
            r.delivered_at = now
            r.updated_at = now
            r.last_error = ""
            n_ok += 1
            audit.record(session, audit.result_sent(r, state=DELIVERED, status=r.last_status,
                                                    commitment="committed", session=session))
    session.commit()
    for uid, reason in failed:
        r = by_uid.get(uid)
        if r is not None:
            mark_failed(session, r.id, f"storage commitment failed (reason 0x{reason:04X})", reason,
                        max_attempts=max_attempts, backoff_initial_s=backoff_initial_s,
                        backoff_max_s=backoff_max_s, now=now, count_attempt=False, retry_for_s=retry_for_s)
            n_bad += 1
    return n_ok, n_bad


def expire_commitments(session: Session, timeout_s: float, *, max_attempts: int, backoff_initial_s: float,
                       backoff_max_s: float, now: Optional[dt.datetime] = None, retry_for_s: float = 0.0) -> int:
    """Rows waiting for a commitment report longer than ``timeout_s`` are sent again."""
    now = now or utcnow()
    limit = now - dt.timedelta(seconds=timeout_s)
    rows = list(session.execute(select(OutboxRow.id).where(OutboxRow.state == COMMITTING,
                                                           OutboxRow.sent_at < limit)).scalars())
    for row_id in rows:
        mark_failed(session, row_id, f"no storage commitment report within {timeout_s:g} s", None,
                    max_attempts=max_attempts, backoff_initial_s=backoff_initial_s,
                    backoff_max_s=backoff_max_s, now=now, count_attempt=False, retry_for_s=retry_for_s)
    return len(rows)


def list_rows(session: Session, states: Optional[Sequence[str]] = None, study_uid: Optional[str] = None,
              limit: int = 200) -> list[OutboxRow]:
    q = select(OutboxRow)
    if states:
        q = q.where(OutboxRow.state.in_(list(states)))
    if study_uid:
        q = q.where(OutboxRow.study_instance_uid == study_uid)
    return list(session.execute(q.order_by(OutboxRow.id.desc()).limit(limit)).scalars())


def counts(session: Session) -> dict[str, int]:
    from sqlalchemy import func
    out = {s: 0 for s in STATES}
    for state, n in session.execute(select(OutboxRow.state, func.count()).group_by(OutboxRow.state)):
        out[state] = n
    return out


def retry(session: Session, ids: Optional[Sequence[int]] = None, states: Sequence[str] = (DEAD,),
          now: Optional[dt.datetime] = None) -> int:
    """Make rows due now with a fresh attempt budget (default: all dead rows). Commits."""
    now = now or utcnow()
    q = update(OutboxRow).where(OutboxRow.state.in_(list(states)))
    if ids:
        q = q.where(OutboxRow.id.in_(list(ids)))
    res = session.execute(q.values(state=PENDING, attempts=0, next_attempt_at=now, lease_until=None,
                                   transaction_uid=None, failing_since=None, updated_at=now))
    audit.record(session, audit.outbox_admin("retry", count=res.rowcount or 0, ids=ids or (), states=states))
    session.commit()
    return res.rowcount or 0


def purge(session: Session, states: Sequence[str] = (DELIVERED,), older_than_s: float = 0.0,
          ids: Optional[Sequence[int]] = None, now: Optional[dt.datetime] = None) -> int:
    """Delete rows in ``states`` last updated more than ``older_than_s`` ago. Commits."""
    now = now or utcnow()
    q = delete(OutboxRow).where(OutboxRow.state.in_(list(states)),
                                OutboxRow.updated_at <= now - dt.timedelta(seconds=older_than_s))
    if ids:
        q = q.where(OutboxRow.id.in_(list(ids)))
    res = session.execute(q)
    audit.record(session, audit.outbox_admin("purge", count=res.rowcount or 0, ids=ids or (), states=states, detail=f"older than {older_than_s:g} s"))
    session.commit()
    return res.rowcount or 0


def due_count(session: Session) -> int:
    """Outbox rows a delivery run would act on now (pending past backoff, expired leases,
    commitments past their time): 0 means no delivery run is needed."""
    now = utcnow()
    return int(session.execute(select(func.count()).select_from(OutboxRow).where(or_(
        and_(OutboxRow.state == PENDING, OutboxRow.next_attempt_at <= now),
        and_(OutboxRow.state == SENDING, OutboxRow.lease_until < now),
        OutboxRow.state == COMMITTING,
    ))).scalar() or 0)


@dataclass(frozen=True)
class Backlog:
    """What an operator must know about the outbox: dead rows and the oldest undelivered one."""

    dead: int
    undelivered: int
    oldest_undelivered_s: Optional[float]    # age of the oldest row not delivered (nor dead)


def backlog(session: Session, now: Optional[dt.datetime] = None) -> Backlog:
    now = now or utcnow()
    dead = int(session.execute(select(func.count()).select_from(OutboxRow)
                               .where(OutboxRow.state == DEAD)).scalar() or 0)
    n, oldest = session.execute(select(func.count(), func.min(OutboxRow.created_at)).where(
        OutboxRow.state.in_((PENDING, SENDING, COMMITTING)))).one()
    age = None if oldest is None else max(0.0, (now - oldest).total_seconds())
    return Backlog(dead=dead, undelivered=int(n or 0), oldest_undelivered_s=age)
