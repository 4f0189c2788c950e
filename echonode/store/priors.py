"""The priors ledger: which earlier studies from the PACS were fetched and embedded.

Schema revision ``0006_priors`` (``store/migrations/versions/0006_priors.py``) creates
exactly this table; change both together.

One row per (prior Study Instance UID, EchoCLIP-R weights sha256): a prior is fetched
once per weights checksum. States:

* ``fetching``  claimed by a process (``owner``) until ``lease_until``; a process that
  died (kill -9) leaves the row, and after the lease another one may claim it again;
* ``embedded``  its study embedding is in ``study_embeddings`` (written in the same
  transaction as this state, so a study is embedded exactly once);
* ``no_clips``  the study has no A4C clip (nothing to embed; not asked again);
* ``failed``    the last attempt failed (``error``, no PHI); tried again on a later call.

No patient identifier is stored: ``patient_key`` is the same sha256 as in
``study_embeddings``.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Optional

from sqlalchemy import DateTime, Integer, String, Text, UniqueConstraint, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column

from echonode.store.base import Base
from echonode.store.models import utcnow

FETCHING = "fetching"
EMBEDDED = "embedded"
NO_CLIPS = "no_clips"
FAILED = "failed"
STATES = (FETCHING, EMBEDDED, NO_CLIPS, FAILED)
FINAL = (EMBEDDED, NO_CLIPS)


class PriorStudy(Base):
    __tablename__ = "prior_studies"
    __table_args__ = (UniqueConstraint("study_instance_uid", "model_sha256", name="uq_prior_studies_study_model"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), nullable=False)
    model_sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    patient_key: Mapped[str] = mapped_column(String(64), nullable=False, index=True)
    study_date: Mapped[str] = mapped_column(String(8), nullable=False, default="")
    source: Mapped[str] = mapped_column(String(64), nullable=False, default="")
    state: Mapped[str] = mapped_column(String(16), nullable=False, index=True)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    clips: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    owner: Mapped[Optional[str]] = mapped_column(String(128))
    lease_until: Mapped[Optional[dt.datetime]] = mapped_column(DateTime)
    error: Mapped[Optional[str]] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=utcnow)


@dataclass(frozen=True)
class LedgerEntry:
    study_instance_uid: str
    model_sha256: str
    study_date: str
    source: str
    state: str
    attempts: int
    clips: int
    error: str


def _entry(r: PriorStudy) -> LedgerEntry:
    return LedgerEntry(r.study_instance_uid, r.model_sha256, r.study_date, r.source, r.state, r.attempts,
                       r.clips, r.error or "")


def get(session: Session, study_uid: str, model_sha256: str) -> Optional[LedgerEntry]:
    r = session.execute(select(PriorStudy).where(PriorStudy.study_instance_uid == study_uid,
                                                 PriorStudy.model_sha256 == model_sha256)).scalar_one_or_none()
    return None if r is None else _entry(r)


def claim(session: Session, study_uid: str, model_sha256: str, *, patient_key: str, study_date: str,
          source: str, owner: str, lease_s: float) -> bool:
    """Take the prior for fetching. False when it is done (embedded / no clips) or
    another live process holds it. Commits (the claim must be visible to other processes)."""
    now = utcnow()
    until = now + dt.timedelta(seconds=lease_s)
    row = PriorStudy(study_instance_uid=study_uid, model_sha256=model_sha256, patient_key=patient_key,
                     study_date=study_date or "", source=source[:64], state=FETCHING, attempts=1,
                     owner=owner[:128], lease_until=until, created_at=now, updated_at=now)
    session.add(row)
    try:
        session.commit()
        return True
    except IntegrityError:
        session.rollback()
    res = session.execute(
        update(PriorStudy).where(
            PriorStudy.study_instance_uid == study_uid, PriorStudy.model_sha256 == model_sha256,
            (PriorStudy.state == FAILED) | ((PriorStudy.state == FETCHING) & (PriorStudy.lease_until < now)))
        .values(state=FETCHING, owner=owner[:128], lease_until=until, attempts=PriorStudy.attempts + 1,
                source=source[:64], updated_at=now, error=None))
    session.commit()
    return res.rowcount == 1


def _finish(session: Session, study_uid: str, model_sha256: str, owner: str, **values) -> bool:
    res = session.execute(update(PriorStudy).where(
        PriorStudy.study_instance_uid == study_uid, PriorStudy.model_sha256 == model_sha256,
        PriorStudy.state == FETCHING, PriorStudy.owner == owner[:128])
        .values(owner=None, lease_until=None, updated_at=utcnow(), **values))
    return res.rowcount == 1


def mark_embedded(session: Session, study_uid: str, model_sha256: str, owner: str, clips: int) -> bool:
    """In the caller's transaction (with ``save_study_embedding``): the claim is done."""
    return _finish(session, study_uid, model_sha256, owner, state=EMBEDDED, clips=int(clips), error=None)


