"""The SR's leading summary and its PromptCAM anchors (used by :func:`echonode.dicom.sr.build_sr`).

A viewer that renders an SR as structured text (DCMTK ``dsr2html``, most PACS) shows
the content tree in order, so the findings a cardiologist wants first go first:

* :func:`insert_summary` puts a CONTAINER (121111, DCM, "Summary") in the root, right
  after the procedure reported and before the Imaging Measurements container. It holds
  the key findings of :func:`echonode.dicom.findings.key_findings` as coded items:
  LVEF and PASP as NUM (LOINC / SCT concept, UCUM unit; one decimal, the per-task
  group keeps the full value) with the derived LVEF
  categories as TEXT; device, chamber, hypertrophy, effusion, tamponade and right
  atrial pressure calls as CODE (the catalogue's concept and value codes); a task
  without a call (uncalibrated) as TEXT saying so; the comparison with the prior
  (similarity NUM, mismatch / change CODE Yes/No, prior date); which tasks are
  uncalibrated; for the demo model the DEMO banner first.
  Where a call comes from a frame (the tasks with a PromptCAM map), its CODE item is
  INFERRED FROM a SCOORD POINT at the PromptCAM peak on the source frame, SELECTED
  FROM that frame of the source image.
* :func:`promptcam_groups` adds one TID 1410 planar-ROI measurement group per
  PromptCAM map after the per-task groups: its Image Region is that same POINT on
  the source frame (Referenced Frame Number set), so TID 1500-aware viewers (OHIF,
  IHE AIR) can anchor the finding on the image.

Per-task groups are unchanged and follow. This module never imports torch.
"""

from __future__ import annotations

import datetime
from typing import Optional

import numpy as np
from highdicom.sr import (
    CodeContentItem, ContainerContentItem, DateContentItem, GraphicTypeValues, ImageContentItem,
    ImageRegion, Measurement, NumContentItem, PlanarROIMeasurementsAndQualitativeEvaluations,
    RelationshipTypeValues, ScoordContentItem, SourceImageForRegion, TextContentItem, TrackingIdentifier,
)
from pydicom.sr.coding import Code

from echonode.dicom import sr_codes as C
from echonode.dicom.findings import comparison_lines, key_findings, calibration_split
from echonode.dicom.overlays import peak_on_source
from echonode.dicom.result_uids import result_uid
from echonode.interpretation import (
    CALL_ABSENT, CALL_PRESENT, DEMO_BANNER, Interpretation, PromptCam, TaskResult,
)

__all__ = ["SUMMARY", "PROMPTCAM_PEAK", "insert_summary", "summary_container", "promptcam_groups"]

CONTAINS = RelationshipTypeValues.CONTAINS
INFERRED_FROM = RelationshipTypeValues.INFERRED_FROM
SELECTED_FROM = RelationshipTypeValues.SELECTED_FROM

SUMMARY = Code("121111", "DCM", "Summary")
IMAGE_REGION = Code("111030", "DCM", "Image Region")
SOURCE = Code("260753009", "SCT", "Source")
PROMPTCAM_PEAK = C.private("ZS-PCAM-PEAK", "PromptCAM saliency peak")
PROMPTCAM_METHOD = C.private("ZS-PCAM", "PromptCAM: gradient of the prompt similarity (Grad-CAM)")
IMAGING_MEASUREMENTS = ("126010", "DCM")


def _finite(x) -> bool:
    try:
        return x is not None and bool(np.isfinite(float(x)))
    except (TypeError, ValueError):
        return False


