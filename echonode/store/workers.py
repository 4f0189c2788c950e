"""Workers as the database sees them: which are alive, what they consume, which model they hold.

A worker writes its row at start and every ``queue.heartbeat_s``. The dispatcher in ``serve``
reads it: a job is dispatched when a live ``analyze`` worker holds a model, so a receiver
needs no copy of the model bundles of its own (scale-out: the workers have them).
"""

from __future__ import annotations

import datetime as dt
from typing import Optional

from sqlalchemy import Boolean, DateTime, String, delete, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from echonode.store.base import Base
from echonode.store.models import utcnow


class WorkerRow(Base):
    __tablename__ = "workers"

    worker_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    queues: Mapped[str] = mapped_column(String(64), nullable=False, default="")
    device: Mapped[str] = mapped_column(String(32), nullable=False, default="")
    model_available: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    model: Mapped[str] = mapped_column(String(256), nullable=False, default="")   # what choose_models said
    started_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=utcnow)
    last_seen: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=utcnow, index=True)


#: a row not refreshed for this long is deleted by the next beat of any worker: worker ids
#: change with every start (host and pid), so rows would pile up otherwise
FORGET_AFTER = dt.timedelta(days=1)


def beat(session: Session, worker_id: str, *, queues: str, device: str, model_available: bool, model: str,
         now: Optional[dt.datetime] = None) -> None:
    """Insert or refresh the worker's row, and delete the rows of workers gone for
    :data:`FORGET_AFTER` (one indexed DELETE; the caller commits)."""
    now = now or utcnow()
    session.execute(delete(WorkerRow).where(WorkerRow.last_seen < now - FORGET_AFTER)
                    .execution_options(synchronize_session=False))
    row = session.get(WorkerRow, worker_id[:128])
    if row is None:
        session.add(WorkerRow(worker_id=worker_id[:128], queues=queues[:64], device=device[:32],
                              model_available=model_available, model=model[:256], started_at=now, last_seen=now))
        return
    row.queues, row.device, row.model_available, row.model, row.last_seen = \
        queues[:64], device[:32], model_available, model[:256], now


def live(session: Session, within_s: float, now: Optional[dt.datetime] = None) -> list[WorkerRow]:
    """Workers seen in the last ``within_s`` seconds, newest first."""
    since = (now or utcnow()) - dt.timedelta(seconds=within_s)
    return list(session.scalars(select(WorkerRow).where(WorkerRow.last_seen >= since)
                                .order_by(WorkerRow.last_seen.desc())))


def analysis_model(session: Session, within_s: float, now: Optional[dt.datetime] = None) -> Optional[str]:
    """What a live ``analyze`` worker that holds a model said of it; None when there is none."""
    for w in live(session, within_s, now):
        if w.model_available and "analyze" in w.queues.split(","):
            return f"{w.model} (worker {w.worker_id})"
    return None
