"""Ingest tables: patients, studies, series, instances, replacement history, analysis jobs.

Schema revisions ``0001_ingest`` and ``0004_instance_versions``
(``store/migrations/versions/``) create exactly these tables; change both together.

Study state machine (column ``studies.state``)::

    receiving ──(no instance for stable.delay_s)──▶ stable   (nothing to analyse)
        ▲                                     └──▶ queued   (an AnalysisJob row exists)
        └──────── a new instance arrives in any state other than receiving
                  (``version`` is incremented, so the next job is a new version)

The pipeline may move a study on to other states (e.g. ``done``); ingest only ever
sets ``receiving``, ``stable`` and ``queued``.
"""

from __future__ import annotations

import datetime as dt
from typing import Optional

from sqlalchemy import (BigInteger, DateTime, Float, ForeignKey, Integer, String, Text,
                        UniqueConstraint)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from echonode.store.base import Base

# study states
STUDY_RECEIVING = "receiving"
STUDY_STABLE = "stable"
STUDY_QUEUED = "queued"

# job states (shared contract with the pipeline)
JOB_QUEUED = "queued"
JOB_WAITING_MODEL = "waiting_model"
JOB_RUNNING = "running"
JOB_DONE = "done"
JOB_FAILED = "failed"
JOB_STATES = (JOB_QUEUED, JOB_WAITING_MODEL, JOB_RUNNING, JOB_DONE, JOB_FAILED)

DECISION_ANALYSE = "analyse"
DECISION_SKIP = "skip"


def utcnow() -> dt.datetime:
    """Naive UTC timestamp (stored the same way in SQLite and PostgreSQL)."""
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


class Patient(Base):
    """A patient, keyed by (PatientID, IssuerOfPatientID); empty strings when absent."""

    __tablename__ = "patients"
    __table_args__ = (UniqueConstraint("patient_id", "issuer", name="uq_patients_patient_id_issuer"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_id: Mapped[str] = mapped_column(String(64), nullable=False, default="")
    issuer: Mapped[str] = mapped_column(String(64), nullable=False, default="")
    birth_date: Mapped[Optional[str]] = mapped_column(String(8))   # DICOM DA, YYYYMMDD
    sex: Mapped[Optional[str]] = mapped_column(String(16))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=utcnow)

    studies: Mapped[list["Study"]] = relationship(back_populates="patient")


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    patient_pk: Mapped[Optional[int]] = mapped_column(ForeignKey("patients.id"), index=True)
    study_date: Mapped[Optional[str]] = mapped_column(String(8))
    study_time: Mapped[Optional[str]] = mapped_column(String(16))
    accession_number: Mapped[Optional[str]] = mapped_column(String(64))
    study_id: Mapped[Optional[str]] = mapped_column(String(16))
    study_description: Mapped[Optional[str]] = mapped_column(String(64))
    # stable-study detection
    state: Mapped[str] = mapped_column(String(16), nullable=False, default=STUDY_RECEIVING, index=True)
    version: Mapped[int] = mapped_column(Integer, nullable=False, default=1)
    first_received_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=utcnow)
    last_received_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=utcnow, index=True)
    stable_at: Mapped[Optional[dt.datetime]] = mapped_column(DateTime)

    patient: Mapped[Optional[Patient]] = relationship(back_populates="studies")
    series: Mapped[list["Series"]] = relationship(back_populates="study")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    study_pk: Mapped[int] = mapped_column(ForeignKey("studies.id"), nullable=False, index=True)
    modality: Mapped[Optional[str]] = mapped_column(String(16))
    series_number: Mapped[Optional[int]] = mapped_column(Integer)
    series_description: Mapped[Optional[str]] = mapped_column(String(64))

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list["Instance"]] = relationship(back_populates="series")


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    series_pk: Mapped[int] = mapped_column(ForeignKey("series.id"), nullable=False, index=True)
    study_pk: Mapped[int] = mapped_column(ForeignKey("studies.id"), nullable=False, index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64), nullable=False)
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64), nullable=False)
    instance_number: Mapped[Optional[int]] = mapped_column(Integer)
    image_type: Mapped[Optional[str]] = mapped_column(String(128))
    rows: Mapped[Optional[int]] = mapped_column(Integer)
    columns: Mapped[Optional[int]] = mapped_column(Integer)
    number_of_frames: Mapped[Optional[int]] = mapped_column(Integer)
    frame_time_ms: Mapped[Optional[float]] = mapped_column(Float)
    cine_rate: Mapped[Optional[float]] = mapped_column(Float)
    photometric: Mapped[Optional[str]] = mapped_column(String(16))
    manufacturer: Mapped[Optional[str]] = mapped_column(String(64))
    model_name: Mapped[Optional[str]] = mapped_column(String(64))
    view_code: Mapped[Optional[str]] = mapped_column(String(64))   # "SCT:399214001"
    view_name: Mapped[Optional[str]] = mapped_column(String(128))
    # storage
    path: Mapped[str] = mapped_column(Text, nullable=False)        # relative to data_dir
    size: Mapped[int] = mapped_column(BigInteger, nullable=False)
    sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    received_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=utcnow)
    calling_ae: Mapped[Optional[str]] = mapped_column(String(16))
    replaced_count: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    # selection (echonode.dicom.select)
    decision: Mapped[str] = mapped_column(String(8), nullable=False, default="skip")
    reason: Mapped[str] = mapped_column(Text, nullable=False, default="")

    series: Mapped[Series] = relationship(back_populates="instances")


