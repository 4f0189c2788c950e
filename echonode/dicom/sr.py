"""Interpretation → Comprehensive 3D SR, TID 1500 Imaging Measurement Report (highdicom).

Document layout (PS3.16 TID 1500; codes in :mod:`echonode.dicom.sr_codes`):

* root CONTAINER (126000, DCM, "Imaging Measurement Report"), language en-US;
* observer context: device observer (TID 1004) ``echonode`` with a UID derived from
  the weights checksum and echonode version, manufacturer, model name;
* procedure reported (40701008, SCT, "Echocardiography");
* Imaging Measurements: one Measurement Group (TID 1501) per task, each with a
  tracking identifier + tracking UID (TID 4108), algorithm identification (TID 4019:
  EchoCLIP / EchoCLIP-R, bundle name and weights sha256, echonode version), the
  coded method, finding / finding site, source images (the analysed clips and the
  frames used), the NUM value (LVEF (18043-0, LN) in ``%``, PASP in ``mm[Hg]``),
  the similarity score and threshold as NUMs, the CODE qualitative evaluation when
  a call exists, and TEXT items stating the threshold source ("uncalibrated" spelled
  out) and the method;
* one further group for the EchoCLIP-R longitudinal comparison (prior study UID and
  date, similarity, flags worded for review);
* a (C0034375, UMLS, "Qualitative Evaluations") container with the disclaimer, the
  DEMO banner when the model is the demo model, and processing notes.

The SR lives in the analysed study (Study Instance UID and patient/study modules
copied from the sources by highdicom) in a series of its own. SOP Instance UID and
Series Instance UID are deterministic (:func:`echonode.dicom.result_uids.result_uid`),
so re-running the same model version on the same study yields the same object.

This module never imports torch.
"""

from __future__ import annotations

import logging
import math
from typing import Iterable, Optional, Sequence

import highdicom as hd
from highdicom.sr import (
    AlgorithmIdentification, ContainerContentItem, FindingSite, Measurement,
    MeasurementReport, MeasurementsAndQualitativeEvaluations, ObservationContext,
    ObserverContext, DeviceObserverIdentifyingAttributes, QualitativeEvaluation,
    RelationshipTypeValues, SourceImageForMeasurementGroup, TextContentItem, TrackingIdentifier,
    UIDRefContentItem, DateContentItem,
)
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom import Dataset
from pydicom.sr.codedict import codes

from echonode import __version__
from echonode.dicom import sr_codes as C
from echonode.dicom.result_uids import object_uid, result_uid
from echonode.dicom.uids import check_uid, derived_uid
from echonode.interpretation import (
    CALL_ABSENT, CALL_PRESENT, DEMO_BANNER, THRESHOLD_CALIBRATED, THRESHOLD_NONE,
    THRESHOLD_PUBLISHED, Interpretation, TaskResult,
)

log = logging.getLogger(__name__)

__all__ = ["build_sr", "check_sources", "SRBuildError", "MANUFACTURER", "SR_SERIES_NUMBER", "sr_uids", "algorithm_name"]

MANUFACTURER = "echonode"
SR_SERIES_NUMBER = 9901
#: Comprehensive 3D SR Storage: the class of every result SR (what a predecessor reference names)
SR_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.88.34"
CONTAINS = RelationshipTypeValues.CONTAINS


class SRBuildError(ValueError):
    """The Interpretation and the source datasets cannot make a valid SR."""


def algorithm_name(architecture: str) -> str:
    """The published model's name for an architecture id."""
    if architecture == "echo-clip-r":
        return "EchoCLIP-R"
    if architecture == "tiny":
        return "EchoCLIP (tiny demo)"
    return "EchoCLIP"


def sr_uids(interp: Interpretation) -> tuple[str, str]:
    """(SOP Instance UID, Series Instance UID) of the SR for ``interp``."""
    return object_uid(interp, "sr"), object_uid(interp, "sr-series")


def device_uid(weights_sha256: str, version: str) -> str:
    """The device observer UID: one per (weights, echonode version), study independent."""
    return derived_uid("echonode-device", weights_sha256.lower(), version)


def _finite(x) -> bool:
    try:
        return x is not None and math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def _same(a, b) -> bool:
    return (a.value, a.scheme_designator) == (b.value, b.scheme_designator)


def _text(name, value: str, rel=CONTAINS) -> TextContentItem:
    return TextContentItem(name=name, value=str(value), relationship_type=rel)


