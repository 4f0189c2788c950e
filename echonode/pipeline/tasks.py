"""Celery tasks (worker side). Messages carry ids only: a job id, outbox ids.

``echonode.analyse_study(job_id)``
    1. claim the job (``queued → running``, conditional UPDATE; a job that is done or
       running elsewhere is left alone: every re-delivery is a no-op),
    2. pick the model (waiting_model with the install instructions when there is none),
    3. decode the study's A4C clips (``dicom.frames``), look up priors of the same patient
       in SQL, run the Interpreter (model loaded once per worker process and kept),
    4. build the SR and overlays (deterministic SOP Instance UIDs: a re-run replaces, never
       duplicates), write them under ``<data_dir>/results/<study uid>/``, store the
       Interpretation and the EchoCLIP-R study embedding, enqueue outbox rows and mark
       the job done — in one transaction,
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
from typing import Any, Optional

from sqlalchemy.exc import SQLAlchemyError

from echonode import audit
from echonode.config import Settings
from echonode.store.db import describe_error

log = logging.getLogger("echonode.worker")


class AnalysisError(Exception):
    """A study cannot be analysed (permanent: the job fails with this message)."""


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
            from echonode.interpret.engine import Interpreter

            from echonode.model.bundle import Bundle

            m = self.settings.model
            t0 = time.perf_counter()
            self._interpreter = None
            # verify the weights' sha256 once per (bundle, checksum), when it is loaded
            clip = Bundle.open(choice.clip.path, verify=True)
            r = Bundle.open(choice.r.path, verify=True) if choice.r is not None else None
            kwargs = dict(device=self.device, precision=m.precision, channel_order=m.channel_order,
                          promptcam_tasks=tuple(m.promptcam_tasks),
                          cache_dir=str(self.settings.cache_path / "prompts"))
            if m.tasks_file:
                from echonode.interpret.prompts import load_catalog
                kwargs["tasks"] = load_catalog(m.tasks_file)
            self._interpreter = Interpreter(clip, r, **kwargs)
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
    def __init__(self, rt: WorkerRuntime, job_id: int) -> None:
        self.rt, self.job_id = rt, job_id
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, name=f"heartbeat-{job_id}", daemon=True)

    def _run(self) -> None:
        from echonode.store import results as rs

        every = max(0.2, float(self.rt.settings.queue.heartbeat_s))
        while not self._stop.wait(every):
            try:
                with self.rt.Session.begin() as s:
                    rs.heartbeat(s, self.job_id, self.rt.worker_id)
            except Exception as exc:  # the next beat retries
                log.warning("job %d: heartbeat failed: %s", self.job_id, exc)

    def __enter__(self) -> "_Heartbeat":
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join(timeout=5)


# --------------------------------------------------------------------------- analysis

def _safe_path(settings: Settings, rel: str) -> Path:
    """An instance path from SQL, resolved and checked to lie under data_dir."""
    base = settings.data_path
    p = Path(rel)
    p = (p if p.is_absolute() else base / p).resolve()
    if base != p and base not in p.parents:
        raise AnalysisError(f"instance path outside the data directory refused: {rel}")
    return p


def _load_inputs(rt: WorkerRuntime, ctx) -> tuple[list, list, list[str]]:
    """Decode the study's clips: ``(clip_inputs, source_datasets, warnings)``."""
    import pydicom

    from echonode.dicom.frames import FrameDecodeError, load_clip
    from echonode.interpret.engine import ClipInput
    from echonode.interpretation import ClipRef
    from echonode.model.preprocess import sample_indices

    m = rt.settings.model
    inputs, sources, warnings = [], [], []
    for c in ctx.clips:
        path = _safe_path(rt.settings, c.path)
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            n = int(c.number_of_frames or getattr(ds, "NumberOfFrames", 1) or 1)
            idx = sample_indices(n, limit=m.frames * m.frame_stride, stride=m.frame_stride)
            clip = load_clip(path, indices=idx, sector_mask=m.sector_mask)
        except FrameDecodeError as exc:
            warnings.append(f"clip {c.sop_instance_uid} not analysed: {exc.reason}")
            log.warning("job %d: clip %s not analysed: %s", ctx.job_id, c.sop_instance_uid, exc.reason)
            continue
        except (OSError, pydicom.errors.InvalidDicomError) as exc:
            warnings.append(f"clip {c.sop_instance_uid} unreadable: {type(exc).__name__}")
            log.warning("job %d: clip %s unreadable: %s", ctx.job_id, c.sop_instance_uid, exc)
            continue
        ref = ClipRef(sop_instance_uid=c.sop_instance_uid, series_instance_uid=c.series_instance_uid,
                      sop_class_uid=c.sop_class_uid, path=c.path, n_frames=clip.n_frames,
                      frames_used=tuple(int(i) for i in clip.indices))
        inputs.append(ClipInput(ref=ref, frames=clip.frames))
        sources.append(ds)
    if not inputs:
        raise AnalysisError("no clip of the study could be decoded" + (f" ({'; '.join(warnings)})" if warnings else ""))
    return inputs, sources, warnings


