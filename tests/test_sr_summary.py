"""The SR leads with its findings: a Summary container of coded key findings before the
per-task groups, anchored on the source frame; dsr2html shows it first (Chromium
screenshot kept as an artifact; Tesseract reads LVEF and the devices off the first screen)."""

from __future__ import annotations

import html
import re
import subprocess

import highdicom as hd
import pydicom
import pytest

from echonode.dicom.findings import key_findings
from echonode.dicom.overlays import peak_on_source
from echonode.dicom.sr import build_sr
from echonode.dicom.sr_summary import PROMPTCAM_PEAK, SUMMARY
from tests.fixtures.interp import dciodvfy
from tests.fixtures.view import ocr_words, tool
from tests.test_sr import EXPECTED_SR_WARNINGS


@pytest.fixture(scope="module")
def demo_sr(view_study, tmp_path_factory):
    folder = tmp_path_factory.mktemp("srsum")
    interp, src = view_study.interp, view_study.source
    path = folder / "sr.dcm"
    build_sr(interp, [src]).save_as(path, enforce_file_format=True)
    return interp, src, path


def _code(item) -> tuple[str, str]:
    c = item.ConceptNameCodeSequence[0]
    return c.CodeValue, c.CodingSchemeDesignator


def test_summary_container_leads_and_holds_coded_findings(demo_sr):
    interp, src, path = demo_sr
    errors, warnings = dciodvfy(path)
    assert errors == [] and warnings == EXPECTED_SR_WARNINGS
    sr = pydicom.dcmread(path)
    containers = [it for it in sr.ContentSequence if it.ValueType == "CONTAINER"]
    assert _code(containers[0]) == (SUMMARY.value, SUMMARY.scheme_designator)
    assert _code(containers[1]) == ("126010", "DCM")            # Imaging Measurements after it
    assert containers[0].ContinuityOfContent == "SEPARATE"
    items = containers[0].ContentSequence
    assert items[0].ValueType == "TEXT" and "DEMO MODEL" in items[0].TextValue
    lvef = [it for it in items if it.ValueType == "NUM" and _code(it) == ("18043-0", "LN")]
    assert len(lvef) == 1
    assert float(lvef[0].MeasuredValueSequence[0].NumericValue) == round(interp.tasks["ejection_fraction"].value, 1)
    assert lvef[0].MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue == "%"
    # every key finding with a call is a CODE item; the others say why there is none
    findings = [f for s in key_findings(interp) for f in s.findings]
    n_code = sum(1 for it in items if it.ValueType == "CODE")
    called = [f for f in findings if f.task.mode != "regression" and f.call != "not called"]
    assert n_code == len(called) > 0
    texts = " ".join(it.TextValue for it in items if it.ValueType == "TEXT")
    for f in findings:
        if f.call == "not called":
            assert f"{f.title}: not called" in texts


def test_device_calls_anchor_on_the_promptcam_peak_frame(demo_sr):
    interp, src, path = demo_sr
    sr = pydicom.dcmread(path)
    summary = sr.ContentSequence[[i for i, it in enumerate(sr.ContentSequence)
                                  if it.ValueType == "CONTAINER"][0]]
    anchored = [it for it in summary.ContentSequence if it.ValueType == "CODE" and "ContentSequence" in it]
    cams = {c.task_id: c for c in interp.promptcams}
    called_cams = [c for tid, c in cams.items() if interp.tasks[tid].call in ("present", "absent")]
    assert len(anchored) == len(called_cams) > 0
    for item, cam in zip(anchored, called_cams):
        sc = item.ContentSequence[0]
        assert sc.ValueType == "SCOORD" and sc.RelationshipType == "INFERRED FROM"
        assert _code(sc) == (PROMPTCAM_PEAK.value, PROMPTCAM_PEAK.scheme_designator)
        assert sc.GraphicType == "POINT"
        y, x = peak_on_source(cam)
        assert [float(v) for v in sc.GraphicData] == pytest.approx([x, y], abs=1e-3)
        assert 0 <= x <= src.Columns and 0 <= y <= src.Rows
        img = sc.ContentSequence[0]
        assert img.RelationshipType == "SELECTED FROM"
        ref = img.ReferencedSOPSequence[0]
        assert ref.ReferencedSOPInstanceUID == src.SOPInstanceUID
        assert int(ref.ReferencedFrameNumber) == cam.frame_index + 1


def test_tid1410_groups_give_viewers_the_image_region(demo_sr):
    interp, src, path = demo_sr
    sr = hd.sr.srread(path)
    groups = sr.content.get_planar_roi_measurement_groups()
    assert len(groups) == len(interp.promptcams)
    for g, cam in zip(groups, interp.promptcams):
        region = g.roi
        assert region.graphic_type == hd.sr.GraphicTypeValues.POINT
        y, x = peak_on_source(cam)
        assert region.value.tolist()[0] == pytest.approx([x, y], abs=1e-3)
        ref = region.ContentSequence[0].ReferencedSOPSequence[0]
        assert ref.ReferencedSOPInstanceUID == src.SOPInstanceUID
        assert int(ref.ReferencedFrameNumber) == cam.frame_index + 1


def test_dsr2html_shows_summary_first_and_chromium_screenshot(demo_sr, tmp_path):
    interp, _, path = demo_sr
    page = tmp_path / "sr.html"
    proc = subprocess.run([tool("dsr2html"), str(path), str(page)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    doc = html.unescape(page.read_text(encoding="utf-8", errors="replace"))
    body = re.sub(r"<[^>]+>", " ", doc)
    i_summary = body.index("Summary")
    i_lvef = body.index("Left Ventricular Ejection Fraction by US")
    i_groups = body.index("Imaging Measurements")
    assert i_summary < i_lvef < i_groups
    lvef = interp.tasks["ejection_fraction"].value
    assert body.index(f"{lvef:.1f} %") < i_groups
    for s in key_findings(interp):
        if s.title == "Devices":
            for f in s.findings:
                assert body.index(f.title if f.call == "not called" else f.call.title()) < i_groups, f.title
    shot = tmp_path / "sr.png"     # kept under the pytest tmp dir as the artifact
    proc = subprocess.run([tool("chromium"), "--headless", "--no-sandbox", "--disable-gpu",
                           f"--screenshot={shot}", "--window-size=1280,900", page.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    from PIL import Image
    assert Image.open(shot).size == (1280, 900)
    text, _ = ocr_words(shot)
    first = " ".join(text.split())
    assert "Summary" in first and "Left Ventricular Ejection Fraction" in first
    assert re.search(rf"{lvef:.1f} ?%", first), first     # Tesseract may close the gap before %
    assert "Cardiac pacemaker lead" in first and "DEMO MODEL" in first
