"""Interpretations and study embeddings (schema revision ``0003_results``).

* ``interpretations``   one row per analysis job: the Interpretation as JSON (the
  contract of ``echonode.interpretation``), the model checksum and when it was made.
* ``study_embeddings``  EchoCLIP-R study embeddings (float32 bytes) keyed by study and
  model checksum, with a *patient key* (sha256 of issuer + PatientID, so no patient
  identifier is copied into this table) and the study date: the priors of a later study
  of the same patient come from here.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
from sqlalchemy import Boolean, DateTime, ForeignKey, Integer, LargeBinary, String, Text, UniqueConstraint, and_, or_, select, text
from sqlalchemy.orm import Mapped, Session, mapped_column

from echonode.store.base import Base
from echonode.store.models import utcnow


class InterpretationRow(Base):
    __tablename__ = "interpretations"
    __table_args__ = (UniqueConstraint("job_id", name="uq_interpretations_job_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[Optional[int]] = mapped_column(ForeignKey("analysis_jobs.id"), nullable=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), nullable=False, index=True)
    model_sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    demo: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    interpretation: Mapped[str] = mapped_column(Text, nullable=False)   # Interpretation.to_json()
    # revision 0007_result_versions: which study version this result covers and its SR,
    # so the SR of a later version can reference it (Predecessor Documents Sequence)
    study_version: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)
    sr_sop_instance_uid: Mapped[Optional[str]] = mapped_column(String(64), nullable=True)
    sr_series_instance_uid: Mapped[Optional[str]] = mapped_column(String(64), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=utcnow, index=True)


class StudyEmbedding(Base):
    __tablename__ = "study_embeddings"
    __table_args__ = (UniqueConstraint("study_instance_uid", "model_sha256",
                                       name="uq_study_embeddings_study_model"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), nullable=False)
    patient_key: Mapped[str] = mapped_column(String(64), nullable=False, index=True)
    study_date: Mapped[str] = mapped_column(String(8), nullable=False, default="")
    model_sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    dim: Mapped[int] = mapped_column(Integer, nullable=False)
    vector: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)   # float32, little endian
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=utcnow)


# --------------------------------------------------------------------------- helpers

def patient_key(patient_id: Optional[str], issuer: Optional[str]) -> str:
    """A stable key for (PatientID, IssuerOfPatientID) that is not the identifier itself."""
    raw = f"{issuer or ''}\x00{patient_id or ''}".encode("utf-8")
    return hashlib.sha256(raw).hexdigest()


def _vec_to_bytes(v: np.ndarray) -> bytes:
    return np.ascontiguousarray(np.asarray(v, dtype="<f4").reshape(-1)).tobytes()


def _bytes_to_vec(b: bytes, dim: int) -> np.ndarray:
    v = np.frombuffer(b, dtype="<f4")
    if v.size != dim:
        raise ValueError(f"stored embedding has {v.size} values, expected {dim}")
    return v.astype(np.float32)


# --------------------------------------------------------------------------- results

def save_interpretation(session: Session, job_id: Optional[int], interp: Any,
                        sr_uids: Optional[tuple[str, str]] = None) -> int:
    """Insert or replace the Interpretation of ``job_id`` (idempotent on re-runs), with the
    study version it covers and its SR's ``(SOP Instance UID, Series Instance UID)``."""
    payload = interp.to_json()
    version = int(getattr(interp, "study_version", 0) or 0) or None
    sop_uid, series_uid = sr_uids or (None, None)
    row = None
    if job_id is not None:
        row = session.execute(select(InterpretationRow).where(InterpretationRow.job_id == job_id)).scalar_one_or_none()
    if row is None:
        row = InterpretationRow(job_id=job_id, study_instance_uid=interp.study_instance_uid,
                                model_sha256=interp.model.weights_sha256, demo=bool(interp.model.demo),
                                interpretation=payload, study_version=version, sr_sop_instance_uid=sop_uid,
                                sr_series_instance_uid=series_uid)
        session.add(row)
    else:
        row.study_instance_uid = interp.study_instance_uid
        row.model_sha256 = interp.model.weights_sha256
        row.demo = bool(interp.model.demo)
        row.interpretation = payload
        row.study_version, row.sr_sop_instance_uid, row.sr_series_instance_uid = version, sop_uid, series_uid
        row.created_at = utcnow()
    session.flush()
    return row.id


@dataclass(frozen=True)
class PublishedSR:
    """The SR published for one version of a study (from ``interpretations``)."""

    study_instance_uid: str
    study_version: int
    sop_instance_uid: str
    series_instance_uid: str


