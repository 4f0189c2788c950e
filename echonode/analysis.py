"""THE application path: a study's clips → Interpretation → SR, overlays and outbox rows.

Everything that analyses a study goes through here: the worker
(:mod:`echonode.pipeline.tasks`), ``echonode analyze``, ``echonode demo`` (through the
node it starts) and the benchmarks. This is the one module that composes the model
side (``echonode.interpret``) with the DICOM side (``echonode.dicom``):

1. :func:`make_interpreter` — the Interpreter, with the site's task catalogue
   (``model.tasks_file``), built in one place;
2. :func:`read_instance` — the one parse of a received file: the header the SR copies
   and the pixel data the decoder reads lazily;
3. :func:`analyse` — decode every clip (a clip that fails, whatever the error, is left
   out with a warning in the Interpretation and the SR; only a study with no usable
   clip fails), interpret, keep the EchoCLIP-R study embedding;
4. :func:`result_datasets` — the SR and the PromptCAM overlays; the codes of each task
   are those the Interpreter copied from the catalogue into the result;
5. :func:`publish` — write the objects under ``<data_dir>/results/<study>/``, then one
   transaction: Interpretation, study embedding, job done, one outbox row per object and
   destination.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

from echonode import audit
from echonode.config import Settings

if TYPE_CHECKING:  # pragma: no cover
    from pydicom import Dataset

    from echonode.interpretation import Interpretation

log = logging.getLogger("echonode.analysis")

__all__ = ["AnalysisError", "JobTakenOver", "ClipSource", "Analysis", "Published", "load_task_catalog",
           "make_interpreter", "read_instance", "load_clips", "analyse", "result_datasets", "publish",
           "pseudo_study_uid"]

#: pixel data above this size is not read by the header parse; the decoder reads only the
#: frames it samples straight from the file
_DEFER_BYTES = 4 * 1024 * 1024


class AnalysisError(Exception):
    """A study cannot be analysed (permanent: the job fails with this message).

    ``log_message``: what the log may say (the message itself can quote a clip's header)."""

    def __init__(self, message: str, log_message: Optional[str] = None):
        super().__init__(message)
        self.log_message = log_message or message


class JobTakenOver(RuntimeError):
    """The job's lease expired and another worker took it over: its results are left to that one."""


@dataclass(frozen=True)
class ClipSource:
    """One clip to analyse: a file and what is already known about it.

    The worker fills the store key, the UIDs and frame count from the SQL index (what the
    receive side parsed; the bytes are fetched from the store while the clip decodes); ``echonode analyze`` passes the ``header`` it read while grouping files by
    study. Whatever is missing is read from the file, once.
    """

    path: Path
    key: str = ""                 # the object's key in the node's store (the worker); "" = ``path`` is a local file
    sop_instance_uid: str = ""
    series_instance_uid: str = ""
    sop_class_uid: str = ""
    number_of_frames: Optional[int] = None
    header: Any = None            # pydicom Dataset (pixel data deferred), or None


@dataclass
class Analysis:
    """What :func:`analyse` concluded: the Interpretation, the study embedding (EchoCLIP-R;
    None without one) and the headers of the analysed DICOM clips (the SR's sources)."""

    interp: "Interpretation"
    embedding: Any = None
    headers: list = field(default_factory=list)


@dataclass
class Published:
    objects: list                 # echonode.store.outbox.OutboxObject, SR first
    outbox_ids: list[int]


# --------------------------------------------------------------------------- model

def load_task_catalog(settings: Settings) -> dict:
    """The task catalogue in use: built-in tasks plus the site's ``model.tasks_file``."""
    from echonode.interpret.prompts import load_catalog

    return load_catalog(settings.model.tasks_file or None)


def make_interpreter(settings: Settings, clip_bundle, r_bundle=None, *, device: Optional[str] = None,
                     precision: Optional[str] = None, promptcam_tasks: Optional[Sequence[str]] = None):
    """The Interpreter for ``settings`` (device, precision, channel order, PromptCAM tasks,
    prompt cache and the site's task catalogue), with explicit overrides."""
    from echonode.interpret.engine import Interpreter

    m = settings.model
    return Interpreter(
        clip_bundle, r_bundle, device=device or m.device, precision=precision or m.precision,
        channel_order=m.channel_order, tasks=load_task_catalog(settings),
        promptcam_tasks=tuple(m.promptcam_tasks if promptcam_tasks is None else promptcam_tasks),
        promptcam_cine=m.promptcam_cine, cache_dir=settings.cache_path / "prompts")


# --------------------------------------------------------------------------- clips

def read_instance(path) -> "Dataset":
    """Parse a DICOM file once: the header, with large pixel data deferred (read on demand)."""
    import warnings

    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a cart's charset typo is not a reason to stop; the SR fixes it
        return pydicom.dcmread(path, defer_size=_DEFER_BYTES)


def pseudo_study_uid(path: Path) -> str:
    """A deterministic UID for a video file (no DICOM study), derived from its resolved path."""
    from echonode.dicom.uids import derived_uid

    return derived_uid(str(Path(path).resolve()))


def _is_video(path: Path) -> bool:
    from echonode.dicom.frames import VIDEO_SUFFIXES

    return path.suffix.lower() in VIDEO_SUFFIXES


def _load_clip(settings: Settings, src: ClipSource, path: Path):
    """(ClipInput, header or None) for one clip read from ``path``; raises whatever decoding raises."""
    from echonode.dicom.frames import count_frames, load_clip
    from echonode.interpret.engine import ClipInput
    from echonode.interpretation import ClipRef
    from echonode.model.preprocess import sample_indices

    m = settings.model
    if _is_video(path):
        n = count_frames(path)
        clip = load_clip(path, indices=sample_indices(n, limit=m.frames * m.frame_stride, stride=m.frame_stride),
                         sector_mask=m.sector_mask)
        ref = ClipRef(sop_instance_uid=src.sop_instance_uid or pseudo_study_uid(path) + ".1", path=str(path),
                      n_frames=clip.n_frames, frames_used=tuple(int(i) for i in clip.indices))
        header = None
    else:
        header = src.header if src.header is not None else read_instance(path)
        n = int(src.number_of_frames or count_frames(header))
        clip = load_clip(header, indices=sample_indices(n, limit=m.frames * m.frame_stride, stride=m.frame_stride),
                         sector_mask=m.sector_mask)
        # decoded: the header stays (the SR's source), the pixel data goes (memory)
        for tag in [t for t in header.keys() if t.group == 0x7FE0]:
            del header[tag]
        ref = ClipRef(sop_instance_uid=src.sop_instance_uid or str(header.SOPInstanceUID),
                      series_instance_uid=src.series_instance_uid or str(header.get("SeriesInstanceUID", "")),
                      sop_class_uid=src.sop_class_uid or str(header.SOPClassUID), path=src.key or str(src.path),
                      n_frames=clip.n_frames, frames_used=tuple(int(i) for i in clip.indices))
    if len(clip.frames) == 0:
        raise ValueError("no frames")
    return ClipInput(ref=ref, frames=clip.frames), header


def load_clips(settings: Settings, clips: Sequence[ClipSource]) -> tuple[list, list, list[str]]:
    """Decode every clip: ``(clip inputs, headers, warnings)``. One bad clip is one bad clip."""
    import contextlib

    from echonode.dicom.frames import FrameDecodeError
    from echonode.storage import open_storage

    store = open_storage(settings) if any(c.key for c in clips) else None
    inputs, headers, warnings = [], [], []
    for src in clips:
        name = src.sop_instance_uid or Path(src.path).name
        with contextlib.ExitStack() as stack:
            try:
                # only a missing object is this clip's fault; any other error of the store
                # (down, refused, a local disk full) is the job's, which is tried again later
                path = stack.enter_context(store.fetch(src.key)) if store is not None and src.key \
                    else Path(src.path)
            except FileNotFoundError:
                reason = logged = "the instance is missing from the node's store"
            else:
                try:
                    ci, header = _load_clip(settings, src, path)
                except FrameDecodeError as exc:
                    reason = logged = exc.reason
                except Exception as exc:  # any damage in a peer's file: struct.error, ValueError, KeyError, ...
                    # the message may quote a header value: the log gets the error class only
                    reason, logged = f"{type(exc).__name__}: {exc}", type(exc).__name__
                else:
                    inputs.append(ci)
                    if header is not None:
                        headers.append(header)
                    continue
        # the reason names the defect, not where the node keeps its files (the SR goes to the PACS)
        reason = reason.replace(str(src.path), Path(src.path).name)
        log.warning("clip %s not analysed: %s", name, logged.replace(str(src.path), Path(src.path).name))
        warnings.append(f"clip {name} not analysed: {reason}")
    return inputs, headers, warnings


# --------------------------------------------------------------------------- analyse

def analyse(settings: Settings, interpreter, study_uid: str, clips: Sequence[ClipSource],
            priors: Sequence = (), notes: Sequence[str] = ()) -> Analysis:
    """Decode the study's clips and interpret them. Raises :class:`AnalysisError` when no
    clip is usable; a clip that is not is named in the Interpretation's warnings, and so are
    ``notes`` (e.g. whether priors from the PACS were available)."""
    from echonode.interpret.engine import NoUsableClipError

    inputs, headers, warnings = load_clips(settings, clips)
    if not inputs:
        raise AnalysisError("no clip of the study could be decoded" + (f" ({'; '.join(warnings)})" if warnings else ""),
                            f"no clip of the study could be decoded ({len(warnings)} clip(s); reasons in the job row)")
    try:
        interp, embedding = interpreter.interpret_with_embedding(study_uid, inputs, priors)
    except NoUsableClipError as exc:
        raise AnalysisError("; ".join([str(exc), *warnings]),
                            "no clip of the study could be preprocessed (reasons in the job row)") from exc
    warnings += [n for n in notes if n]
    if warnings:
        interp = dataclasses.replace(interp, warnings=tuple(interp.warnings) + tuple(warnings))
    used = {c.sop_instance_uid for c in interp.clips}
    headers = [h for h in headers if str(h.SOPInstanceUID) in used]
    return Analysis(interp=interp, embedding=embedding, headers=headers)


def result_datasets(interp: "Interpretation", headers: Sequence, *, pdf: bool = False) -> list:
    """The result objects for ``interp``, not yet written: the SR first, then the key-results
    page (and its PDF when ``pdf``), the PromptCAM overlays and their cine versions."""
    from echonode.dicom.overlays import build_cine_overlays, build_overlays
    from echonode.dicom.page import build_page, build_page_pdf
    from echonode.dicom.sr import build_sr

    headers = list(headers)
    now = dt.datetime.now(dt.timezone.utc)
    out = [build_sr(interp, headers), build_page(interp, headers, now=now)]
    if pdf:
        out.append(build_page_pdf(interp, headers, now=now, pixels=out[1].pixel_array))
    if interp.promptcams:
        out += build_overlays(interp, headers)
        out += build_cine_overlays(interp, headers)
    return out


def publish(settings: Settings, session, analysis: Analysis, *, job_id: Optional[int] = None,
            lease: Optional[str] = None, study_version: int = 0, patient_key: str = "",
            study_date: str = "") -> Published:
    """Write the SR and overlays to the node's store (``results/<study>/<SOP>.dcm``), then in ONE transaction on
    ``session``: the Interpretation, the EchoCLIP-R study embedding, the job done (when
    ``job_id``; ``lease`` is the token :func:`echonode.store.jobs.start_job` gave), one
    outbox row per object and configured destination. Commits, or rolls back and raises
    (:class:`JobTakenOver` when the job's lease went to another worker).

    ``study_version`` (the job's) enters the result UIDs: each version of a study gets an
    SR and overlays of its own, and the SR names the last published SR of an earlier
    version as its predecessor. The same version analysed again gets the same UIDs, so a
    re-run rewrites the same files and resets the same outbox rows.
    """
    from echonode.dicom.scu import write_results
    from echonode.dicom.sr import SR_SOP_CLASS_UID, sr_uids
    from echonode.storage import open_storage
    from echonode.interpretation import ResultRef
    from echonode.store import interpretations, jobs, outbox

    interp = analysis.interp
    superseded = False
    if study_version:
        # held until commit: the checks below and the rows written agree for this study
        interpretations.lock_study_results(session, interp.study_instance_uid)
        superseded = interpretations.later_result_exists(session, interp.study_instance_uid, study_version)
        prev = interpretations.previous_result(session, interp.study_instance_uid, study_version)
        replaces = None if prev is None else ResultRef(
            study_instance_uid=prev.study_instance_uid, series_instance_uid=prev.series_instance_uid,
            sop_instance_uid=prev.sop_instance_uid, sop_class_uid=SR_SOP_CLASS_UID, study_version=prev.study_version)
        interp = dataclasses.replace(interp, study_version=int(study_version), replaces=replaces)
        analysis.interp = interp
    if job_id is not None and not jobs.owns(session, job_id, lease or ""):
        session.rollback()
        raise JobTakenOver("job was taken over by another worker (lease expired); results left to it")
    # a later version of the study was published while this one ran: its result is the
    # current one; this one is recorded (job done) but neither written nor sent
    try:
        objects = [] if superseded else write_results(
            open_storage(settings), result_datasets(interp, analysis.headers, pdf=settings.results.pdf))
        if superseded:
            log.info("study version %d superseded by a later version already published: result not sent",
                     study_version)
        interpretations.save_interpretation(session, job_id, interp, None if superseded else sr_uids(interp))
        r_model = interp.longitudinal.model if interp.longitudinal is not None else None
        if analysis.embedding is not None and r_model is not None:
            interpretations.save_study_embedding(session, interp.study_instance_uid, patient_key, study_date,
                                                 r_model.weights_sha256, analysis.embedding)
        if job_id is not None and not jobs.finish_job(session, job_id, lease or ""):
            raise JobTakenOver("job was taken over by another worker (lease expired); results left to it")
        events = audit.analysis(interp, objects, analysis.headers)   # analysed + result created
        audit.record(session, events if objects else events[:1])      # superseded: analysed only
        dests = [d.name for d in settings.delivery.destinations]
        ids = list(outbox.add(session, objects, dests)) if dests and objects else []
        session.commit()
    except BaseException:
        session.rollback()
        raise
    return Published(objects=objects, outbox_ids=ids)