VERSION_CURRENT_NEW = "new"   # the arriving version became current (node.on_conflict = "replace")
VERSION_CURRENT_OLD = "old"   # the version already current stayed so ("keep-first", or found by fsck)


class InstanceHistory(Base):
    """A different object arrived with an already stored SOP Instance UID.

    Both versions stay on disk: ``old_path`` is the version that was current before,
    ``new_path`` the one that arrived; ``current`` says which of the two the ``instances``
    row names afterwards. Every file of an instance is therefore either ``instances.path``
    or an ``old_path``/``new_path`` here (revision ``0004_instance_versions`` added the
    paths; rows from before it have NULL paths: their old file was overwritten then).
    """

    __tablename__ = "instance_history"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), nullable=False, index=True)
    old_sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    new_sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    old_size: Mapped[int] = mapped_column(BigInteger, nullable=False)
    old_received_at: Mapped[Optional[dt.datetime]] = mapped_column(DateTime)
    old_calling_ae: Mapped[Optional[str]] = mapped_column(String(16))
    replaced_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=utcnow)
    calling_ae: Mapped[Optional[str]] = mapped_column(String(16))
    old_path: Mapped[Optional[str]] = mapped_column(Text)   # relative to data_dir
    new_path: Mapped[Optional[str]] = mapped_column(Text)
    new_size: Mapped[Optional[int]] = mapped_column(BigInteger)
    current: Mapped[str] = mapped_column(String(8), nullable=False, default=VERSION_CURRENT_NEW)


class AnalysisJob(Base):
    """One analysis of one version of a study; created exactly once per (study, version)."""

    __tablename__ = "analysis_jobs"
    __table_args__ = (UniqueConstraint("study_pk", "study_version", name="uq_analysis_jobs_study_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_pk: Mapped[int] = mapped_column(ForeignKey("studies.id"), nullable=False, index=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), nullable=False, index=True)
    study_version: Mapped[int] = mapped_column(Integer, nullable=False)
    state: Mapped[str] = mapped_column(String(16), nullable=False, default=JOB_QUEUED, index=True)
    error: Mapped[Optional[str]] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=utcnow)
    started_at: Mapped[Optional[dt.datetime]] = mapped_column(DateTime)
    finished_at: Mapped[Optional[dt.datetime]] = mapped_column(DateTime)