def _coded_call(t: TaskResult, tc) -> Optional[tuple[Code, Code]]:
    """(concept name, value) of a task's call, coded as the per-task group codes it."""
    if t.mode == "binary" and t.call in (CALL_PRESENT, CALL_ABSENT):
        if tc.value_code is not None:
            return (tc.concept, tc.value_code) if t.call == CALL_PRESENT else (tc.private, C.ABSENT)
        name = tc.private if (tc.concept.value, tc.concept.scheme_designator) == ("121071", "DCM") else tc.concept
        return name, (C.PRESENT if t.call == CALL_PRESENT else C.ABSENT)
    if t.mode == "categorical" and t.value is not None and tc.levels and int(t.value) in tc.levels:
        name = tc.private if (tc.concept.value, tc.concept.scheme_designator) == ("121071", "DCM") else tc.concept
        return name, tc.levels[int(t.value)]
    return None


def _scoord(cam: PromptCam, by_uid: dict, relationship) -> Optional[ScoordContentItem]:
    """The PromptCAM peak as a SCOORD POINT on its source frame (None if the source is unknown)."""
    ref = by_uid.get(cam.sop_instance_uid)
    if ref is None or cam.heatmap is None:
        return None
    y, x = peak_on_source(cam)
    item = ScoordContentItem(name=PROMPTCAM_PEAK, graphic_type=GraphicTypeValues.POINT,
                             graphic_data=np.array([[x, y]], dtype=np.float32),
                             relationship_type=relationship)
    n = int(getattr(ref, "NumberOfFrames", 1) or 1)
    item.ContentSequence = [ImageContentItem(
        name=SOURCE, referenced_sop_class_uid=ref.SOPClassUID, referenced_sop_instance_uid=ref.SOPInstanceUID,
        referenced_frame_numbers=[cam.frame_index + 1] if n > 1 else None, relationship_type=SELECTED_FROM)]
    return item


def summary_container(interp: Interpretation, by_uid: dict) -> ContainerContentItem:
    """The (121111, DCM, "Summary") container of the key findings (see module doc)."""
    cams = {c.task_id: c for c in interp.promptcams}
    items: list = []
    if interp.demo:
        items.append(TextContentItem(name=C.DEMO_BANNER, value=DEMO_BANNER, relationship_type=CONTAINS))
    for section in key_findings(interp):
        for f in section.findings:
            t = f.task
            tc = C.codes_for(t)
            if t.mode == "regression":
                if _finite(t.value):
                    # one decimal, as read (the per-task group keeps the full value)
                    items.append(NumContentItem(name=tc.concept, value=round(float(t.value), 1),
                                                unit=tc.unit or C.ucum(t.unit), relationship_type=CONTAINS))
                else:
                    items.append(TextContentItem(name=tc.private, value=f"{t.title}: not available",
                                                 relationship_type=CONTAINS))
                if f.derived:   # one line: the summary must stay short enough for a first screen
                    items.append(TextContentItem(name=C.DERIVED_NOTE, value="; ".join(f.derived),
                                                 relationship_type=CONTAINS))
                continue
            coded = _coded_call(t, tc)
            if coded is None:
                items.append(TextContentItem(name=tc.private, value=f"{t.title}: {f.call} ({f.detail})",
                                             relationship_type=CONTAINS))
                continue
            item = CodeContentItem(name=coded[0], value=coded[1], relationship_type=CONTAINS)
            cam = cams.get(t.task_id)
            anchor = _scoord(cam, by_uid, INFERRED_FROM) if cam is not None else None
            if anchor is not None:
                item.ContentSequence = [anchor]
            items.append(item)
    lon = interp.longitudinal
    ref = lon.reference if lon is not None else None
    if ref is not None:
        if _finite(ref.similarity):
            items.append(NumContentItem(name=C.LON_SIMILARITY, value=float(ref.similarity), unit=C.UCUM_NO_UNITS,
                                        relationship_type=CONTAINS))
        d = ref.study_date
        if len(d) == 8 and d.isdigit():
            items.append(DateContentItem(name=C.STUDY_DATE, value=datetime.date(int(d[:4]), int(d[4:6]), int(d[6:8])),
                                         relationship_type=CONTAINS))
        for flag, code in ((lon.possible_patient_mismatch, C.LON_MISMATCH), (lon.marked_change, C.LON_CHANGE)):
            if flag is not None:
                items.append(CodeContentItem(name=code, value=C.YES if flag else C.NO, relationship_type=CONTAINS))
        items.append(TextContentItem(name=C.LON_NOTE, value="; ".join(comparison_lines(interp)),
                                     relationship_type=CONTAINS))
    _, unc = calibration_split(interp)
    items.append(TextContentItem(
        name=C.THRESHOLD_SOURCE, relationship_type=CONTAINS,
        value=("uncalibrated, score or estimate only, no yes/no call: " + ", ".join(unc)) if unc
        else "every call rests on a calibrated or published threshold"))
    items.append(TextContentItem(name=C.DISCLAIMER, value=interp.disclaimer, relationship_type=CONTAINS))
    # SEPARATE: text renderers (dsr2html) show each item with its concept name, one per line
    container = ContainerContentItem(name=SUMMARY, relationship_type=CONTAINS, is_content_continuous=False)
    container.ContentSequence = items
    return container


