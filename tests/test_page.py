"""The key-results page: Tesseract reads what a cardiologist must see, the numbers are
the SR's, and the Secondary Capture and the PDF are valid DICOM in the analysed study."""

from __future__ import annotations

import datetime
import re

import pydicom
import pytest

from echonode.dicom.findings import key_findings
from echonode.dicom.page import (
    PAGE_SIZE, build_page, build_page_pdf, page_uids, render_page,
)
from echonode.dicom.result_uids import result_uid
from echonode.dicom.sr import build_sr
from echonode.interpretation import DEMO_BANNER
from tests.fixtures.interp import dciodvfy
from tests.fixtures.view import ocr_words, on_same_line, save_png

NOW = datetime.datetime(2026, 12, 1, 22, 30, tzinfo=datetime.timezone.utc)


def _sr_lvef(sr) -> float:
    """The LVEF NUM of the SR (LOINC 18043-0), first occurrence in document order."""
    def walk(items):
        for it in items:
            if it.get("ValueType") == "NUM" and it.ConceptNameCodeSequence[0].CodeValue == "18043-0":
                return float(it.MeasuredValueSequence[0].NumericValue)
            found = walk(it.get("ContentSequence", []))
            if found is not None:
                return found
        return None
    v = walk(sr.ContentSequence)
    assert v is not None, "the SR holds no LVEF"
    return v


@pytest.fixture(scope="module")
def demo_page(view_study, tmp_path_factory):
    folder = tmp_path_factory.mktemp("page")
    interp, src = view_study.interp, view_study.source
    ds = build_page(interp, [src], now=NOW)
    path = folder / "page.dcm"
    ds.save_as(path, enforce_file_format=True)
    png = save_png(pydicom.dcmread(path).pixel_array, folder / "page.png")
    return interp, src, path, png


def test_page_is_valid_sc_in_the_study(demo_page):
    interp, src, path, _ = demo_page
    assert dciodvfy(path) == ([], [])
    back = pydicom.dcmread(path)
    uids = page_uids(interp)
    m = interp.model
    assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    assert back.SOPInstanceUID == uids["page"] == result_uid(interp.study_instance_uid, m.weights_sha256,
                                                             m.echonode_version, "page")
    assert back.SeriesInstanceUID == uids["page-series"] != src.SeriesInstanceUID
    assert back.StudyInstanceUID == src.StudyInstanceUID and back.PatientID == src.PatientID
    assert back.PhotometricInterpretation == "RGB" and back.BurnedInAnnotation == "YES"
    assert back.Columns == PAGE_SIZE[0] and back.Rows >= PAGE_SIZE[1]
    assert "DEMO MODEL" in back.SeriesDescription
    assert back.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID


def test_ocr_finds_sr_lvef_device_calls_and_demo_banner(demo_page):
    interp, src, _, png = demo_page
    raw, words = ocr_words(png)
    text = " ".join(raw.split())
    lvef = _sr_lvef(build_sr(interp, [src]))
    assert re.search(rf"LVEF {lvef:.0f} ?%", text), text     # OCR may close the gap in the large type
    assert DEMO_BANNER in text or ("DEMO MODEL" in text and "NOT FOR CLINICAL USE" in text)
    assert "PHANTOM, VIEW" in text and "1958-02-14" in text and "2025-03-01" in text
    assert "EchoCLIP (tiny demo)" in text
    devices = [f for s in key_findings(interp) if s.title == "Devices" for f in s.findings]
    assert devices
    for f in devices:
        first_line = f.title if len(f.title) < 30 else " ".join(f.title.split()[:2])
        assert on_same_line(words, first_line, f.call), f"{f.title}: {f.call} not read on one line"
    # the banner is the first thing on the page; the review statement at the foot repeats it
    lines = raw.splitlines()
    assert lines[0] == DEMO_BANNER
    assert any(ln.startswith(DEMO_BANNER + ". Automated zero-shot estimates") for ln in lines[-3:]), lines[-3:]


def test_page_with_prior_spells_out_comparison_and_calibration(interp_factory, interp_sources, tmp_path):
    """A clinical (non-demo) interpretation with a prior study: the comparison and the
    calibrated/uncalibrated split are on the page; no DEMO banner."""
    interp = interp_factory(demo=False)
    png = save_png(render_page(interp, interp_sources[0], now=NOW), tmp_path / "page.png")
    raw, words = ocr_words(png)
    text = " ".join(raw.split())
    assert "Prior study of 2023-01-15: similarity 0.830" in text
    assert "Possible patient mismatch: no" in text and "Marked change since prior: no" in text
    assert "Uncalibrated, score or estimate only, no yes/no call (6 of 15)" in text
    assert "Impella catheter" in text and "Atrial fibrillation" in text
    assert "Calibrated: the other 9 task(s)" in text
    assert re.search(r"LVEF 57 ?%", text) and "LVEF < 50 %: no" in text
    assert "34 mmHg" in text
    assert "for review by a physician" in text
    assert "DEMO" not in text
    assert on_same_line(words, "Pacemaker or ICD lead", "PRESENT")
    assert on_same_line(words, "Pericardial effusion", "Small")


def test_page_pdf_is_valid_and_holds_the_page(view_study, tmp_path):
    interp, src = view_study.interp, view_study.source
    ds = build_page_pdf(interp, [src], now=NOW)
    path = tmp_path / "page_pdf.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert dciodvfy(path) == ([], [])
    back = pydicom.dcmread(path)
    uids = page_uids(interp)
    assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.104.1"
    assert back.SOPInstanceUID == uids["pdf"] and back.SeriesInstanceUID == uids["pdf-series"]
    assert back.StudyInstanceUID == src.StudyInstanceUID and back.Modality == "DOC"
    pdf = bytes(back.EncapsulatedDocument)[:back.EncapsulatedDocumentLength]
    assert pdf.startswith(b"%PDF-") and pdf.rstrip().endswith(b"%%EOF")
    assert back.SourceInstanceSequence[0].ReferencedSOPInstanceUID == uids["page"]
    # the PDF carries the page at its full width
    assert b"/Width 1920" in pdf


def test_deterministic_uids_and_pixels(view_study):
    interp, src = view_study.interp, view_study.source
    a = build_page(interp, [src], now=NOW)
    b = build_page(interp, [src], now=NOW)
    assert a.SOPInstanceUID == b.SOPInstanceUID and a.PixelData == b.PixelData