def analyse_job(rt: WorkerRuntime, job_id: int, app=None) -> str:
    """The body of ``echonode.analyse_study``. Returns a short outcome word."""
    from echonode.pipeline.modelsel import choose_models
    from echonode.store import results as rs

    with rt.Session() as s:
        ctx = rs.job_context(s, job_id)
    if ctx is None:
        log.warning("job %d: no such job (message ignored)", job_id)
        return "missing"
    if ctx.state != "queued":
        log.info("job %d is %s: nothing to do", job_id, ctx.state)
        return f"skipped-{ctx.state}"
    choice = choose_models(rt.settings, verify=False)   # presence; weights verified when loaded
    if not choice.available:
        with rt.Session.begin() as s:
            rs.set_waiting_model(s, choice.message, [job_id])
        log.warning("job %d waits for a model: %s", job_id, choice.message)
        return "waiting_model"
    with rt.Session.begin() as s:
        if not rs.start_job(s, job_id, rt.worker_id):
            return "skipped-claimed"
    log.info("job %d: analysing %d clip(s)%s", job_id, len(ctx.clips),
             " with the DEMO MODEL — NOT FOR CLINICAL USE" if choice.demo else "")
    t0 = time.perf_counter()
    try:
        with _Heartbeat(rt, job_id):
            interp, sources, embedding = _analyse(rt, ctx, choice)
            n_objects, outbox_ids = _store(rt, ctx, interp, sources, embedding, choice)
    except AnalysisError as exc:
        with rt.Session.begin() as s:
            rs.fail_job(s, job_id, str(exc), rt.worker_id)
        log.error("job %d failed: %s", job_id, exc)
        return "failed"
    except SQLAlchemyError as exc:
        # PostgreSQL messages quote statement values (e.g. the PatientID of the priors
        # query): keep only the error class and SQLSTATE, in the job row and the log.
        reason = describe_error(exc)
        with rt.Session.begin() as s:
            rs.fail_job(s, job_id, reason, rt.worker_id)
        log.error("job %d failed: %s", job_id, reason)
        return "failed"
    except Exception as exc:
        with rt.Session.begin() as s:
            rs.fail_job(s, job_id, f"{type(exc).__name__}: {exc}", rt.worker_id)
        log.exception("job %d failed", job_id)
        return "failed"
    rt.analyses += 1
    log.info("job %d done in %.1f s: SR + %d overlay(s) written, %d outbox row(s)%s", job_id,
             time.perf_counter() - t0, n_objects - 1, len(outbox_ids),
             "" if rt.settings.delivery.destinations else " (no delivery.destinations configured)")
    if outbox_ids and app is not None:
        try:
            from echonode.pipeline.celery_app import send_deliver
            send_deliver(app, outbox_ids)
        except Exception as exc:  # the dispatcher kicks deliveries of due rows anyway
            log.warning("job %d: could not queue delivery: %s", job_id, exc)
    return "done"


def _analyse(rt: WorkerRuntime, ctx, choice):
    from echonode.interpret.engine import PriorEmbedding
    from echonode.store import results as rs

    interpreter = rt.interpreter(choice)
    inputs, sources, warnings = _load_inputs(rt, ctx)
    priors = []
    if choice.r is not None:
        with rt.Session() as s:
            rows = rs.prior_embeddings(s, ctx.patient_key, ctx.study_instance_uid, ctx.study_date,
                                       choice.r.weights_sha256)
        priors = [PriorEmbedding(study_instance_uid=r.study_instance_uid, study_date=r.study_date,
                                 embedding=r.embedding, weights_sha256=r.model_sha256) for r in rows]
    interp, embedding = interpreter.interpret_with_embedding(ctx.study_instance_uid, inputs, priors)
    if warnings:
        import dataclasses
        interp = dataclasses.replace(interp, warnings=tuple(interp.warnings) + tuple(warnings))
    return interp, sources, embedding


def _store(rt: WorkerRuntime, ctx, interp, sources, embedding, choice) -> tuple[int, list[int]]:
    """SR + overlays to files, then ONE transaction: interpretation, embedding, job done, outbox rows.

    Returns (objects written, outbox row ids)."""
    from echonode.dicom.overlays import build_overlays
    from echonode.dicom.sr import build_sr
    from echonode.pipeline import outbox_glue
    from echonode.store import results as rs

    sr = build_sr(interp, sources)
    overlays = build_overlays(interp, sources) if interp.promptcams else []
    datasets = [sr, *overlays]
    objects = outbox_glue.write_objects(rt.settings, datasets)
    s = rt.Session()
    try:
        rs.save_interpretation(s, ctx.job_id, interp)
        if embedding is not None and choice.r is not None:
            rs.save_study_embedding(s, ctx.study_instance_uid, ctx.patient_key, ctx.study_date,
                                    choice.r.weights_sha256, embedding)
        if not rs.finish_job(s, ctx.job_id, rt.worker_id):
            # the lease expired and another worker took the job over: leave it to that one
            raise RuntimeError("job was taken over by another worker (lease expired); results left to it")
        audit.record(s, audit.analysis(interp, objects, sources))  # study analysed + result created
        ids = outbox_glue.enqueue(s, rt.settings, objects)  # commits all of the above
    except BaseException:
        s.rollback()
        raise
    finally:
        s.close()
    return len(datasets), ids


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
        from echonode.pipeline import outbox_glue
        rt = runtime(app)
        summary = outbox_glue.deliver(rt.settings, rt.Session, [int(i) for i in (outbox_ids or [])])
        return str(summary)
