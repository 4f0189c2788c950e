"""Read-only queries for ``echonode status``, the metrics endpoint and the demo: counts,
per-study state, failed jobs, durations. Nothing here writes."""

from __future__ import annotations

from typing import Optional

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

import json

from echonode.store.interpretations import InterpretationRow
from echonode.store.models import (JOB_DONE, JOB_FAILED, JOB_STATES, JOB_WAITING_MODEL, AnalysisJob, Instance,
                                   Patient, Series, Study)


# --------------------------------------------------------------------------- status / metrics

def delivery_health(session: Session, alert_after_s: float) -> dict:
    """Is delivery healthy? Not while an outbox row is dead or the oldest undelivered
    object is older than ``alert_after_s`` (``delivery.alert_after_s``). The one answer
    ``/healthz``, ``echonode status`` and the metrics give."""
    from echonode.store.outbox import backlog

    b = backlog(session)
    reasons = []
    if b.dead:
        reasons.append(f"{b.dead} result object(s) dead in the outbox (gave up delivering; "
                       f"`echonode outbox retry` sends them again)")
    if b.oldest_undelivered_s is not None and alert_after_s > 0 and b.oldest_undelivered_s > alert_after_s:
        reasons.append(f"the oldest undelivered result object waits for {b.oldest_undelivered_s:.0f} s "
                       f"(delivery.alert_after_s = {alert_after_s:g})")
    return {"ok": not reasons, "reasons": reasons, "dead": b.dead, "undelivered": b.undelivered,
            "oldest_undelivered_s": None if b.oldest_undelivered_s is None else round(b.oldest_undelivered_s, 1),
            "alert_after_s": alert_after_s}


def job_counts(session: Session) -> dict[str, int]:
    counts = {s: 0 for s in JOB_STATES}
    for state, n in session.execute(select(AnalysisJob.state, func.count()).group_by(AnalysisJob.state)).all():
        counts[state] = int(n)
    return counts


def waiting_model_message(session: Session) -> Optional[str]:
    return session.execute(select(AnalysisJob.error).where(AnalysisJob.state == JOB_WAITING_MODEL)
                           .order_by(AnalysisJob.id.desc()).limit(1)).scalar_one_or_none()


def job_durations(session: Session, limit: int = 1000) -> list[float]:
    """Seconds from start to finish of the most recent finished jobs."""
    rows = session.execute(select(AnalysisJob.started_at, AnalysisJob.finished_at)
                           .where(AnalysisJob.state == JOB_DONE, AnalysisJob.started_at.is_not(None),
                                  AnalysisJob.finished_at.is_not(None))
                           .order_by(AnalysisJob.id.desc()).limit(limit)).all()
    return [max(0.0, (f - s).total_seconds()) for s, f in rows]


def failed_jobs(session: Session, limit: int = 10) -> list[dict]:
    rows = session.execute(select(AnalysisJob).where(AnalysisJob.state == JOB_FAILED)
                           .order_by(AnalysisJob.id.desc()).limit(limit)).scalars().all()
    return [{"job_id": j.id, "study_instance_uid": j.study_instance_uid, "attempts": j.attempts,
             "error": j.error or ""} for j in rows]


def ingest_totals(session: Session) -> dict[str, int]:
    n, size = session.execute(select(func.count(Instance.id), func.coalesce(func.sum(Instance.size), 0))).one()
    return {"instances": int(n), "bytes": int(size)}


def collect_status(session, *, study_limit: int = 200) -> dict:
    """Counts and per-study state for ``echonode status`` (other areas add keys to the dict)."""
    from sqlalchemy import func

    from echonode.store.models import JOB_STATES, AnalysisJob

    counts_ = {
        "patients": int(session.scalar(select(func.count()).select_from(Patient)) or 0),
        "studies": int(session.scalar(select(func.count()).select_from(Study)) or 0),
        "series": int(session.scalar(select(func.count()).select_from(Series)) or 0),
        "instances": int(session.scalar(select(func.count()).select_from(Instance)) or 0),
    }
    # "studies" is both a count and a list in the contract; a JSON key holds one value:
    # the top-level "studies" is the list, the integer is "study_count" and counts.studies.
    out: dict = {"patients": counts_["patients"], "study_count": counts_["studies"],
                 "series": counts_["series"], "instances": counts_["instances"], "counts": counts_}
    counts = dict(session.execute(select(AnalysisJob.state, func.count()).group_by(AnalysisJob.state)).all())
    out["jobs"] = {s: int(counts.get(s, 0)) for s in JOB_STATES}
    for s, n in counts.items():
        out["jobs"].setdefault(s, int(n))
    inst = (select(Instance.study_pk, func.count().label("n"),
                   func.sum(case((Instance.decision == "analyse", 1), else_=0)).label("a"))
            .group_by(Instance.study_pk).subquery())
    rows = session.execute(
        select(Study.study_instance_uid, Study.state, Study.version, Study.study_date, Study.last_received_at,
               func.coalesce(inst.c.n, 0), func.coalesce(inst.c.a, 0))
        .outerjoin(inst, inst.c.study_pk == Study.id)
        .order_by(Study.last_received_at.desc()).limit(study_limit)).all()
    out["studies_listed"] = len(rows)
    out["studies"] = [
        {"study_instance_uid": uid, "instances": int(n), "clips_to_analyse": int(a), "state": state,
         "version": version, "study_date": sdate,
         "last_received_at": last.isoformat() + "Z" if last else None}
        for uid, state, version, sdate, last, n, a in rows]
    return out


def recent_results(session: Session, limit: int = 10) -> list[dict]:
    """Newest interpretations, summarised for ``echonode status`` (no patient data)."""
    rows = session.execute(select(InterpretationRow).order_by(InterpretationRow.created_at.desc(),
                                                              InterpretationRow.id.desc()).limit(limit)).scalars().all()
    out = []
    for r in rows:
        d = json.loads(r.interpretation)
        tasks = d.get("tasks", {})
        ef = tasks.get("ejection_fraction") or tasks.get("lvef")
        lvef = ef.get("value") if isinstance(ef, dict) else None
        lon = d.get("longitudinal") or {}
        out.append({
            "job_id": r.job_id, "study_instance_uid": r.study_instance_uid,
            "created_at": r.created_at.isoformat(timespec="seconds") + "Z",
            "model": (d.get("model") or {}).get("name", ""), "model_sha256": r.model_sha256[:12],
            "demo": bool(r.demo), "clips": len(d.get("clips", ())), "lvef": lvef,
            "priors": len(lon.get("priors", ()) or ()),
        })
    return out


def study_jobs(session: Session, study_uids) -> dict:
    """``{study uid: (state, error)}`` of each study's newest analysis job (studies without one left out)."""
    out: dict = {}
    rows = session.execute(select(AnalysisJob.study_instance_uid, AnalysisJob.state, AnalysisJob.error)
                           .where(AnalysisJob.study_instance_uid.in_(list(study_uids)))
                           .order_by(AnalysisJob.id)).all()
    for uid, state, error in rows:
        out[uid] = (state, error)      # ordered by id: the newest job wins
    return out
