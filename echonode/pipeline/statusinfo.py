"""What ``echonode status`` shows about the pipeline: queue depth, model wait, recent results."""

from __future__ import annotations

from echonode.config import Settings


def pipeline_status(settings: Settings, session, *, recent: int = 10) -> dict:
    """Keys added to the status dict: ``queue``, ``workers`` (alive), ``waiting_model``,
    ``recent_results``, ``failed_jobs``, ``delivery``."""
    from echonode.pipeline.celery_app import broker_kind, queue_depths
    from echonode.pipeline.tasks import presence_window_s
    from echonode.store import status as queries
    from echonode.store import workers

    depths = queue_depths(settings)
    return {
        "queue": {"broker": broker_kind(settings.broker), **depths},
        "workers": [{"worker": w.worker_id, "queues": w.queues, "device": w.device,
                     "model": w.model if w.model_available else "", "last_seen": w.last_seen.isoformat(timespec="seconds")}
                    for w in workers.live(session, presence_window_s(settings))],
        "waiting_model": queries.waiting_model_message(session),
        "recent_results": queries.recent_results(session, limit=recent),
        "failed_jobs": queries.failed_jobs(session, limit=recent),
        "delivery": queries.delivery_health(session, settings.delivery.alert_after_s),
    }


def format_pipeline(status: dict) -> list[str]:
    """Readable lines for the text form of ``echonode status``."""
    lines = []
    q = status.get("queue") or {}
    depth = "  ".join(f"{k} {'?' if q.get(k) is None else q.get(k)}" for k in ("analyze", "deliver"))
    lines.append(f"queue ({q.get('broker', '?')}): {depth}")
    ws = status.get("workers") or []
    lines.append(f"workers alive: {len(ws)}" + "".join(
        f"\n  {w['worker']}  {w['queues']}  {w['device']}  {w['model'] or 'no model'}" for w in ws))
    d = status.get("delivery")
    if d is not None:
        age = "-" if d.get("oldest_undelivered_s") is None else f"{d['oldest_undelivered_s']:.0f} s"
        lines.append(f"delivery: {'ok' if d['ok'] else 'ALERT'}  undelivered {d['undelivered']}  dead {d['dead']}  "
                     f"oldest undelivered {age}")
        for r in d.get("reasons") or ():
            lines.append(f"DELIVERY ALERT: {r}")
    if status.get("waiting_model"):
        lines.append(f"WAITING FOR A MODEL: {status['waiting_model']}")
    for f in status.get("failed_jobs") or ():
        lines.append(f"failed job {f['job_id']} ({f['study_instance_uid']}, {f['attempts']} attempt(s)): {f['error']}")
    res = status.get("recent_results") or []
    if res:
        lines.append("recent results:")
        lines.append(f"  {'created (UTC)':20}  {'study instance uid':64}  {'model':14}  {'clips':>5}  {'LVEF %':>6}  priors")
        for r in res:
            lvef = "" if r.get("lvef") is None else f"{r['lvef']:.0f}"
            model = ("DEMO " if r.get("demo") else "") + str(r.get("model", ""))
            lines.append(f"  {r['created_at']:20}  {r['study_instance_uid']:64}  {model[:14]:14}  {r['clips']:>5}  "
                         f"{lvef:>6}  {r['priors']}")
        if any(r.get("demo") for r in res):
            lines.append("  DEMO MODEL — NOT FOR CLINICAL USE (results marked DEMO)")
    return lines