def _fmt(x: Optional[float], nd: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


def _threshold_text(t: TaskResult, calibration: Optional[str]) -> str:
    if t.threshold_source == THRESHOLD_CALIBRATED:
        src = f"calibrated on local data ({calibration})" if calibration else "calibrated on local data"
        return f"{src}; threshold {_fmt(t.threshold)}" if t.threshold is not None else f"{src}; level thresholds"
    if t.threshold_source == THRESHOLD_PUBLISHED:
        return f"published threshold {_fmt(t.threshold)} from the EchoCLIP reference code (not calibrated locally)"
    if t.mode == "binary":
        return ("uncalibrated: no threshold for this task; the score is reported without "
                "a present/absent call")
    return ("uncalibrated: zero-shot estimate, not calibrated on local data")


def _algorithm(model, extra: Sequence[str] = ()) -> AlgorithmIdentification:
    params = [f"bundle {model.name}", f"weights sha256 {model.weights_sha256}",
              f"tokenizer {model.tokenizer}", f"echonode {model.echonode_version}"]
    if model.calibration:
        params.append(f"calibration {model.calibration}")
    params.extend(extra)
    return AlgorithmIdentification(
        name=algorithm_name(model.architecture),
        version=f"{model.name} {model.weights_sha256[:16]}",
        parameters=params,
        family=C.AI_FAMILY,
        manufacturer=MANUFACTURER,
    )


def _source_images(interp: Interpretation, by_uid: dict, only: Optional[Iterable[str]] = None):
    items = []
    wanted = set(only) if only else None
    for clip in interp.clips:
        if wanted is not None and clip.sop_instance_uid not in wanted:
            continue
        ds = by_uid.get(clip.sop_instance_uid)
        if ds is None:
            continue
        n = int(getattr(ds, "NumberOfFrames", 1) or 1)
        frames = [i + 1 for i in clip.frames_used if 0 <= i < n] if n > 1 else None
        items.append(SourceImageForMeasurementGroup(
            referenced_sop_class_uid=ds.SOPClassUID,
            referenced_sop_instance_uid=ds.SOPInstanceUID,
            referenced_frame_numbers=frames or None,
        ))
    return items


def _task_group(interp: Interpretation, t: TaskResult, index: int,
                by_uid: dict) -> MeasurementsAndQualitativeEvaluations:
    m = interp.model
    tc = C.codes_for(t)
    tracking = TrackingIdentifier(
        identifier=f"echonode {t.task_id}",
        uid=result_uid(interp.study_instance_uid, m.weights_sha256, m.echonode_version, "tracking", index),
    )
    method = {"binary": C.METHOD_BINARY, "regression": C.METHOD_REGRESSION}.get(t.mode, C.METHOD_CATEGORICAL)
    measurements = []
    qualitative = []
    notes = []

    if t.mode == "regression" and t.value is not None and not _finite(t.value):
        notes.append(_text(C.PROCESSING_NOTE, f"{t.title}: the value is not a finite number and is omitted"))
    if t.mode == "regression" and _finite(t.value):
        measurements.append(Measurement(name=tc.concept, value=float(t.value),
                                        unit=tc.unit or C.ucum(t.unit), method=method))
    score = t.score
    if score is None and t.category and t.category in t.scores:
        score = t.scores[t.category]
    if score is not None and not _finite(score):
        notes.append(_text(C.PROCESSING_NOTE, f"{t.title}: the score is not a finite number and is omitted"))
    if _finite(score):
        measurements.append(Measurement(name=C.SCORE, value=float(score), unit=C.UCUM_NO_UNITS, method=method))
    if _finite(t.threshold):
        measurements.append(Measurement(name=C.THRESHOLD, value=float(t.threshold), unit=C.UCUM_NO_UNITS))

    # the coded call: (concept name, value code)
    call: Optional[tuple] = None
    if t.mode == "binary" and t.call in (CALL_PRESENT, CALL_ABSENT):
        if tc.value_code is not None:
            # "present" is a specific value (e.g. markedly enlarged); "absent" is coded
            # against the task's own concept, which is all the model said.
            call = (tc.concept, tc.value_code) if t.call == CALL_PRESENT else (tc.private, C.ABSENT)
        else:
            call = (tc.concept, C.PRESENT if t.call == CALL_PRESENT else C.ABSENT)
    elif t.mode == "categorical":
        if t.value is not None and tc.levels and int(t.value) in tc.levels:
            call = (tc.concept, tc.levels[int(t.value)])
        notes.append(_text(C.CATEGORY_NOTE, f"{t.title}: {t.category}" if t.category else
                           f"{t.title}: no level called (uncalibrated level thresholds)"))
    finding_type = tc.private
    if call is not None:
        if _same(call[0], C.FINDING):
            # TID 1501 has one Finding row: the called value is the finding itself
            finding_type = call[1]
        else:
            qualitative.append(QualitativeEvaluation(call[0], call[1]))
    for key, flag in sorted(t.derived.items()):
        word = "not determined" if flag is None else ("yes" if flag else "no")
        notes.append(_text(C.DERIVED_NOTE, f"{key.replace('_', ' ')}: {word}"))
    if t.scores:
        notes.append(_text(C.LEVEL_SCORES, "; ".join(f"{k} {v:.3f}" for k, v in t.scores.items())))

    method_text = f"{t.method}" + (f"; aggregation over clips: {t.aggregation}" if t.aggregation else "")
    if tc.notes:
        method_text += f"; {tc.notes}"
    notes.insert(0, _text(C.THRESHOLD_SOURCE, _threshold_text(t, m.calibration)))
    notes.insert(0, _text(C.METHOD_NOTE, f"{t.title}: {method_text}"))

    per_clip_uids = [cv.sop_instance_uid for cv in t.per_clip] or None
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        finding_type=finding_type,
        method=method,
        algorithm_id=_algorithm(m),
        finding_sites=[FindingSite(tc.site)] if tc.site is not None else None,
        measurements=measurements or None,
        qualitative_evaluations=qualitative or None,
        source_images=_source_images(interp, by_uid, per_clip_uids) or _source_images(interp, by_uid) or None,
    )
    group[0].ContentSequence.extend(notes)
    return group