def insert_summary(root, interp: Interpretation, by_uid: dict) -> None:
    """Put the summary container into ``root`` (the report's root CONTAINER) before the
    Imaging Measurements container."""
    seq = root.ContentSequence
    at = len(seq)
    for i, item in enumerate(seq):
        name = item.ConceptNameCodeSequence[0] if "ConceptNameCodeSequence" in item else None
        if name is not None and (name.CodeValue, name.CodingSchemeDesignator) == IMAGING_MEASUREMENTS:
            at = i
            break
    seq.insert(at, summary_container(interp, by_uid))


def _cam_codes(interp: Interpretation, task_id: str) -> "C.TaskCodes":
    """The task's codes as its result carries them; a map of a task without a result gets
    the documented private fallback code."""
    t = interp.tasks.get(task_id)
    if t is not None:
        return C.codes_for(t)
    code = C.fallback_code(task_id, task_id)
    return C.TaskCodes(concept=code, private=code, unit=None)


def promptcam_groups(interp: Interpretation, first_index: int, by_uid: dict) -> list:
    """One TID 1410 group per PromptCAM map: the peak as an Image Region POINT on the
    source frame, the task's concept as finding type, the prompt's score."""
    from echonode.dicom.sr import _algorithm

    m = interp.model
    out = []
    for k, cam in enumerate(interp.promptcams):
        ref = by_uid.get(cam.sop_instance_uid)
        if ref is None or cam.heatmap is None:
            continue
        tc = _cam_codes(interp, cam.task_id)
        y, x = peak_on_source(cam)
        n = int(getattr(ref, "NumberOfFrames", 1) or 1)
        region = ImageRegion(
            graphic_type=GraphicTypeValues.POINT, graphic_data=np.array([[x, y]], dtype=np.float32),
            source_image=SourceImageForRegion(
                referenced_sop_class_uid=ref.SOPClassUID, referenced_sop_instance_uid=ref.SOPInstanceUID,
                referenced_frame_numbers=[cam.frame_index + 1] if n > 1 else None))
        measurements = [Measurement(name=C.SCORE, value=float(cam.score), unit=C.UCUM_NO_UNITS,
                                    method=PROMPTCAM_METHOD)] if _finite(cam.score) else None
        group = PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(
                identifier=f"echonode PromptCAM {cam.task_id}",
                uid=result_uid(interp.study_instance_uid, m.weights_sha256, m.echonode_version, "tracking",
                               first_index + k)),
            referenced_region=region,
            finding_type=tc.concept,
            method=PROMPTCAM_METHOD,
            algorithm_id=_algorithm(m),
            measurements=measurements,
        )
        group[0].ContentSequence.append(TextContentItem(
            name=C.METHOD_NOTE, relationship_type=CONTAINS,
            value=f"PromptCAM peak of the prompt \"{cam.prompt}\" on frame {cam.frame_index + 1}"[:1024]))
        out.append(group)
    return out