def mark_no_clips(session: Session, study_uid: str, model_sha256: str, owner: str, reason: str) -> bool:
    return _finish(session, study_uid, model_sha256, owner, state=NO_CLIPS, clips=0, error=reason[:2000])


def mark_failed(session: Session, study_uid: str, model_sha256: str, owner: str, error: str) -> bool:
    return _finish(session, study_uid, model_sha256, owner, state=FAILED, error=error[:2000])


def counts(session: Session, model_sha256: Optional[str] = None) -> dict[str, int]:
    q = select(PriorStudy.state, func.count()).group_by(PriorStudy.state)
    if model_sha256:
        q = q.where(PriorStudy.model_sha256 == model_sha256)
    out = {s: 0 for s in STATES}
    for state, n in session.execute(q).all():
        out[state] = int(n)
    return out


def entries(session: Session, model_sha256: Optional[str] = None, limit: int = 10000) -> list[LedgerEntry]:
    q = select(PriorStudy).order_by(PriorStudy.id).limit(limit)
    if model_sha256:
        q = q.where(PriorStudy.model_sha256 == model_sha256)
    return [_entry(r) for r in session.execute(q).scalars()]


def fetching_owners(session: Session) -> list[str]:
    """Owners of rows in ``fetching`` (to find those of dead processes)."""
    return [o for o in session.execute(select(PriorStudy.owner).where(PriorStudy.state == FETCHING)
                                       .distinct()).scalars() if o]


def release_owners(session: Session, owners: list[str], reason: str) -> int:
    """Rows claimed by processes known to be dead: back to ``failed`` so they are claimed again."""
    if not owners:
        return 0
    res = session.execute(update(PriorStudy).where(PriorStudy.state == FETCHING, PriorStudy.owner.in_(owners))
                          .values(state=FAILED, owner=None, lease_until=None, error=reason[:2000],
                                  updated_at=utcnow()))
    session.commit()
    return res.rowcount


def instance_paths(session: Session, sop_uids: list[str]) -> dict[str, str]:
    """``{SOP Instance UID: key}``: where the node's index stored these instances, as keys in
    the node's store (``instances/<study>/<series>/<sop>.dcm``, docs/scale-out.md; read them
    through :func:`echonode.storage.open_storage`): the instances a C-MOVE brought in through
    the node's own C-STORE SCP."""
    from echonode.store.models import Instance

    if not sop_uids:
        return {}
    rows = session.execute(select(Instance.sop_instance_uid, Instance.path)
                           .where(Instance.sop_instance_uid.in_(list(sop_uids)))).all()
    return {u: p for u, p in rows}


def is_prior_study(session: Session, study_uid: str) -> bool:
    """True when the study came in as a prior (e.g. by C-MOVE through the node's own SCP):
    the stable-study scheduler / analysis should not analyse it and send results for it."""
    return session.execute(select(PriorStudy.id).where(PriorStudy.study_instance_uid == study_uid)
                           .limit(1)).first() is not None