def _longitudinal_group(interp: Interpretation, index: int, by_uid: dict):
    lon = interp.longitudinal
    if lon is None:
        return None
    m = interp.model
    tracking = TrackingIdentifier(
        identifier="echonode longitudinal comparison",
        uid=result_uid(interp.study_instance_uid, m.weights_sha256, m.echonode_version, "tracking", index),
    )
    ref = lon.reference
    measurements = []
    qualitative = []
    notes = []
    if ref is not None and _finite(ref.similarity):
        measurements.append(Measurement(name=C.LON_SIMILARITY, value=float(ref.similarity), unit=C.UCUM_NO_UNITS))
    if _finite(lon.same_patient_threshold):
        measurements.append(Measurement(name=C.LON_SAME_THRESHOLD, value=float(lon.same_patient_threshold),
                                        unit=C.UCUM_NO_UNITS))
    if _finite(lon.change_threshold):
        measurements.append(Measurement(name=C.LON_CHANGE_THRESHOLD, value=float(lon.change_threshold),
                                        unit=C.UCUM_NO_UNITS))
    for flag, code, words in ((lon.possible_patient_mismatch, C.LON_MISMATCH,
                               ("embedding similarity is below the same-patient threshold: please check "
                                "that the prior study belongs to this patient",
                                "no sign of a patient mismatch against the prior study")),
                              (lon.marked_change, C.LON_CHANGE,
                               ("embedding similarity is below the change threshold: the images differ "
                                "markedly from the prior study; please compare",
                                "no marked change against the prior study"))):
        if flag is None:
            notes.append(_text(code, "not assessed (no calibrated threshold or no prior study)"))
        else:
            qualitative.append(QualitativeEvaluation(code, C.YES if flag else C.NO))
            notes.append(_text(code, words[0] if flag else words[1]))
    for p in lon.priors:
        role = ", ".join(r for r, on in (("most recent", p.most_recent), ("most similar", p.most_similar)) if on)
        date = f"{p.study_date[:4]}-{p.study_date[4:6]}-{p.study_date[6:8]}" if len(p.study_date) == 8 else "unknown date"
        notes.append(_text(C.LON_PRIOR, f"prior study {p.study_instance_uid} of {date}: similarity "
                                        f"{p.similarity:.3f}" + (f" ({role})" if role else "")))
    if ref is not None:
        notes.append(UIDRefContentItem(name=C.STUDY_INSTANCE_UID, value=check_uid(ref.study_instance_uid,
                                       "prior StudyInstanceUID", strict=False), relationship_type=CONTAINS))
        if len(ref.study_date) == 8 and ref.study_date.isdigit():
            import datetime
            notes.append(DateContentItem(name=C.STUDY_DATE, value=datetime.date(
                int(ref.study_date[:4]), int(ref.study_date[4:6]), int(ref.study_date[6:8])),
                relationship_type=CONTAINS))
    src = {THRESHOLD_CALIBRATED: "thresholds calibrated on local data",
           THRESHOLD_PUBLISHED: "published thresholds",
           THRESHOLD_NONE: "uncalibrated: no thresholds, flags not assessed"}.get(lon.threshold_source,
                                                                                  lon.threshold_source)
    notes.append(_text(C.THRESHOLD_SOURCE, src))
    notes.append(_text(C.LON_NOTE, lon.note))
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        method=C.private("LON-COS", "EchoCLIP-R study embedding cosine similarity"),
        algorithm_id=_algorithm(lon.model),
        measurements=measurements or None,
        qualitative_evaluations=qualitative or None,
        source_images=_source_images(interp, by_uid) or None,
    )
    group[0].ContentSequence.extend(notes)
    return group


