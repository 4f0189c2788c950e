"""Analysis jobs: the state machine and the dispatch bookkeeping.

``analysis_jobs`` rows are created by the stable-study scheduler (``store/index.py``).
Their transitions (``queued → running → done|failed``, ``queued ⇄ waiting_model``) are
conditional UPDATEs: a task that finds its job already running elsewhere or done does
nothing, which makes every task idempotent.

``job_dispatch`` (schema revision ``0003_results``) is the pipeline's bookkeeping for a
job: when it was turned into a Celery message, by which process, and the running
worker's heartbeat. A row is *claimed* with a conditional UPDATE, so several node
processes never send the same job twice, and a worker that died (heartbeat older than
the lease) is detected from SQL alone, whatever the broker.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

from sqlalchemy import DateTime, ForeignKey, Integer, String, and_, or_, select, update
from sqlalchemy.orm import Mapped, Session, mapped_column

from echonode.store.base import Base
from echonode.store.interpretations import patient_key
from echonode.store.models import (JOB_DONE, JOB_FAILED, JOB_QUEUED, JOB_RUNNING, JOB_WAITING_MODEL,
                                   DECISION_ANALYSE, AnalysisJob, Instance, Patient, Series, Study, utcnow)


class JobDispatch(Base):
    __tablename__ = "job_dispatch"

    job_id: Mapped[int] = mapped_column(ForeignKey("analysis_jobs.id"), primary_key=True)
    dispatches: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    dispatched_at: Mapped[Optional[dt.datetime]] = mapped_column(DateTime)
    dispatched_by: Mapped[Optional[str]] = mapped_column(String(128))
    task_id: Mapped[Optional[str]] = mapped_column(String(64))
    worker: Mapped[Optional[str]] = mapped_column(String(128))
    heartbeat_at: Mapped[Optional[dt.datetime]] = mapped_column(DateTime)


# --------------------------------------------------------------------------- study context

@dataclass(frozen=True)
class ClipRow:
    sop_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    path: str                 # relative to data_dir (as stored by ingest)
    number_of_frames: Optional[int]


@dataclass(frozen=True)
class JobContext:
    """Everything a worker needs from SQL to analyse one job (no pixels)."""

    job_id: int
    state: str
    study_instance_uid: str
    study_version: int
    study_date: str
    patient_key: str
    clips: tuple[ClipRow, ...]          # instances with decision "analyse"
    all_paths: tuple[str, ...]          # every instance of the study (relative paths)
    # for the priors query at the PACS only; never logged (kept out of repr)
    patient_id: str = field(default="", repr=False)
    issuer: str = field(default="", repr=False)


def job_context(session: Session, job_id: int) -> Optional[JobContext]:
    job = session.get(AnalysisJob, job_id)
    if job is None:
        return None
    study = session.get(Study, job.study_pk)
    pkey = patient_key("", "")
    pid = issuer = ""
    if study is not None and study.patient_pk is not None:
        pat = session.get(Patient, study.patient_pk)
        if pat is not None:
            pkey = patient_key(pat.patient_id, pat.issuer)
            pid, issuer = pat.patient_id or "", pat.issuer or ""
    rows = session.execute(
        select(Instance, Series.series_instance_uid)
        .join(Series, Instance.series_pk == Series.id)
        .where(Instance.study_pk == job.study_pk)
        .order_by(Series.series_number, Instance.instance_number, Instance.id)
    ).all()
    clips = tuple(ClipRow(i.sop_instance_uid, s_uid, i.sop_class_uid, i.path, i.number_of_frames)
                  for i, s_uid in rows if i.decision == DECISION_ANALYSE)
    return JobContext(job_id=job.id, state=job.state, study_instance_uid=job.study_instance_uid,
                      study_version=job.study_version,
                      study_date=(study.study_date or "") if study is not None else "",
                      patient_key=pkey, clips=clips, all_paths=tuple(i.path for i, _ in rows),
                      patient_id=pid, issuer=issuer)


# --------------------------------------------------------------------------- dispatch

def _dispatch_row(session: Session, job_id: int) -> JobDispatch:
    row = session.get(JobDispatch, job_id)
    if row is None:
        row = JobDispatch(job_id=job_id, dispatches=0)
        session.add(row)
        session.flush()
    return row


def ensure_dispatch_rows(session: Session) -> int:
    """Create the (unclaimed) dispatch row of every queued job that has none. Returns how many."""
    missing = session.execute(
        select(AnalysisJob.id).outerjoin(JobDispatch, JobDispatch.job_id == AnalysisJob.id)
        .where(AnalysisJob.state == JOB_QUEUED, JobDispatch.job_id.is_(None))
    ).scalars().all()
    for jid in missing:
        session.add(JobDispatch(job_id=jid, dispatches=0))
    if missing:
        try:
            session.flush()
        except Exception:  # another process created them first; the caller retries next tick
            session.rollback()
            return 0
    return len(missing)


def jobs_to_dispatch(session: Session, *, redispatch_after_s: float, limit: int = 100) -> list[tuple[int, int]]:
    """Queued jobs never sent, or sent so long ago that the message must be lost.

    Returns ``(job_id, dispatches)`` pairs; claim each with :func:`claim_dispatch`.
    """
    cutoff = utcnow() - dt.timedelta(seconds=redispatch_after_s)
    rows = session.execute(
        select(JobDispatch.job_id, JobDispatch.dispatches)
        .join(AnalysisJob, AnalysisJob.id == JobDispatch.job_id)
        .where(AnalysisJob.state == JOB_QUEUED,
               or_(JobDispatch.dispatched_at.is_(None), JobDispatch.dispatched_at < cutoff))
        .order_by(AnalysisJob.id).limit(limit)
    ).all()
    return [(r[0], r[1]) for r in rows]


def claim_dispatch(session: Session, job_id: int, seen_dispatches: int, who: str, task_id: str) -> bool:
    """Conditional UPDATE: True for exactly one caller per (job, dispatch number)."""
    res = session.execute(
        update(JobDispatch)
        .where(JobDispatch.job_id == job_id, JobDispatch.dispatches == seen_dispatches)
        .values(dispatches=seen_dispatches + 1, dispatched_at=utcnow(), dispatched_by=who[:128],
                task_id=task_id[:64])
    )
    return res.rowcount == 1


def stale_dispatches(session: Session, older_than_s: float) -> list[int]:
    """Queued jobs whose message was sent more than ``older_than_s`` ago and not started."""
    cutoff = utcnow() - dt.timedelta(seconds=older_than_s)
    return list(session.execute(
        select(JobDispatch.job_id).join(AnalysisJob, AnalysisJob.id == JobDispatch.job_id)
        .where(AnalysisJob.state == JOB_QUEUED, JobDispatch.dispatched_at.is_not(None),
               JobDispatch.dispatched_at < cutoff)).scalars())


def reset_dispatch(session: Session, job_ids: Iterable[int]) -> None:
    """Forget that these jobs were sent (they are queued again and will be re-sent)."""
    ids = list(job_ids)
    if ids:
        session.execute(update(JobDispatch).where(JobDispatch.job_id.in_(ids))
                        .values(dispatched_at=None, worker=None, heartbeat_at=None))


# --------------------------------------------------------------------------- job transitions

def start_job(session: Session, job_id: int, worker: str) -> bool:
    """queued → running (attempts + 1). False if the job is not queued (done, running elsewhere…)."""
    now = utcnow()
    res = session.execute(
        update(AnalysisJob).where(AnalysisJob.id == job_id, AnalysisJob.state == JOB_QUEUED)
        .values(state=JOB_RUNNING, attempts=AnalysisJob.attempts + 1, started_at=now,
                updated_at=now, error=None, finished_at=None)
    )
    if res.rowcount != 1:
        return False
    row = _dispatch_row(session, job_id)
    row.worker = worker[:128]
    row.heartbeat_at = now
    return True


def heartbeat(session: Session, job_id: int, worker: str) -> bool:
    res = session.execute(update(JobDispatch).where(JobDispatch.job_id == job_id, JobDispatch.worker == worker[:128])
                          .values(heartbeat_at=utcnow()))
    return res.rowcount == 1


def finish_job(session: Session, job_id: int, worker: str) -> bool:
    """running → done, only by the worker that runs it."""
    now = utcnow()
    owned = select(JobDispatch.job_id).where(JobDispatch.job_id == job_id, JobDispatch.worker == worker[:128])
    res = session.execute(
        update(AnalysisJob).where(AnalysisJob.id == job_id, AnalysisJob.state == JOB_RUNNING,
                                  AnalysisJob.id.in_(owned))
        .values(state=JOB_DONE, finished_at=now, updated_at=now, error=None)
    )
    return res.rowcount == 1


def fail_job(session: Session, job_id: int, error: str, worker: Optional[str] = None) -> bool:
    """running (or queued) → failed with an error message."""
    now = utcnow()
    cond = [AnalysisJob.id == job_id, AnalysisJob.state.in_((JOB_RUNNING, JOB_QUEUED))]
    if worker is not None:
        cond.append(or_(AnalysisJob.state == JOB_QUEUED,
                        AnalysisJob.id.in_(select(JobDispatch.job_id).where(
                            JobDispatch.job_id == job_id, JobDispatch.worker == worker[:128]))))
    res = session.execute(update(AnalysisJob).where(*cond)
                          .values(state=JOB_FAILED, error=error[:4000], finished_at=now, updated_at=now))
    return res.rowcount == 1


def set_waiting_model(session: Session, message: str, job_ids: Optional[Sequence[int]] = None) -> int:
    """queued (or the given running jobs) → waiting_model with ``message``. Returns count."""
    now = utcnow()
    if job_ids is None:
        cond = [AnalysisJob.state == JOB_QUEUED]
    else:
        cond = [AnalysisJob.id.in_(list(job_ids)), AnalysisJob.state.in_((JOB_QUEUED, JOB_RUNNING))]
    ids = session.execute(select(AnalysisJob.id).where(*cond)).scalars().all()
    if not ids:
        return 0
    res = session.execute(update(AnalysisJob).where(AnalysisJob.id.in_(ids), *cond)
                          .values(state=JOB_WAITING_MODEL, error=message[:4000], updated_at=now))
    reset_dispatch(session, ids)
    return res.rowcount


def release_waiting_model(session: Session) -> int:
    """waiting_model → queued (a model is installed now). Returns count."""
    ids = session.execute(select(AnalysisJob.id).where(AnalysisJob.state == JOB_WAITING_MODEL)).scalars().all()
    if not ids:
        return 0
    res = session.execute(update(AnalysisJob).where(AnalysisJob.id.in_(ids), AnalysisJob.state == JOB_WAITING_MODEL)
                          .values(state=JOB_QUEUED, error=None, updated_at=utcnow()))
    reset_dispatch(session, ids)
    return res.rowcount


def reap_stale_jobs(session: Session, *, lease_s: float, max_attempts: int) -> tuple[list[int], list[int]]:
    """Running jobs whose worker stopped heart-beating: back to queued, or failed after
    ``max_attempts``. Returns ``(requeued_ids, failed_ids)``."""
    cutoff = utcnow() - dt.timedelta(seconds=lease_s)
    rows = session.execute(
        select(AnalysisJob.id, AnalysisJob.attempts, JobDispatch.worker)
        .outerjoin(JobDispatch, JobDispatch.job_id == AnalysisJob.id)
        .where(AnalysisJob.state == JOB_RUNNING,
               or_(JobDispatch.heartbeat_at.is_(None), JobDispatch.heartbeat_at < cutoff),
               AnalysisJob.updated_at < cutoff)
    ).all()
    requeued, failed = [], []
    now = utcnow()
    for jid, attempts, worker in rows:
        stale = and_(AnalysisJob.id == jid, AnalysisJob.state == JOB_RUNNING)
        if attempts >= max_attempts:
            res = session.execute(update(AnalysisJob).where(stale).values(
                state=JOB_FAILED, finished_at=now, updated_at=now,
                error=f"the worker stopped during analysis {attempts} time(s) (last: {worker or 'unknown'}); "
                      f"giving up after queue.max_attempts={max_attempts}"))
            if res.rowcount:
                failed.append(jid)
        else:
            res = session.execute(update(AnalysisJob).where(stale).values(
                state=JOB_QUEUED, updated_at=now,
                error=f"worker {worker or 'unknown'} stopped during analysis; re-queued"))
            if res.rowcount:
                requeued.append(jid)
    reset_dispatch(session, requeued)
    return requeued, failed


def retry_failed(session: Session, job_ids: Optional[Sequence[int]] = None) -> int:
    cond = [AnalysisJob.state == JOB_FAILED]
    if job_ids is not None:
        cond.append(AnalysisJob.id.in_(list(job_ids)))
    ids = session.execute(select(AnalysisJob.id).where(*cond)).scalars().all()
    if not ids:
        return 0
    res = session.execute(update(AnalysisJob).where(AnalysisJob.id.in_(ids)).values(
        state=JOB_QUEUED, attempts=0, error=None, updated_at=utcnow()))
    reset_dispatch(session, ids)
    return res.rowcount


# --------------------------------------------------------------------------- embedded broker upkeep

def purge_consumed_broker_messages(broker_engine, older_than_s: float = 86400.0) -> int:
    """kombu's SQLAlchemy transport marks consumed messages invisible and never deletes
    them; delete those older than ``older_than_s`` (the job rows are the truth)."""
    from sqlalchemy import text
    cutoff = dt.datetime.now() - dt.timedelta(seconds=older_than_s)
    with broker_engine.begin() as conn:
        try:
            res = conn.execute(text("DELETE FROM kombu_message WHERE visible = :f AND sent_at < :c"),
                               {"f": False, "c": cutoff})
        except Exception:   # table not created yet
            return 0
        return res.rowcount or 0