def previous_result(session: Session, study_uid: str, study_version: int) -> Optional[PublishedSR]:
    """The last published SR of an EARLIER version of ``study_uid`` (what a new SR replaces):
    the highest version below ``study_version``, its newest row. A row is written in the
    transaction that publishes its objects, so a row here is a published result."""
    row = session.execute(
        select(InterpretationRow).where(InterpretationRow.study_instance_uid == study_uid,
                                        InterpretationRow.study_version.is_not(None),
                                        InterpretationRow.study_version < int(study_version),
                                        InterpretationRow.sr_sop_instance_uid.is_not(None))
        .order_by(InterpretationRow.study_version.desc(), InterpretationRow.created_at.desc(),
                  InterpretationRow.id.desc()).limit(1)).scalar_one_or_none()
    if row is None:
        return None
    return PublishedSR(row.study_instance_uid, int(row.study_version), row.sr_sop_instance_uid,
                       row.sr_series_instance_uid or "")


def lock_study_results(session: Session, study_uid: str) -> None:
    """Serialise the publishing of results of one study until the transaction ends, so two
    versions finishing at once cannot both miss each other (the later one would name no
    predecessor, the earlier one would not see it is superseded). PostgreSQL: a
    transaction-scoped advisory lock (ingest is not blocked); SQLite serialises writers
    by itself."""
    if session.get_bind().dialect.name != "postgresql":
        return
    key = int.from_bytes(hashlib.sha256(b"echonode-results|" + study_uid.encode()).digest()[:8], "big", signed=True)
    session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": key})


def later_result_exists(session: Session, study_uid: str, study_version: int) -> bool:
    """Was a result of a LATER version of ``study_uid`` published already? (Then a result of
    ``study_version`` finishing now is superseded: sending it would put an outdated SR
    after the current one.)"""
    return session.execute(
        select(InterpretationRow.id).where(InterpretationRow.study_instance_uid == study_uid,
                                           InterpretationRow.study_version > int(study_version),
                                           InterpretationRow.sr_sop_instance_uid.is_not(None)).limit(1)
    ).first() is not None


def latest_interpretation(session: Session, study_uid: str) -> Optional[dict]:
    row = session.execute(select(InterpretationRow).where(InterpretationRow.study_instance_uid == study_uid)
                          .order_by(InterpretationRow.created_at.desc(), InterpretationRow.id.desc())
                          .limit(1)).scalar_one_or_none()
    return None if row is None else json.loads(row.interpretation)


def save_study_embedding(session: Session, study_uid: str, pkey: str, study_date: str, model_sha256: str,
                         vector: np.ndarray) -> None:
    vec = np.asarray(vector, dtype=np.float32).reshape(-1)
    row = session.execute(select(StudyEmbedding).where(StudyEmbedding.study_instance_uid == study_uid,
                                                       StudyEmbedding.model_sha256 == model_sha256)).scalar_one_or_none()
    if row is None:
        session.add(StudyEmbedding(study_instance_uid=study_uid, patient_key=pkey, study_date=study_date or "",
                                   model_sha256=model_sha256, dim=int(vec.size), vector=_vec_to_bytes(vec)))
    else:
        row.patient_key, row.study_date, row.dim, row.vector = pkey, study_date or "", int(vec.size), _vec_to_bytes(vec)
    session.flush()


def embedded_studies(session: Session, study_uids, model_sha256: str) -> set[str]:
    """Those of ``study_uids`` that have a study embedding for these EchoCLIP-R weights."""
    uids = list(dict.fromkeys(study_uids))
    out: set[str] = set()
    for i in range(0, len(uids), 500):   # bounded IN lists
        out.update(session.execute(select(StudyEmbedding.study_instance_uid).where(
            StudyEmbedding.model_sha256 == model_sha256,
            StudyEmbedding.study_instance_uid.in_(uids[i:i + 500]))).scalars())
    return out


@dataclass(frozen=True)
class PriorRow:
    study_instance_uid: str
    study_date: str
    model_sha256: str
    embedding: np.ndarray


def prior_embeddings(session: Session, pkey: str, study_uid: str, study_date: str, model_sha256: str,
                     limit: int = 20) -> list[PriorRow]:
    """Earlier studies of the same patient (same PatientID + issuer) embedded with the same
    EchoCLIP-R weights. "Earlier" is an earlier StudyDate; when either date is missing, a
    study embedded before this one counts as earlier. Newest first."""
    q = select(StudyEmbedding).where(StudyEmbedding.patient_key == pkey,
                                     StudyEmbedding.model_sha256 == model_sha256,
                                     StudyEmbedding.study_instance_uid != study_uid)
    if study_date:
        q = q.where(or_(and_(StudyEmbedding.study_date != "", StudyEmbedding.study_date < study_date),
                        StudyEmbedding.study_date == ""))
    rows = session.execute(q.order_by(StudyEmbedding.study_date.desc(), StudyEmbedding.created_at.desc())
                           .limit(limit)).scalars().all()
    return [PriorRow(r.study_instance_uid, r.study_date, r.model_sha256, _bytes_to_vec(r.vector, r.dim)) for r in rows]
