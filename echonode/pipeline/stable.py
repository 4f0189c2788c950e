"""Stable-study detection: a study is complete when nothing arrived for ``stable.delay_s``.

The state lives in SQL (``studies.state``, ``last_received_at``, ``version``), not in
timers, so a restart neither loses nor repeats a transition. Each tick calls
:func:`echonode.store.index.stabilise_studies`, which moves a study out of
``receiving`` with a conditional UPDATE and creates at most one ``AnalysisJob`` per
(study, version) — safe with several node processes on one database.

A new instance for a study that is already ``stable``/``queued`` (or later states)
sends it back to ``receiving`` with ``version + 1``; when it is stable again a new job
for the new version is created (the previous job is left as it is).
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, Optional

from echonode.config import Settings
from echonode.store.db import describe_error
from echonode.store.index import CreatedJob, stabilise_studies

LOG = logging.getLogger("echonode.stable")


class StableScheduler:
    """Runs :meth:`tick` every ``stable.poll_s`` seconds in a daemon thread.

    ``on_job(job: CreatedJob)`` is called after each job row is committed (the pipeline
    uses it to enqueue the Celery task; the row is the source of truth either way).
    """

    def __init__(self, settings: Settings, sessions, on_job: Optional[Callable[[CreatedJob], None]] = None):
        self.settings = settings
        self.sessions = sessions
        self.on_job = on_job
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def tick(self) -> list[CreatedJob]:
        jobs, stabilised = stabilise_studies(self.sessions, self.settings.stable.delay_s)
        for job in jobs:
            LOG.info("study stable: analysis job %d created (study version %d)", job.job_id, job.study_version)
            if self.on_job:
                try:
                    self.on_job(job)
                except Exception:
                    LOG.exception("on_job callback failed for job %d", job.job_id)
        if stabilised > len(jobs):
            LOG.info("%d study(ies) stable with no clip to analyse", stabilised - len(jobs))
        return jobs

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception as exc:  # the database may be briefly unavailable; keep going
                LOG.error("stable-study tick failed: %s", describe_error(exc) if hasattr(exc, "orig")
                          else f"{type(exc).__name__}: {str(exc)[:200]}")
            self._stop.wait(max(0.05, float(self.settings.stable.poll_s)))

    def start(self) -> "StableScheduler":
        self._thread = threading.Thread(target=self._run, name="stable-scheduler", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
