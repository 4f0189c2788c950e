"""The pipeline side of ``echonode serve``: dispatcher, embedded worker, metrics endpoint.

* :class:`Dispatcher` turns ``analysis_jobs`` rows (created by the stable-study scheduler)
  into Celery messages exactly once: each job's ``job_dispatch`` row is claimed with a
  conditional UPDATE, so several node processes, or a restarted one, never send a job
  twice. It also re-queues jobs whose worker died (heartbeat older than
  ``queue.lease_s``), moves jobs to ``waiting_model`` while no model is installed and
  back to ``queued`` once one is, and asks for deliveries of due outbox rows.
* :class:`EmbeddedWorker` runs ``echonode worker`` as a child process (the very same
  Celery worker code as on a GPU server) and restarts it if it dies.
* :func:`start_for_serve` wires them up for ``serve``; :meth:`PipelineService.stop` stops them.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Optional

from echonode.config import Settings

log = logging.getLogger("echonode.pipeline")


def process_name(role: str) -> str:
    return f"{role}@{socket.gethostname()}:{os.getpid()}"


class Dispatcher:
    """One pass per :meth:`tick`; :meth:`run` loops until ``stop`` is set."""

    MODEL_CHECK_S = 10.0

    def __init__(self, settings: Settings, session_factory, app, *, who: Optional[str] = None) -> None:
        self.settings = settings
        self.Session = session_factory
        self.app = app
        self.who = who or process_name("dispatcher")
        self._model_checked_at = 0.0
        self._model_ok: Optional[bool] = None
        self._model_msg = ""
        self._last_deliver_kick = 0.0
        self._last_purge = 0.0
        self._wake = threading.Event()

    # -- model presence (cheap, cached for MODEL_CHECK_S)
    def model_available(self, force: bool = False) -> bool:
        now = time.monotonic()
        if force or self._model_ok is None or now - self._model_checked_at > self.MODEL_CHECK_S:
            from echonode.pipeline.modelsel import choose_models
            from echonode.pipeline.tasks import presence_window_s
            from echonode.store import workers
            from echonode.store.db import describe_error

            choice = choose_models(self.settings, verify=False)
            available, message = choice.available, choice.message
            if not available:
                # a receiver without the bundles: a live analysis worker that holds a model will do
                try:
                    with self.Session() as s:
                        remote = workers.analysis_model(s, presence_window_s(self.settings))
                except Exception as exc:  # the database: the next tick asks again
                    log.warning("workers not readable: %s", describe_error(exc))
                    remote = None
                if remote:
                    available, message = True, remote
            if available != self._model_ok:
                if available:
                    log.info("analysis model available: %s", message)
                else:
                    log.warning("%s", message)
            self._model_ok, self._model_msg = available, message
            self._model_checked_at = now
        return bool(self._model_ok)

    def tick(self) -> dict:
        from echonode.pipeline.celery_app import send_analyse
        from echonode.store import jobs, status

        st = self.settings
        out = {"sent": 0, "requeued": 0, "failed": 0, "waiting_model": 0, "released": 0}
        with self.Session.begin() as s:
            requeued, failed = jobs.reap_stale_jobs(s, lease_s=st.queue.lease_s, max_attempts=st.queue.max_attempts)
        out["requeued"], out["failed"] = len(requeued), len(failed)
        for jid in requeued:
            log.warning("job %d: worker stopped heart-beating for %.0f s; re-queued", jid, st.queue.lease_s)
        for jid in failed:
            log.error("job %d failed: its worker stopped %d times", jid, st.queue.max_attempts)

        with self.Session() as s:
            counts = status.job_counts(s)
        if counts.get("queued", 0) or counts.get("waiting_model", 0):
            available = self.model_available()
            with self.Session.begin() as s:
                if not available:
                    out["waiting_model"] = jobs.set_waiting_model(s, self._model_msg)
                elif counts.get("waiting_model", 0):
                    out["released"] = jobs.release_waiting_model(s)
            if out["waiting_model"]:
                log.warning("%d job(s) waiting for a model: %s", out["waiting_model"], self._model_msg)
            if out["released"]:
                log.info("%d waiting job(s) queued again: a model is installed", out["released"])
            if available:
                self._resend_lost()
                with self.Session.begin() as s:
                    jobs.ensure_dispatch_rows(s)
                with self.Session() as s:
                    todo = jobs.jobs_to_dispatch(s, redispatch_after_s=st.queue.visibility_timeout_s)
                for job_id, seen in todo:
                    task_id = f"job-{job_id}-{seen + 1}"
                    with self.Session.begin() as s:
                        claimed = jobs.claim_dispatch(s, job_id, seen, self.who, task_id)
                    if not claimed:
                        continue  # another node process took it
                    try:
                        send_analyse(self.app, job_id, task_id)
                    except Exception as exc:
                        log.error("job %d: could not reach the broker (%s); will retry", job_id, exc)
                        with self.Session.begin() as s:
                            jobs.reset_dispatch(s, [job_id])
                        break
                    from echonode.pipeline.metrics import REGISTRY
                    REGISTRY.inc("echonode_jobs_dispatched_total")
                    out["sent"] += 1
                    log.info("job %d sent to queue analyze (%s)", job_id, task_id)
        self._kick_delivery()
        self._purge_broker()
        return out

    def _resend_lost(self) -> None:
        """A queued job sent more than ``queue.lease_s`` ago while the analyze queue is empty
        has lost its message (a worker died after taking it, before starting the job): send
        it again. A duplicate is harmless — the job is claimed once."""
        from echonode.pipeline.celery_app import ANALYZE_QUEUE, queue_depths
        from echonode.store import jobs

        with self.Session() as s:
            stale = jobs.stale_dispatches(s, self.settings.queue.lease_s)
        if not stale or queue_depths(self.settings, self.app).get(ANALYZE_QUEUE) != 0:
            return
        with self.Session.begin() as s:
            jobs.reset_dispatch(s, stale)
        for jid in stale:
            log.warning("job %d: its message is no longer queued and the job never started; it is sent again "
                        "unless a worker starts it first", jid)

    def _kick_delivery(self) -> None:
        """Ask for a delivery run when outbox rows are due (retries after backoff)."""
        now = time.monotonic()
        if now - self._last_deliver_kick < max(2.0, self.settings.delivery.backoff_initial_s):
            return
        from echonode.store import outbox
        try:
            with self.Session() as s:
                due = outbox.due_count(s)
        except Exception:
            log.debug("outbox not readable", exc_info=True)
            return
        if due:
            from echonode.pipeline.celery_app import send_deliver
            try:
                send_deliver(self.app)
                self._last_deliver_kick = now
            except Exception as exc:
                log.warning("could not queue a delivery run: %s", exc)

    def _purge_broker(self) -> None:
        now = time.monotonic()
        if now - self._last_purge < 3600:
            return
        self._last_purge = now
        from echonode.pipeline.celery_app import broker_sqlite_path
        path = broker_sqlite_path(self.settings.broker)
        if path is None or not path.exists():
            return
        from sqlalchemy import create_engine
        from echonode.store.jobs import purge_consumed_broker_messages
        eng = create_engine(f"sqlite:///{path}", connect_args={"timeout": 60})
        try:
            n = purge_consumed_broker_messages(eng)
            if n:
                log.info("removed %d consumed messages from the embedded broker", n)
        except Exception:
            log.debug("broker purge failed", exc_info=True)
        finally:
            eng.dispose()

    def wake(self, *_args) -> None:
        """Run the next pass now (the stable-study scheduler calls this for each new job)."""
        self._wake.set()

    def run(self, stop: threading.Event) -> None:
        poll = max(0.2, float(self.settings.stable.poll_s))
        while not stop.is_set():
            try:
                self.tick()
            except Exception:
                log.exception("dispatcher pass failed; retrying in %.1f s", poll)
            self._wake.wait(poll)
            self._wake.clear()


def terminate(proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """SIGTERM a child process, wait up to ``timeout`` s, then SIGKILL it."""
    if proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)
    except ProcessLookupError:
        pass


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: the embedded worker gets SIGTERM when ``serve`` dies, even by kill -9."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class EmbeddedWorker:
    """``echonode worker`` as a supervised child process of ``serve``."""

    def __init__(self, settings: Settings, config_path: Optional[str] = None,
                 queues: str = "analyze,deliver", device: Optional[str] = None) -> None:
        self.settings = settings
        self.config_path = config_path
        self.queues = queues
        self.device = device or settings.queue.embedded_worker_device or settings.model.device
        self.proc: Optional[subprocess.Popen] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._supervise, name="embedded-worker", daemon=True)
        self.restarts = 0

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "echonode", "worker", "--queues", self.queues, "--device", self.device,
               "--embedded"]
        if self.config_path:
            cmd += ["--config", str(self.config_path)]
        return cmd

    def _spawn(self) -> subprocess.Popen:
        env = dict(os.environ)  # the child gets exactly our settings: same config file and environment
        p = subprocess.Popen(self.command(), env=env, stdin=subprocess.DEVNULL, start_new_session=True,
                             preexec_fn=_die_with_parent)
        log.info("embedded worker started (pid %d, queues %s, device %s)", p.pid, self.queues, self.device)
        return p

    def _supervise(self) -> None:
        backoff = 1.0
        while not self._stop.is_set():
            self.proc = self._spawn()
            started = time.monotonic()
            while not self._stop.is_set():
                if self.proc.poll() is not None:
                    break
                self._stop.wait(0.5)
            if self._stop.is_set():
                break
            rc = self.proc.returncode
            backoff = 1.0 if time.monotonic() - started > 60 else min(backoff * 2, 30.0)
            self.restarts += 1
            log.error("embedded worker exited with status %s; restarting in %.0f s", rc, backoff)
            self._stop.wait(backoff)

    def start(self) -> "EmbeddedWorker":
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if self.proc is not None:
            terminate(self.proc, timeout)   # Celery warm shutdown: finish or hand back the task


class PipelineService:
    def __init__(self, settings: Settings, *, config_path: Optional[str] = None, embedded_worker: Optional[bool] = None,
                 metrics: Optional[bool] = None, extra_metrics=None) -> None:
        from echonode.pipeline.celery_app import make_app
        from echonode.store.db import get_engine, session_factory

        self.settings = settings
        self.Session = session_factory(get_engine(settings.db_url))
        self.app = make_app(settings, with_tasks=False)
        self.dispatcher = Dispatcher(settings, self.Session, self.app)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.dispatcher.run, args=(self._stop,), name="dispatcher",
                                        daemon=True)
        use_worker = settings.queue.embedded_worker if embedded_worker is None else embedded_worker
        self.worker = EmbeddedWorker(settings, config_path) if use_worker else None
        use_metrics = settings.metrics.enabled if metrics is None else metrics
        self.metrics = None
        if use_metrics:
            from echonode.pipeline.metrics import MetricsServer
            try:
                self.metrics = MetricsServer(settings.metrics.host, settings.metrics.port, self.Session,
                                             extra=extra_metrics, alert_after_s=settings.delivery.alert_after_s)
            except OSError as exc:  # the node still serves DICOM without its metrics endpoint
                log.error("metrics endpoint %s:%d not started: %s (set metrics.port, or metrics.enabled = false)",
                          settings.metrics.host, settings.metrics.port, exc)

    def start(self) -> "PipelineService":
        from echonode.pipeline.celery_app import broker_kind
        log.info("pipeline: broker %s, embedded worker %s", broker_kind(self.settings.broker),
                 "on" if self.worker else "off")
        if self.metrics is not None:
            self.metrics.start()
            log.info("metrics on http://%s:%d/metrics", self.settings.metrics.host, self.metrics.port)
        self._thread.start()
        if self.worker is not None:
            self.worker.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.dispatcher.wake()
        self._thread.join(timeout=10)
        if self.worker is not None:
            self.worker.stop()
        if self.metrics is not None:
            self.metrics.stop()
        try:
            self.app.close()
        except Exception:
            pass


def start_for_serve(settings: Settings, scp=None, scheduler=None) -> PipelineService:
    """The pipeline of ``echonode serve``: dispatcher, embedded worker, metrics (with the SCP's lines)."""
    extra = None
    if scp is not None:
        from echonode.pipeline.metrics import scp_lines
        extra = lambda: scp_lines(scp)  # noqa: E731
    svc = PipelineService(settings, config_path=os.environ.get("ECHONODE_CONFIG") or None, extra_metrics=extra)
    if scheduler is not None and getattr(scheduler, "on_job", None) is None:
        scheduler.on_job = svc.dispatcher.wake   # dispatch new jobs at once, not at the next poll
    return svc.start()