def check_sources(interp: Interpretation, sources: Sequence[Dataset]) -> dict:
    """Header copies of ``sources`` by SOP Instance UID, checked to belong to ``interp``'s study
    (shared by the SR and the overlay writers). Raises :class:`SRBuildError`."""
    # UIDs from the cart: the receive side accepts leading-zero components (strict=False), so must we
    study = check_uid(interp.study_instance_uid, "Interpretation.study_instance_uid", strict=False)
    if not sources:
        raise SRBuildError("build_sr: no source datasets; the SR copies patient and study from them")
    by_uid = {}
    for ds in sources:
        s = check_uid(getattr(ds, "StudyInstanceUID", None), "source StudyInstanceUID", strict=False)
        if s != study:
            raise SRBuildError("build_sr: a source dataset belongs to another study "
                               f"(StudyInstanceUID {s} != {study})")
        uid = check_uid(getattr(ds, "SOPInstanceUID", None), "source SOPInstanceUID", strict=False)
        check_uid(getattr(ds, "SOPClassUID", None), "source SOPClassUID", strict=False)
        by_uid[uid] = _header_copy(ds)
    clip_uids = {c.sop_instance_uid for c in interp.clips}
    if clip_uids and not clip_uids & set(by_uid):
        raise SRBuildError("build_sr: none of the analysed clips is among the source datasets")
    return by_uid


def _fixed_charset(value) -> list[str]:
    """Specific Character Set terms as the standard spells them.

    Carts in the field write e.g. ``ISO-IR 100``; pydicom reads it with a warning but
    highdicom (rightly) refuses to copy a non-standard term into a new object.
    Unknown terms fall back to UTF-8 (``ISO_IR 192``), which is what we write anyway.
    """
    from pydicom.charset import python_encoding

    terms = [value] if isinstance(value, str) else list(value or [])
    out = []
    for term in terms:
        t = str(term).strip().upper()
        for cand in (t, t.replace("-", "_"), t.replace("-", "_").replace("ISO_IR_", "ISO_IR "),
                     t.replace("-", " ").replace("ISO IR", "ISO_IR"),
                     t.replace("ISO_2022_IR_", "ISO 2022 IR ")):
            if cand in python_encoding:
                out.append(cand)
                break
        else:
            return ["ISO_IR 192"]
    return out


def _header_copy(ds: Dataset) -> Dataset:
    """The source without pixel data, with a standard Specific Character Set."""
    e = Dataset()
    for elem in ds:
        if elem.tag.group in (0x7FE0,) or elem.tag == 0x00280000:
            continue
        e.add(elem)
    if "SpecificCharacterSet" in ds:
        fixed = _fixed_charset(ds.SpecificCharacterSet)
        del e[0x00080005]   # the element object is shared with the caller's dataset
        e.SpecificCharacterSet = fixed[0] if len(fixed) == 1 else fixed
    return e


def _evidence(sources: Sequence[Dataset]) -> list[Dataset]:
    """Header-only copies of the sources (no pixel data is needed for evidence)."""
    out = []
    for ds in sources:
        e = Dataset()
        for elem in ds:
            if elem.tag.group in (0x7FE0,) or elem.tag == 0x00280000:
                continue
            e.add(elem)
        out.append(e)
    return out


def result_version_note(interp: Interpretation) -> str:
    """The SR's statement of which study version and which clips it covers, and which
    earlier SR it replaces ("" for a result without a study version)."""
    if not interp.study_version:
        return ""
    uids = ", ".join(c.sop_instance_uid for c in interp.clips)
    note = (f"This result covers version {interp.study_version} of the study: "
            f"{len(interp.clips)} clip(s) analysed ({uids}).")
    if interp.replaces is not None:
        note += (f" It replaces the result SR {interp.replaces.sop_instance_uid} of study version "
                 f"{interp.replaces.study_version}.")
    return note


