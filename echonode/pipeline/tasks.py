"""Celery tasks (worker side). Messages carry ids only: a job id, outbox ids.

``echonode.analyse_study(job_id)``
    1. claim the job (``queued → running``, conditional UPDATE; a job that is done or
       running elsewhere is left alone: every re-delivery is a no-op),
    2. pick the model (waiting_model with the install instructions when there is none),
    3. look up the study's clips (the SQL index rows: paths, UIDs, frame counts) and the
       priors of the same patient, then :func:`echonode.analysis.analyse` (model loaded once
       per worker process and kept),
    4. :func:`echonode.analysis.publish`: SR and overlays written under
       ``<data_dir>/results/<study uid>/`` (deterministic SOP Instance UIDs: a re-run
       replaces, never duplicates), then Interpretation, study embedding, job done and
       outbox rows in one transaction,
    5. queue a delivery run on the ``deliver`` queue.
   While it runs, a heartbeat thread refreshes the job's lease, so a dead worker is
   noticed by the dispatcher (``queue.lease_s``) and the job re-queued.

``echonode.deliver(outbox_ids)``: sends due outbox rows (all due ones when empty).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from sqlalchemy.exc import SQLAlchemyError

from echonode.analysis import AnalysisError
from echonode.config import Settings
from echonode.store.db import describe_error

log = logging.getLogger("echonode.worker")


class WorkerRuntime:
    """Per-process state of a worker: settings, device, SQL sessions, the loaded model."""

    def __init__(self, settings: Settings, device: Optional[str] = None, worker_id: Optional[str] = None) -> None:
        from echonode.store.db import get_engine, session_factory

        self.settings = settings
        self.device = device or settings.model.device
        self.worker_id = worker_id or f"worker@{os.uname().nodename}:{os.getpid()}"
        self.Session = session_factory(get_engine(settings.db_url))
        self._interp_key: Optional[tuple] = None
        self._interpreter: Any = None
        self.analyses = 0

    # ------------------------------------------------------------------ model
    def interpreter(self, choice) -> Any:
        """The Interpreter for ``choice`` (loaded once, kept while the bundles are unchanged)."""
        key = (str(choice.clip.path), choice.clip.weights_sha256,
               str(choice.r.path) if choice.r is not None else None,
               choice.r.weights_sha256 if choice.r is not None else None, self.device)
        if key != self._interp_key:
            from echonode.analysis import make_interpreter
            from echonode.model.bundle import Bundle

            t0 = time.perf_counter()
            self._interpreter = None
            # verify the weights' sha256 once per (bundle, checksum), when it is loaded
            clip = Bundle.open(choice.clip.path, verify=True)
            r = Bundle.open(choice.r.path, verify=True) if choice.r is not None else None
            self._interpreter = make_interpreter(self.settings, clip, r, device=self.device)
            self._interp_key = key
            log.info("model %s loaded on %s in %.1f s%s", choice.clip.name, self.device, time.perf_counter() - t0,
                     " — DEMO MODEL — NOT FOR CLINICAL USE" if choice.demo else "")
        return self._interpreter

    def preload(self) -> bool:
        """Load the model now (worker start-up), so the first study does not pay for it."""
        from echonode.pipeline.modelsel import choose_models

        choice = choose_models(self.settings, verify=False)
        if not choice.available:
            log.warning("%s", choice.message)
            return False
        self.interpreter(choice)
        return True


class _Heartbeat:
    """Refreshes the job's lease while it runs; notices when the lease went to another worker."""

    def __init__(self, rt: WorkerRuntime, job_id: int, lease: str) -> None:
        self.rt, self.job_id, self.lease = rt, job_id, lease
        self.lost = False
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, name=f"heartbeat-{job_id}", daemon=True)

    def _run(self) -> None:
        from echonode.store import jobs

        every = max(0.2, float(self.rt.settings.queue.heartbeat_s))
        while not self._stop.wait(every):
            try:
                with self.rt.Session.begin() as s:
                    owned = jobs.heartbeat(s, self.job_id, self.lease)
            except Exception as exc:  # the next beat retries
                log.warning("job %d: heartbeat failed: %s", self.job_id, describe_error(exc))
                continue
            if not owned and not self.lost:
                self.lost = True
                log.info("job %d: lease lost (another worker took the job over); this run will publish nothing",
                         self.job_id)

    def __enter__(self) -> "_Heartbeat":
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join(timeout=5)


