"""The one Celery app of echonode, built from Settings (never a global).

Broker: ``settings.broker`` — Redis in production (``queue.broker_url =
"redis://host:6379/0"``), else the embedded default ``sqla+sqlite:///<data_dir>/broker.sqlite3``
(kombu's SQLAlchemy transport on a local SQLite file: no server needed). ``filesystem://``
URLs (kombu's filesystem transport) work too; their folders default to
``<data_dir>/broker-fs``.

Long-task settings (Celery's own guidance): acks late, reject on worker lost, prefetch
multiplier 1, a visibility timeout (Redis) longer than the longest analysis, no result
backend unless configured (tasks report through SQL rows). Messages carry job ids and
outbox ids only, never pixels.

Queues: ``analyze`` (model work) and ``deliver`` (network I/O to the PACS).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from celery import Celery
    from echonode.config import Settings

ANALYZE_QUEUE = "analyze"
DELIVER_QUEUE = "deliver"
QUEUES = (ANALYZE_QUEUE, DELIVER_QUEUE)

TASK_ANALYSE = "echonode.analyse_study"
TASK_DELIVER = "echonode.deliver"


def broker_kind(url: str) -> str:
    """'redis', 'sqla', 'filesystem' or the URL scheme."""
    scheme = url.split("://", 1)[0].lower()
    if scheme in ("redis", "rediss"):
        return "redis"
    if scheme.startswith("sqla+") or scheme == "sqlalchemy":
        return "sqla"
    return scheme


def broker_sqlite_path(url: str) -> Path | None:
    """The SQLite file of an embedded ``sqla+sqlite:///…`` broker, else None."""
    if url.startswith("sqla+sqlite:///"):
        return Path(url[len("sqla+sqlite:///"):])
    return None


def transport_options(settings: "Settings") -> dict:
    url = settings.broker
    kind = broker_kind(url)
    if kind == "redis":
        return {"visibility_timeout": int(settings.queue.visibility_timeout_s)}
    if kind == "sqla":
        # kombu hands these to sqlalchemy.create_engine: a generous lock timeout because the
        # node and its worker write the same SQLite file.
        if url.startswith("sqla+sqlite"):
            return {"connect_args": {"timeout": 60}}
        return {"pool_pre_ping": True}
    if kind == "filesystem":
        base = settings.data_path / "broker-fs"
        from echonode.files import ensure_dir
        for sub in ("in", "processed", "control"):
            ensure_dir(base / sub)
        # control_folder: kombu's default is ./control in the current directory.
        return {"data_folder_in": str(base / "in"), "data_folder_out": str(base / "in"),
                "processed_folder": str(base / "processed"), "store_processed": False,
                "control_folder": str(base / "control")}
    return {}


def make_app(settings: "Settings", *, with_tasks: bool = True) -> "Celery":
    """A Celery app for ``settings``; ``with_tasks`` registers the worker-side tasks."""
    from celery import Celery
    from kombu import Queue

    url = settings.broker
    path = broker_sqlite_path(url)
    if path is not None:
        from echonode.files import ensure_dir
        ensure_dir(path.parent)
    app = Celery("echonode", broker=url, set_as_current=False)
    app.conf.update(
        broker_transport_options=transport_options(settings),
        broker_connection_retry_on_startup=True,
        task_serializer="json", accept_content=["json"],
        result_backend=settings.queue.result_backend or None,
        task_ignore_result=not settings.queue.result_backend,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        worker_send_task_events=False,
        task_default_queue=ANALYZE_QUEUE,
        task_queues=[Queue(ANALYZE_QUEUE), Queue(DELIVER_QUEUE)],
        task_routes={TASK_ANALYSE: {"queue": ANALYZE_QUEUE}, TASK_DELIVER: {"queue": DELIVER_QUEUE}},
        task_create_missing_queues=True,
        enable_utc=True,
    )
    app.conf.echonode_settings = settings
    if with_tasks:
        from echonode.pipeline import tasks
        tasks.register(app)
    return app


def send_analyse(app: "Celery", job_id: int, task_id: str) -> None:
    app.send_task(TASK_ANALYSE, args=[int(job_id)], queue=ANALYZE_QUEUE, task_id=task_id)


def send_deliver(app: "Celery", outbox_ids: list[int] | None = None) -> None:
    app.send_task(TASK_DELIVER, args=[list(outbox_ids) if outbox_ids else []], queue=DELIVER_QUEUE)


def queue_depths(settings: "Settings", app: "Celery | None" = None) -> dict[str, int | None]:
    """Messages waiting in each queue (None where the broker cannot say)."""
    own = app is None
    app = app or make_app(settings, with_tasks=False)
    out: dict[str, int | None] = {}
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1)
            ch = conn.default_channel
            for q in QUEUES:
                try:
                    out[q] = int(ch.queue_declare(queue=q, passive=False).message_count)
                except Exception:
                    out[q] = None
    except Exception:
        out = {q: None for q in QUEUES}
    finally:
        if own:
            app.close()
    return out
