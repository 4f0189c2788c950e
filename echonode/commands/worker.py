"""``echonode worker``: a Celery worker for the ``analyze`` and ``deliver`` queues.

One process per GPU: ``echonode worker --queues analyze --device cuda:0``. The pool is
``solo`` (tasks run in this process), so CUDA is initialised here and only here, and
the model is loaded once at start-up and kept for every study. ``echonode serve``
starts the same command as its embedded worker when ``queue.embedded_worker`` is true.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import sys

log = logging.getLogger("echonode.worker")

_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")


def register(sub, parents):
    p = sub.add_parser("worker", parents=parents, help="run a Celery worker (analysis and/or delivery)",
                       description="Run a Celery worker that analyses stable studies and delivers results. "
                                   "One process per GPU; the model is loaded once and kept.")
    p.add_argument("--queues", "-Q", default="analyze,deliver",
                   help="comma-separated queues to consume: analyze, deliver (default: both)")
    p.add_argument("--device", default=None,
                   help="cpu, cuda or cuda:N (default: model.device from the configuration)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                   help="inference precision (default: model.precision)")
    p.add_argument("--no-preload", action="store_true", help="load the model on the first study, not at start-up")
    p.add_argument("--embedded", action="store_true", help="(internal) started by `echonode serve`")
    p.set_defaults(func=run)


def run(args) -> int:
    from echonode.cli import EXIT_FAILURE, EXIT_USAGE, settings_from_args, setup_logging

    settings = settings_from_args(args)
    setup_logging(settings.log_level)
    from echonode.commands.serve import quiet_libraries
    quiet_libraries()                                   # no PHI from pydicom's value warnings
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    queues = [q.strip() for q in str(args.queues).split(",") if q.strip()]
    from echonode.pipeline.celery_app import QUEUES, broker_kind, make_app
    bad = [q for q in queues if q not in QUEUES]
    if not queues or bad:
        print(f"echonode worker: unknown queue(s) {', '.join(bad) or '(none)'}; choose from {', '.join(QUEUES)}",
              file=sys.stderr)
        return EXIT_USAGE
    device = args.device or settings.model.device
    if not _DEVICE.match(device):
        print(f"echonode worker: --device must be cpu, cuda or cuda:N, got {device!r}", file=sys.stderr)
        return EXIT_USAGE
    model_changes = {}
    if args.precision:
        model_changes["precision"] = args.precision
    model_changes["device"] = device
    import dataclasses
    settings = settings.replace(model=dataclasses.replace(settings.model, **model_changes))

    from echonode.store import db
    try:
        db.migrate(settings.db_url)
    except Exception as exc:
        print(f"echonode worker: cannot open the database: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILURE

    from echonode.storage import open_checked
    open_checked(settings)   # a missing bucket or refused credentials: exit 3 now, not a failed job later

    if device.startswith("cuda"):
        import torch  # CUDA is initialised in this process only
        if not torch.cuda.is_available():
            print(f"echonode worker: --device {device} requested but CUDA is not available here", file=sys.stderr)
            return EXIT_FAILURE
        idx = int(device.split(":", 1)[1]) if ":" in device else 0
        if idx >= torch.cuda.device_count():
            print(f"echonode worker: {device} does not exist ({torch.cuda.device_count()} GPU(s))", file=sys.stderr)
            return EXIT_FAILURE

    role = "embedded" if args.embedded else "worker"
    hostname = f"echonode-{role}-{os.getpid()}@{socket.gethostname()}"
    app = make_app(settings)
    app.conf.echonode_device = device
    app.conf.echonode_worker_id = hostname
    from echonode.pipeline.tasks import runtime
    rt = runtime(app)
    if "analyze" in queues and not args.no_preload:
        try:
            rt.preload()
        except Exception as exc:  # a broken bundle: jobs will fail with the reason, keep serving deliveries
            log.error("model could not be loaded: %s: %s", type(exc).__name__, exc)
    log.info("worker %s: queues %s, device %s, broker %s", hostname, ",".join(queues), device,
             broker_kind(settings.broker))
    worker = app.Worker(
        hostname=hostname, queues=queues, pool_cls="solo", concurrency=1,
        loglevel=settings.log_level.upper(), without_gossip=True, without_mingle=True, without_heartbeat=True,
        optimization="fair", quiet=True,
    )
    from echonode.pipeline.tasks import Presence
    presence = Presence(rt, queues, device).start()   # the dispatcher sees this worker and its model
    try:
        worker.start()
    finally:
        presence.stop()
    return int(worker.exitcode or 0)