def is_transient(exc: BaseException) -> bool:
    """A failure that a later try may not meet: the database, the broker or the object store
    unreachable, a connection lost or timed out. Anything else (no decodable clip, an SR that cannot be
    built, a bug) is permanent: the job fails with the reason."""
    from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, TimeoutError as PoolTimeout

    if isinstance(exc, (OperationalError, InterfaceError, PoolTimeout)):
        return True
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    from echonode.storage import StorageUnavailable
    if isinstance(exc, StorageUnavailable):   # the object store down or unreachable
        return True
    try:
        from kombu.exceptions import OperationalError as BrokerError
        if isinstance(exc, BrokerError):
            return True
    except ImportError:  # pragma: no cover
        pass
    try:
        import redis.exceptions as rx
        if isinstance(exc, (rx.ConnectionError, rx.TimeoutError)):
            return True
    except ImportError:  # pragma: no cover
        pass
    return False


# --------------------------------------------------------------------------- analysis

def analyse_job(rt: WorkerRuntime, job_id: int, app=None) -> str:
    """The body of ``echonode.analyse_study``. Returns a short outcome word."""
    from echonode.analysis import JobTakenOver
    from echonode.pipeline.modelsel import choose_models
    from echonode.store import jobs

    with rt.Session() as s:
        ctx = jobs.job_context(s, job_id)
    if ctx is None:
        log.warning("job %d: no such job (message ignored)", job_id)
        return "missing"
    if ctx.state != "queued":
        log.info("job %d is %s: nothing to do", job_id, ctx.state)
        return f"skipped-{ctx.state}"
    choice = choose_models(rt.settings, verify=False)   # presence; weights verified when loaded
    if not choice.available:
        with rt.Session.begin() as s:
            jobs.set_waiting_model(s, choice.message, [job_id])
        log.warning("job %d waits for a model: %s", job_id, choice.message)
        return "waiting_model"
    with rt.Session.begin() as s:
        lease = jobs.start_job(s, job_id, rt.worker_id)
    if not lease:
        return "skipped-claimed"
    log.info("job %d: analysing %d clip(s)%s", job_id, len(ctx.clips),
             " with the DEMO MODEL — NOT FOR CLINICAL USE" if choice.demo else "")
    t0 = time.perf_counter()
    try:
        with _Heartbeat(rt, job_id, lease):
            published = _analyse_and_publish(rt, ctx, choice, lease)
    except JobTakenOver:
        # paused past the lease (SIGSTOP, VM pause) and resumed: the job is another
        # worker's now; this one stops quietly, publishing and failing nothing
        log.info("job %d: taken over by another worker while this one was stalled; left to it", job_id)
        return "taken-over"
    except Exception as exc:
        if is_transient(exc):
            return _retry_later(rt, job_id, lease, exc)
        _fail(rt, job_id, exc, lease)
        return "failed"
    rt.analyses += 1
    log.info("job %d done in %.1f s: %d result object(s) written, %d outbox row(s)%s", job_id,
             time.perf_counter() - t0, len(published.objects), len(published.outbox_ids),
             "" if rt.settings.delivery.destinations else " (no delivery.destinations configured)")
    if published.outbox_ids and app is not None:
        try:
            from echonode.pipeline.celery_app import send_deliver
            send_deliver(app, published.outbox_ids)
        except Exception as exc:  # the dispatcher kicks deliveries of due rows anyway
            log.warning("job %d: could not queue delivery: %s", job_id, exc)
    return "done"