def predecessor_item(ref, study_uid: str) -> Dataset:
    """One item of the Predecessor Documents Sequence (0040,A360), PS3.3 C.17.2.1: the
    Hierarchical SOP Instance Reference Macro (Table C.17-3) of the SR replaced."""
    check_uid(ref.sop_instance_uid, "replaced SR SOPInstanceUID", strict=False)
    check_uid(ref.series_instance_uid, "replaced SR SeriesInstanceUID", strict=False)
    check_uid(ref.sop_class_uid, "replaced SR SOPClassUID", strict=False)
    if ref.study_instance_uid != study_uid:
        raise SRBuildError("build_sr: the replaced SR belongs to another study "
                           f"({ref.study_instance_uid} != {study_uid})")
    sop = Dataset()
    sop.ReferencedSOPClassUID = ref.sop_class_uid
    sop.ReferencedSOPInstanceUID = ref.sop_instance_uid
    series = Dataset()
    series.SeriesInstanceUID = ref.series_instance_uid
    series.ReferencedSOPSequence = [sop]
    item = Dataset()
    item.StudyInstanceUID = ref.study_instance_uid
    item.ReferencedSeriesSequence = [series]
    return item


def build_sr(interp: Interpretation, sources: list[Dataset]) -> Dataset:
    """The TID 1500 Comprehensive 3D SR for ``interp`` (a pydicom Dataset, not yet written).

    ``sources``: the analysed instances (pixel data not needed); all must be in
    ``interp.study_instance_uid``. Raises :class:`SRBuildError` otherwise.
    Task codes are the ones each ``TaskResult.coding`` carries (the catalogue the
    Interpreter used, site file included).
    """
    by_uid = check_sources(interp, sources)
    m = interp.model
    sop_uid, series_uid = sr_uids(interp)

    observer = ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=device_uid(m.weights_sha256, m.echonode_version),
            name="echonode",
            manufacturer_name=MANUFACTURER,
            model_name=f"{algorithm_name(m.architecture)} {m.name}"[:64],
        ),
    )
    groups = []
    index = 0
    for t in interp.tasks.values():
        groups.append(_task_group(interp, t, index, by_uid))
        index += 1
    lon = _longitudinal_group(interp, index, by_uid)
    if lon is not None:
        groups.append(lon)
    # after the groups above, so their tracking UIDs stay what they were
    from echonode.dicom.sr_summary import insert_summary, promptcam_groups
    groups.extend(promptcam_groups(interp, index + 1, by_uid))
    if not groups:
        raise SRBuildError("build_sr: nothing to report (no task results and no longitudinal comparison)")

    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=observer),
        procedure_reported=C.ECHOCARDIOGRAPHY,
        imaging_measurements=groups,
        title=codes.DCM.ImagingMeasurementReport,
    )
    insert_summary(report[0], interp, by_uid)   # the key findings lead
    # TID 1500 row 12: CONTAINS CONTAINER (C0034375, UMLS, "Qualitative Evaluations")
    qe = ContainerContentItem(name=C.QUALITATIVE_EVALUATIONS, relationship_type=CONTAINS)
    items = []
    if interp.demo:
        items.append(_text(C.DEMO_BANNER, DEMO_BANNER))
    items.append(_text(C.DISCLAIMER, interp.disclaimer))
    for w in interp.warnings:
        items.append(_text(C.PROCESSING_NOTE, w))
    version_note = result_version_note(interp)
    if version_note:
        items.append(_text(C.PROCESSING_NOTE, version_note))
    qe.ContentSequence = items
    report[0].ContentSequence.append(qe)

    description = (f"{DEMO_BANNER} EchoCLIP SR" if interp.demo
                   else "EchoCLIP zero-shot SR for physician review")[:64]
    sr = hd.sr.Comprehensive3DSR(
        evidence=_evidence(list(by_uid.values())),
        content=report[0],
        series_instance_uid=series_uid,
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=description,
        coding_schemes=[CodingSchemeIdentificationItem(
            designator=C.PRIVATE_SCHEME, name=C.PRIVATE_SCHEME_NAME,
            responsible_organization=C.PRIVATE_SCHEME_ORG)],
    )
    if interp.replaces is not None:
        sr.PredecessorDocumentsSequence = [predecessor_item(interp.replaces, interp.study_instance_uid)]
    sr.SpecificCharacterSet = "ISO_IR 192"
    sr.ManufacturerModelName = "echonode"
    sr.SoftwareVersions = [__version__, m.weights_sha256[:16]]
    return sr
