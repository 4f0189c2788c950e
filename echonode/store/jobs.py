"""Analysis jobs: the state machine and the dispatch bookkeeping.

``analysis_jobs`` rows are created by the stable-study scheduler (``store/index.py``).
Their transitions (``queued → running → done|failed``, ``queued ⇄ waiting_model``) are
conditional UPDATEs: a task that finds its job already running elsewhere or done does
nothing, which makes every task idempotent.

``job_dispatch`` (schema revision ``0003_results``) is the pipeline's bookkeeping for a
job: when it was turned into a Celery message, by which process, and the running
worker's heartbeat. A row is *claimed* with a conditional UPDATE, so several node
processes never send the same job twice, and a worker that died (heartbeat older than
the lease) is detected from SQL alone, whatever the broker. Owning a running job means
holding its ``lease_token`` (revision ``0007_result_versions``): a random token set at each
start, required by heartbeat, finish and fail, so a worker resumed after its job was
taken over can change nothing. A transient failure puts the job back in the queue with
``retry_at`` (backoff) and ``failing_since`` (the time bound).
"""

from __future__ import annotations

import datetime as dt
import secrets
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
    # revision 0007_result_versions
    lease_token: Mapped[Optional[str]] = mapped_column(String(32))   # owner of the running job
    retry_at: Mapped[Optional[dt.datetime]] = mapped_column(DateTime)     # transient failure: not before
    failing_since: Mapped[Optional[dt.datetime]] = mapped_column(DateTime)


# --------------------------------------------------------------------------- study context

@dataclass(frozen=True)
class ClipRow:
    sop_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    path: str                 # the key in the node's store (for the local store: relative to data_dir)
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
               or_(JobDispatch.dispatched_at.is_(None), JobDispatch.dispatched_at < cutoff),
               or_(JobDispatch.retry_at.is_(None), JobDispatch.retry_at <= utcnow()))
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
                        .values(dispatched_at=None, worker=None, heartbeat_at=None, lease_token=None))


# --------------------------------------------------------------------------- job transitions

def start_job(session: Session, job_id: int, worker: str) -> Optional[str]:
    """queued → running (attempts + 1). Returns the job's lease token, None if the job is
    not queued (done, running elsewhere…).

    The token (random, new at every start) is what owning the job means: heartbeat, finish
    and fail need it. A worker that was paused past ``queue.lease_s`` (SIGSTOP, a VM pause)
    and resumes after the reaper gave the job to another worker holds a token that no
    longer matches: it can change nothing."""
    now = utcnow()
    if session.execute(select(AnalysisJob.id).where(AnalysisJob.id == job_id, AnalysisJob.state == JOB_QUEUED,
                                                    AnalysisJob.id.not_in(_retry_later(now)))).first() is None:
        return None
    res = session.execute(
        update(AnalysisJob).where(AnalysisJob.id == job_id, AnalysisJob.state == JOB_QUEUED)
        .values(state=JOB_RUNNING, attempts=AnalysisJob.attempts + 1, started_at=now,
                updated_at=now, error=None, finished_at=None)
    )
    if res.rowcount != 1:
        return None
    token = secrets.token_hex(16)
    row = _dispatch_row(session, job_id)
    row.worker = worker[:128]
    row.heartbeat_at = now
    row.lease_token = token
    return token


def _retry_later(now: dt.datetime):
    """Jobs waiting out the backoff of a transient failure."""
    return select(JobDispatch.job_id).where(JobDispatch.retry_at.is_not(None), JobDispatch.retry_at > now)


def _owned(job_id: int, lease: str):
    return select(JobDispatch.job_id).where(JobDispatch.job_id == job_id, JobDispatch.lease_token == lease)


def owns(session: Session, job_id: int, lease: str) -> bool:
    """Does ``lease`` still own the running job?"""
    return session.execute(select(AnalysisJob.id).where(AnalysisJob.id == job_id, AnalysisJob.state == JOB_RUNNING,
                                                        AnalysisJob.id.in_(_owned(job_id, lease)))).first() is not None


def heartbeat(session: Session, job_id: int, lease: str) -> bool:
    """Refresh the lease; False when the job is no longer this lease's (taken over)."""
    res = session.execute(update(JobDispatch).where(JobDispatch.job_id == job_id, JobDispatch.lease_token == lease)
                          .values(heartbeat_at=utcnow()))
    return res.rowcount == 1


def finish_job(session: Session, job_id: int, lease: str) -> bool:
    """running → done, only by the lease that runs it."""
    now = utcnow()
    res = session.execute(
        update(AnalysisJob).where(AnalysisJob.id == job_id, AnalysisJob.state == JOB_RUNNING,
                                  AnalysisJob.id.in_(_owned(job_id, lease)))
        .values(state=JOB_DONE, finished_at=now, updated_at=now, error=None)
    )
    if res.rowcount == 1:
        session.execute(update(JobDispatch).where(JobDispatch.job_id == job_id)
                        .values(retry_at=None, failing_since=None))
    return res.rowcount == 1


def fail_job(session: Session, job_id: int, error: str, lease: Optional[str] = None) -> bool:
    """→ failed with an error message: the running job of ``lease``, or (no lease: an
    operator, the dispatcher) a running or queued job."""
    now = utcnow()
    if lease is not None:
        cond = [AnalysisJob.id == job_id, AnalysisJob.state == JOB_RUNNING, AnalysisJob.id.in_(_owned(job_id, lease))]
    else:
        cond = [AnalysisJob.id == job_id, AnalysisJob.state.in_((JOB_RUNNING, JOB_QUEUED))]
    res = session.execute(update(AnalysisJob).where(*cond)
                          .values(state=JOB_FAILED, error=error[:4000], finished_at=now, updated_at=now))
    return res.rowcount == 1


def retry_transient(session: Session, job_id: int, lease: str, error: str, *, retry_for_s: float,
                    backoff_s: float, backoff_max_s: float) -> str:
    """A transient failure (database or broker unreachable, a timeout) of the running job of
    ``lease``: back to ``queued``, not before a backoff, without spending one of the
    ``queue.max_attempts`` worker losses; ``failed`` once it has been failing for
    ``retry_for_s``. Returns the new state ("" when the lease no longer owns the job)."""
    now = utcnow()
    if not owns(session, job_id, lease):
        return ""
    row = _dispatch_row(session, job_id)
    since = row.failing_since or now
    failing = (now - since).total_seconds()
    if failing >= retry_for_s:
        fail_job(session, job_id, f"transient failure for {failing:.0f} s (queue.retry_for_s = {retry_for_s:g}); "
                                  f"last: {error}", lease)
        return JOB_FAILED
    job = session.get(AnalysisJob, job_id)
    n = max(1, int(failing // max(backoff_s, 1e-3)).bit_length())   # doubling with time spent failing
    delay = min(backoff_max_s, backoff_s * (2 ** min(n - 1, 30)))
    session.execute(update(AnalysisJob).where(AnalysisJob.id == job_id, AnalysisJob.state == JOB_RUNNING)
                    .values(state=JOB_QUEUED, attempts=max(0, (job.attempts or 1) - 1), updated_at=now,
                            error=f"transient failure, retrying: {error}"[:4000]))
    session.execute(update(JobDispatch).where(JobDispatch.job_id == job_id).values(
        dispatched_at=None, worker=None, heartbeat_at=None, lease_token=None, failing_since=since,
        retry_at=now + dt.timedelta(seconds=delay)))
    return JOB_QUEUED


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
    session.execute(update(JobDispatch).where(JobDispatch.job_id.in_(ids)).values(retry_at=None, failing_since=None))
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