def _retry_later(rt: WorkerRuntime, job_id: int, lease: str, exc: BaseException) -> str:
    """Give a transiently failed job back to the queue with backoff (``queue.retry_*``).

    The database may be the thing that is down: recording that is itself retried for up
    to ``queue.lease_s``; past that the job is still ``running`` under a lease nobody
    refreshes, and the dispatcher's reaper re-queues it."""
    from echonode.store import jobs

    q = rt.settings.queue
    reason = describe_error(exc) if isinstance(exc, SQLAlchemyError) else f"{type(exc).__name__}"
    deadline = time.monotonic() + q.lease_s
    pause = min(1.0, q.retry_backoff_s)
    while True:
        try:
            with rt.Session.begin() as s:
                state = jobs.retry_transient(s, job_id, lease, reason, retry_for_s=q.retry_for_s,
                                             backoff_s=q.retry_backoff_s, backoff_max_s=q.retry_backoff_max_s)
        except Exception as exc2:
            if time.monotonic() + pause > deadline:
                log.error("job %d: transient failure (%s) and the database stays unreachable (%s); "
                          "the reaper re-queues it", job_id, reason, describe_error(exc2))
                return "retrying"
            time.sleep(pause)
            pause = min(pause * 2, 30.0)
            continue
        if state == "failed":
            log.error("job %d failed: transient failure outlasted queue.retry_for_s=%g: %s", job_id, q.retry_for_s,
                      reason)
            return "failed"
        log.warning("job %d: transient failure (%s); re-queued with backoff", job_id, reason)
        return "retrying" if state else "taken-over"


def _fail(rt: WorkerRuntime, job_id: int, exc: Exception, lease: str) -> None:
    """Record the job as failed with a reason that carries no patient data."""
    from echonode.store import jobs

    if isinstance(exc, AnalysisError):
        reason = str(exc)
        log.error("job %d failed: %s", job_id, exc.log_message)
    elif isinstance(exc, SQLAlchemyError):
        # PostgreSQL messages quote statement values (e.g. the PatientID of the priors
        # query): keep only the error class and SQLSTATE, in the job row and the log.
        reason = describe_error(exc)
        log.error("job %d failed: %s", job_id, reason)
    else:
        # An unexpected error (the SR, page or PDF builders can quote header values in it):
        # the class and where it was raised, never its message, in the log and the job row.
        reason = f"{type(exc).__name__} (unexpected; traceback in the worker log)"
        log.error("job %d failed: %s\n%s", job_id, type(exc).__name__, _traceback_without_message(exc))
    with rt.Session.begin() as s:
        if not jobs.fail_job(s, job_id, reason, lease):
            log.info("job %d: not marked failed: its lease went to another worker", job_id)


def _traceback_without_message(exc: BaseException) -> str:
    """The frames of ``exc``'s traceback (file, line, function, source line), not its text."""
    import traceback
    return "".join(traceback.format_list(traceback.extract_tb(exc.__traceback__))).rstrip()


def _analyse_and_publish(rt: WorkerRuntime, ctx, choice, lease: str):
    """The study's clips as the SQL index knows them -> :mod:`echonode.analysis`."""
    from echonode import analysis
    from echonode.interpret.engine import PriorEmbedding
    from echonode.store import interpretations

    interpreter = rt.interpreter(choice)
    clips = [analysis.ClipSource(path=Path(c.path), key=c.path,
                                 sop_instance_uid=c.sop_instance_uid, series_instance_uid=c.series_instance_uid,
                                 sop_class_uid=c.sop_class_uid, number_of_frames=c.number_of_frames)
             for c in ctx.clips]
    priors, notes = [], []
    if choice.r is not None:
        if rt.settings.priors.enabled:   # the PACS's earlier studies, bounded by priors.timeout_s
            from echonode.priors import fetch_and_embed_priors
            outcome = fetch_and_embed_priors(rt.settings, rt.Session, interpreter, study_uid=ctx.study_instance_uid,
                                             patient_id=ctx.patient_id, issuer=ctx.issuer, study_date=ctx.study_date)
            notes.append(outcome.summary())
        with rt.Session() as s:
            rows = interpretations.prior_embeddings(s, ctx.patient_key, ctx.study_instance_uid, ctx.study_date,
                                                    choice.r.weights_sha256)
        priors = [PriorEmbedding(study_instance_uid=r.study_instance_uid, study_date=r.study_date,
                                 embedding=r.embedding, weights_sha256=r.model_sha256) for r in rows]
    result = analysis.analyse(rt.settings, interpreter, ctx.study_instance_uid, clips, priors, notes)
    with rt.Session() as s:
        return analysis.publish(rt.settings, s, result, job_id=ctx.job_id, lease=lease,
                                study_version=ctx.study_version, patient_key=ctx.patient_key,
                                study_date=ctx.study_date)


