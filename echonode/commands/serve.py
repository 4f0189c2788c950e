"""``echonode serve``: the DICOM SCP in the foreground, plus the stable-study scheduler.

Start-up: migrate the database, open the spool, start the SCP, the stable-study scheduler,
then the pipeline (job dispatcher, embedded worker, metrics: ``echonode.pipeline.service``).
SIGTERM/SIGINT: stop listening, let in-flight associations finish (up to
``--drain`` seconds), stop the services in reverse order, exit 0.
"""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass
from typing import Any, Callable, Protocol

LOG = logging.getLogger("echonode.serve")


class Stoppable(Protocol):
    def stop(self) -> None: ...


@dataclass
class ServeContext:
    """The running services of ``serve``."""

    settings: Any
    sessions: Any = None
    spool: Any = None
    scp: Any = None
    scheduler: Any = None
    pipeline: Any = None
    serve_lock_fd: Any = None   # held while serve runs: fsck then spares files that may be mid-store
    reconcile: Any = None       # the reconciler's report at start


class _Stop:
    def __init__(self, fn: Callable[[], None], name: str):
        self.fn, self.name = fn, name

    def stop(self) -> None:
        self.fn()


def start_services(settings, *, drain_s: float = 10.0) -> tuple[ServeContext, list[Stoppable]]:
    """Start everything ``serve`` runs; returns the context and the services to stop (in order)."""
    from echonode import audit
    from echonode.dicom.scp import EchoSCP
    from echonode.dicom.spool import Spool
    from echonode.pipeline.stable import StableScheduler
    from echonode.storage import open_checked
    from echonode.store import db
    from echonode.store.group import group_commit

    from echonode.files import ensure_dir

    ensure_dir(settings.data_path)
    db.migrate(settings.db_url)
    engine = db.get_engine(settings.db_url)
    sessions = db.session_factory(engine)
    ctx = ServeContext(settings=settings, sessions=sessions)
    audit.record(sessions, [audit.application_start("serve"), audit.configuration_loaded(settings)])
    audit_sender = audit.start_sender(settings, sessions, engine)
    # temp files left by a crash are removed (and counted) by the reconciler below
    ctx.spool = Spool(settings, sessions, clean_incoming=False, store=open_checked(settings))
    services: list[Stoppable] = []
    _reconcile_at_start(settings, sessions, ctx)
    ctx.scp = EchoSCP(settings, ctx.spool)
    ctx.scp.start()
    services.append(_Stop(lambda: ctx.scp.stop(drain_s), "scp"))
    services.append(_Stop(ctx.spool.close, "spool"))
    ctx.scheduler = StableScheduler(settings, sessions).start()
    services.append(ctx.scheduler)
    from echonode.pipeline.service import start_for_serve
    ctx.pipeline = start_for_serve(settings, scp=ctx.scp, scheduler=ctx.scheduler)
    services.append(ctx.pipeline)
    services.append(_Stop(lambda: audit.stop(sessions, audit_sender), "audit"))
    services.append(_Stop(lambda: LOG.info("index and audit rows: %s", group_commit(sessions).summary()),
                          "group commit"))
    services.append(_Stop(engine.dispose, "database"))
    return ctx, services


def _reconcile_at_start(settings, sessions, ctx: ServeContext) -> None:
    """Before the SCP listens: index files left without a row by a crash, report rows without
    a file (echonode.dicom.reconcile; sizes only, `echonode fsck` hashes)."""
    from echonode.dicom.reconcile import hold_serve_lock, reconcile

    min_age = 0.0
    try:
        ctx.serve_lock_fd = hold_serve_lock(settings.data_path)
    except OSError:
        # another serve on this data directory, or a child process left behind by one
        LOG.warning("the data directory's serve lock is held by another process: the reconciler "
                    "leaves files younger than 600 s alone")
        min_age = 600.0
    # object storage is shared by every receiver: an object without a row may be another
    # node's instance between its PUT and its commit, so listing the bucket is fsck's job
    # (with its age guard), not every start's
    try:
        rep = reconcile(settings, sessions, ctx.spool, repair=True, verify=False, min_age_s=min_age,
                        objects=ctx.spool.objects.kind == "local")
    except Exception:  # the node still serves; `echonode fsck` shows the details
        LOG.exception("reconciler failed at start")
        return
    ctx.reconcile = rep
    if rep.problems() or rep.indexed or rep.orphaned:
        LOG.warning("reconciler: %s (details: echonode fsck)", rep.summary())
    else:
        LOG.info("reconciler: %s", rep.summary())


def stop_services(services: list[Stoppable]) -> None:
    # the SCP first (no new data), then the rest; each failure is logged, the others still stop
    for svc in services:
        try:
            svc.stop()
        except Exception:
            LOG.exception("error while stopping %s", getattr(svc, "name", type(svc).__name__))


def quiet_libraries() -> None:
    """No PHI in logs: pydicom's value warnings can quote names/IDs; alembic is chatty."""
    import warnings

    import pydicom.config

    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="pydicom")


def register(sub, parents):
    p = sub.add_parser("serve", parents=parents, help="run the DICOM node (SCP + scheduler) in the foreground",
                       description="Run the DICOM SCP in the foreground; stop with SIGTERM or Ctrl-C.")
    p.add_argument("--drain", type=float, default=10.0, metavar="SECONDS",
                   help="on stop, wait this long for in-flight associations (default 10)")
    p.set_defaults(func=run)


def run(args) -> int:
    from echonode.cli import settings_from_args, setup_logging

    settings = settings_from_args(args)
    setup_logging(settings.log_level)
    quiet_libraries()
    if getattr(args, "config", None):  # the embedded worker (a child process) reads the same file
        import os
        os.environ["ECHONODE_CONFIG"] = os.path.abspath(args.config)
    stop = threading.Event()

    def _signal(signum, _frame):
        LOG.info("signal %s received: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _signal)
    signal.signal(signal.SIGINT, _signal)
    try:
        ctx, services = start_services(settings, drain_s=args.drain)
    except OSError as exc:
        LOG.error("cannot start: %s", exc)
        return 1
    if settings.node.is_open:
        from echonode.config import OPEN_NODE_WARNING
        LOG.warning(OPEN_NODE_WARNING)
    LOG.info("echonode ready: AE %s port %d, data in %s", settings.node.ae_title, ctx.scp.port, settings.data_path)
    while not stop.wait(0.5):
        pass
    stop_services(services)
    LOG.info("echonode stopped")
    return 0