def deliver_due(settings: Settings, session_factory):
    """Send every due outbox row (the ``deliver`` task; the message's ids only say which rows
    prompted the run) and count the outcomes for the metrics endpoint."""
    from echonode.dicom.scu import deliver_pending
    from echonode.pipeline.metrics import REGISTRY

    summary = deliver_pending(settings, session_factory)
    for outcome in ("delivered", "committing", "warnings", "retrying", "dead"):
        n = getattr(summary, outcome, 0)
        if n:
            REGISTRY.inc("echonode_deliveries_total", n, outcome=outcome)
    if summary.claimed:
        log.info("delivery: %s", {k: v for k, v in summary.as_dict().items() if v})
    return summary


def presence_window_s(settings: Settings) -> float:
    """How long a worker's row counts as alive after its last beat."""
    return max(30.0, 3 * float(settings.queue.heartbeat_s))


class Presence:
    """The worker's row in ``workers`` (echonode.store.workers), refreshed every
    ``queue.heartbeat_s``: alive, its queues, and whether it holds a model (what
    :func:`echonode.pipeline.modelsel.choose_models` finds on its own disk)."""

    def __init__(self, rt: WorkerRuntime, queues: Sequence[str], device: str) -> None:
        self.rt, self.queues, self.device = rt, ",".join(queues), device
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, name="presence", daemon=True)

    def beat(self) -> None:
        from echonode.pipeline.modelsel import choose_models
        from echonode.store import workers

        choice = choose_models(self.rt.settings, verify=False) if "analyze" in self.queues else None
        with self.rt.Session.begin() as s:
            workers.beat(s, self.rt.worker_id, queues=self.queues, device=self.device,
                         model_available=bool(choice and choice.available), model=choice.message if choice else "")

    def _run(self) -> None:
        every = max(0.2, float(self.rt.settings.queue.heartbeat_s))
        while True:
            try:
                self.beat()
            except Exception as exc:  # the next beat retries
                log.warning("worker presence not recorded: %s", describe_error(exc))
            if self._stop.wait(every):
                return

    def start(self) -> "Presence":
        self._t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._t.join(timeout=5)


# --------------------------------------------------------------------------- registration

_RUNTIME: dict[int, WorkerRuntime] = {}


def runtime(app) -> WorkerRuntime:
    rt = _RUNTIME.get(id(app))
    if rt is None:
        rt = _RUNTIME[id(app)] = WorkerRuntime(app.conf.echonode_settings,
                                                device=getattr(app.conf, "echonode_device", None),
                                                worker_id=getattr(app.conf, "echonode_worker_id", None))
    return rt


def register(app) -> None:
    from echonode.pipeline.celery_app import TASK_ANALYSE, TASK_DELIVER

    @app.task(name=TASK_ANALYSE, bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
    def analyse_study(self, job_id: int) -> str:
        return analyse_job(runtime(app), int(job_id), app=app)

    @app.task(name=TASK_DELIVER, bind=True, acks_late=True, ignore_result=True)
    def deliver(self, outbox_ids: Optional[list] = None) -> str:
        rt = runtime(app)
        return str(deliver_due(rt.settings, rt.Session))
