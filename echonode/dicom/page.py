"""The key-results page: one RGB Secondary Capture per study (and optionally the same
page as an Encapsulated PDF) that any viewer shows and a cardiologist reads first.

Laid out for a 16:10 landscape reading-room monitor (1920 × 1200 at 100 %; the page
grows taller rather than cut anything), dark background, DejaVu Sans
(:mod:`echonode.dicom.render`):

* the DEMO banner across the top for the demo model;
* patient and study header (from the source headers), model name and version, date;
* column 1: LVEF, large, with its derived categories; devices;
* column 2: chamber sizes, hypertrophy, pericardium (effusion, tamponade),
  haemodynamics (PASP, right atrial pressure);
* column 3: the comparison with the prior study (date, similarity, flags), which calls
  are calibrated and which are uncalibrated, spelled out, processing notes;
* footer: the review statement, led by the DEMO banner's words for the demo model.

Every number and word comes from the Interpretation (:mod:`echonode.dicom.findings`),
never re-derived. UIDs are deterministic (``result_uid`` kinds ``page``/``page-series``
and ``pdf``/``pdf-series``); both objects join the analysed study.

This module never imports torch.
"""

from __future__ import annotations

import datetime
import io
from typing import Optional, Sequence

import numpy as np
from pydicom import Dataset

from echonode import __version__
from echonode.dicom.findings import Section, calibration_split, comparison_lines, key_findings
from echonode.dicom.overlays import secondary_capture
from echonode.dicom.result_uids import object_uid
from echonode.dicom.sr import MANUFACTURER, check_sources, algorithm_name
from echonode.interpretation import DEMO_BANNER, Interpretation

__all__ = ["build_page", "build_page_pdf", "render_page", "page_uids", "PAGE_SERIES_NUMBER",
           "PDF_SERIES_NUMBER", "PAGE_SIZE"]

PAGE_SERIES_NUMBER = 9903
PDF_SERIES_NUMBER = 9904
PAGE_SIZE = (1920, 1200)      # width, height: a 16:10 landscape reading-room monitor at 100 %

BG = (18, 18, 22)
FG = (235, 235, 235)
DIM = (165, 165, 170)
HEAD = (120, 190, 255)
ALERT = (255, 170, 60)

BODY = 24
SMALL = 19
HEADING = 28
LVEF_SIZE = 80


def page_uids(interp: Interpretation) -> dict[str, str]:
    """The derived UIDs of the page and PDF objects (kind → UID)."""
    return {k: object_uid(interp, k) for k in ("page", "page-series", "pdf", "pdf-series")}


# ------------------------------------------------------------------ text helpers
def _da(v) -> str:
    s = str(v or "")
    return f"{s[:4]}-{s[4:6]}-{s[6:8]}" if len(s) >= 8 and s[:8].isdigit() else (s or "unknown")


def _tm(v) -> str:
    s = str(v or "")
    return f"{s[:2]}:{s[2:4]}" if len(s) >= 4 and s[:4].isdigit() else ""


def _name(v) -> str:
    parts = [p for p in str(v or "").split("=")[0].split("^")]
    family, given = (parts + ["", ""])[:2]
    rest = " ".join(p for p in parts[2:] if p)
    out = family.strip()
    if given.strip():
        out += f", {given.strip()}"
    if rest:
        out += f" {rest}"
    return out or "(no name)"


def header_lines(interp: Interpretation, ref: Dataset, now: datetime.datetime) -> list[str]:
    m = interp.model
    g = ref.get
    sep = "  \u00b7  "
    patient = sep.join([f"Patient: {_name(g('PatientName'))}", f"ID: {g('PatientID', '') or '-'}",
                        f"Born: {_da(g('PatientBirthDate')) if g('PatientBirthDate') else '-'}",
                        f"Sex: {g('PatientSex', '') or '-'}"])
    study = sep.join([f"Study: {_da(g('StudyDate'))} {_tm(g('StudyTime'))}".rstrip(),
                      f"Accession: {g('AccessionNumber', '') or '-'}"]
                     + ([str(g("StudyDescription"))] if g("StudyDescription") else []))
    model = sep.join([f"Model: {algorithm_name(m.architecture)} {m.name} (weights {m.weights_sha256[:12]})",
                      f"echonode {m.echonode_version}", f"analysed {now:%Y-%m-%d %H:%M} UTC",
                      f"{len(interp.clips)} clip(s)"])
    return [patient, study, model]


# ------------------------------------------------------------------ layout
class _Block:
    """A list of drawing rows for one column: (text, font, colour, right_text, right_font, right_colour)."""

    def __init__(self, width: int):
        from echonode.dicom.render import font
        self.width = width
        self.rows: list[tuple] = []
        self.f = {k: font(s) for k, s in (("body", BODY), ("small", SMALL))}
        self.fb = {k: font(s, bold=True) for k, s in (("body", BODY), ("head", HEADING), ("lvef", LVEF_SIZE))}

    def gap(self, px: int) -> None:
        self.rows.append(("gap", px))

    def heading(self, text: str) -> None:
        self.text(text, self.fb["head"], HEAD)
        self.gap(4)

    def text(self, text: str, fnt=None, colour=FG, indent: int = 0) -> None:
        from echonode.dicom.render import wrap
        fnt = fnt or self.f["body"]
        for part in wrap(text, fnt, self.width - indent):
            self.rows.append(("text", part, fnt, colour, indent))

    def item(self, title: str, call: str, colour, detail: str = "") -> None:
        """``title`` on the left, ``call`` bold on the right, ``detail`` small below."""
        from echonode.dicom.render import ascii_safe, wrap
        fb = self.fb["body"]
        call = ascii_safe(call)
        cw = int(fb.getlength(call))
        lines = wrap(title, self.f["body"], max(80, self.width - cw - 20))
        self.rows.append(("item", lines[0], call, colour))
        for part in lines[1:]:
            self.rows.append(("text", part, self.f["body"], FG, 0))
        if detail:
            self.text(detail, self.f["small"], DIM, indent=16)
        self.gap(4)

    def height(self) -> int:
        return sum(self._h(r) for r in self.rows)

    def _h(self, r) -> int:
        if r[0] == "gap":
            return r[1]
        if r[0] == "item":
            return int(BODY * 1.3)
        return int(r[2].size * 1.3)

    def draw(self, draw, x: int, y: int) -> None:
        for r in self.rows:
            if r[0] == "text":
                draw.text((x + r[4], y), r[1], font=r[2], fill=r[3])
            elif r[0] == "item":
                draw.text((x, y), r[1], font=self.f["body"], fill=FG)
                fb = self.fb["body"]
                draw.text((x + self.width - int(fb.getlength(r[2])), y), r[2], font=fb, fill=r[3])
            y += self._h(r)


def _call_colour(f) -> tuple[int, int, int]:
    """Amber for a device or finding present, grey for no call or a call without a
    calibrated threshold (an argmax over levels), white for a calibrated call."""
    if f.call == "not called" or (f.task.mode != "regression" and not f.calibrated):
        return DIM
    if f.call == "PRESENT":
        return ALERT
    return FG


def _section(block: _Block, s: Section) -> None:
    block.heading(s.title)
    for f in s.findings:
        block.item(f.title, f.call, _call_colour(f), f.detail)
    block.gap(18)


def _lvef(block: _Block, s: Section) -> None:
    block.heading(s.title)
    for f in s.findings:
        block.rows.append(("text", f"LVEF {f.call}", block.fb["lvef"], FG, 0))
        block.text(f.detail, block.f["small"], DIM)
        for d in f.derived:
            block.text(d, block.f["body"], FG)
        block.gap(8)
    block.gap(18)


def render_page(interp: Interpretation, ref: Dataset, *, now: Optional[datetime.datetime] = None,
                size: tuple[int, int] = PAGE_SIZE) -> np.ndarray:
    """The page's RGB pixels (rows, columns, 3) uint8; ``ref`` supplies the patient/study header."""
    from PIL import Image, ImageDraw

    from echonode.dicom.render import BANNER_BG, BANNER_FG, font, wrap

    now = now or datetime.datetime.now(datetime.timezone.utc)
    width, min_height = size
    margin, gutter = 48, 56
    col_w = (width - 2 * margin - 2 * gutter) // 3

    # --- header
    fb_banner, f_title, f_head = font(44, bold=True), font(36, bold=True), font(BODY)
    top: list[tuple] = []
    if interp.demo:
        for part in wrap(DEMO_BANNER, fb_banner, width - 2 * margin):
            top.append(("banner", part, fb_banner))
    title = "EchoCLIP key results" + ("" if interp.demo else " \u2014 for review by a physician")
    for part in wrap(title, f_title, width - 2 * margin):
        top.append(("title", part, f_title))
    for line in header_lines(interp, ref, now):
        for part in wrap(line, f_head, width - 2 * margin):
            top.append(("head", part, f_head))

    # --- columns
    sections = key_findings(interp)
    cols = [_Block(col_w) for _ in range(3)]
    for s in sections:
        if s.title == "Left ventricular function":
            _lvef(cols[0], s)
        elif s.title == "Devices":
            _section(cols[0], s)
        else:
            _section(cols[1], s)
    c3 = cols[2]
    comp = comparison_lines(interp)
    c3.heading("Comparison with prior")
    if comp:
        for line in comp:
            c3.text(line, colour=ALERT if "YES" in line else FG)
    else:
        c3.text("Not available: no EchoCLIP-R model", colour=DIM)
    if interp.longitudinal is not None:
        c3.text(interp.longitudinal.note, c3.f["small"], DIM)
    c3.gap(18)
    cal, unc = calibration_split(interp)
    c3.heading("Calibration")
    c3.text(f"Uncalibrated, score or estimate only, no yes/no call ({len(unc)} of {len(cal) + len(unc)}): "
            + (", ".join(unc) if unc else "none"), c3.f["small"])
    c3.gap(4)
    c3.text(f"Calibrated: the other {len(cal)} task(s), thresholds calibrated on local data or "
            "published; each call above names its threshold.", c3.f["small"])
    if interp.model.calibration:
        c3.text(f"Calibration: {interp.model.calibration}", c3.f["small"], DIM)
    c3.gap(18)
    notes = [w for w in interp.warnings if w != DEMO_BANNER]
    if notes:
        c3.heading("Processing notes")
        for w in notes:
            c3.text(w, c3.f["small"], DIM)

    # --- footer: the review statement
    f_foot = font(BODY, bold=True)
    review = (f"{DEMO_BANNER}. " if interp.demo else "") + interp.disclaimer
    foot = wrap(review, f_foot, width - 2 * margin)

    line_h = lambda f: int(f.size * 1.3)  # noqa: E731
    banner_rows = [r for r in top if r[0] == "banner"]
    banner_h = (sum(line_h(r[2]) for r in banner_rows) + 24) if banner_rows else 0
    head_h = sum(line_h(r[2]) for r in top if r[0] != "banner") + 24
    body_h = max(c.height() for c in cols)
    foot_h = len(foot) * line_h(f_foot) + 2 * margin // 2
    height = max(min_height, banner_h + 16 + head_h + 24 + body_h + 24 + foot_h)

    canvas = Image.new("RGB", (width, height), BG)
    draw = ImageDraw.Draw(canvas)
    y = 0
    if banner_rows:
        draw.rectangle((0, 0, width, banner_h - 1), fill=BANNER_BG)
        y = 12
        for _, part, f in banner_rows:
            draw.text((margin, y), part, font=f, fill=BANNER_FG)
            y += line_h(f)
        y = banner_h
    y += 16
    for kind, part, f in top:
        if kind == "banner":
            continue
        draw.text((margin, y), part, font=f, fill=FG if kind == "head" else (255, 255, 255))
        y += line_h(f)
    y += 10
    draw.line((margin, y, width - margin, y), fill=(80, 80, 90), width=2)
    y += 24
    for i, c in enumerate(cols):
        c.draw(draw, margin + i * (col_w + gutter), y)
    # footer: the review statement
    yb = height
    yb -= len(foot) * line_h(f_foot) + margin // 2
    draw.line((margin, yb - 12, width - margin, yb - 12), fill=(80, 80, 90), width=2)
    for part in foot:
        draw.text((margin, yb), part, font=f_foot, fill=(255, 220, 120))
        yb += line_h(f_foot)
    return np.asarray(canvas, dtype=np.uint8)


def _ref(interp: Interpretation, sources: Sequence[Dataset]) -> tuple[Dataset, dict]:
    by_uid = check_sources(interp, list(sources))
    for c in interp.clips:
        if c.sop_instance_uid in by_uid:
            return by_uid[c.sop_instance_uid], by_uid
    return next(iter(by_uid.values())), by_uid


def build_page(interp: Interpretation, sources: Sequence[Dataset], *,
               now: Optional[datetime.datetime] = None) -> Dataset:
    """The key-results page as an RGB Secondary Capture in the analysed study.

    ``sources``: the analysed instances' headers (pixel data not needed); the
    patient/study header is taken from the first analysed clip among them.
    """
    ref, by_uid = _ref(interp, sources)
    pixels = render_page(interp, ref, now=now)
    description = f"{DEMO_BANNER} key results" if interp.demo else "EchoCLIP key results for physician review"
    sc = secondary_capture(interp, ref, pixels, kind="page", index=0, series_kind="page-series",
                           series_number=PAGE_SERIES_NUMBER, description=description,
                           comments=f"Key results of the EchoCLIP analysis. {interp.disclaimer}",
                           derivation="Key results page rendered from the EchoCLIP interpretation of this study")
    sc.ImageType = ["DERIVED", "SECONDARY"]
    _source_images(sc, interp, by_uid)
    return sc


def _source_images(ds: Dataset, interp: Interpretation, by_uid: dict) -> None:
    from pydicom.sequence import Sequence as DicomSequence

    items = []
    for c in interp.clips:
        ref = by_uid.get(c.sop_instance_uid)
        if ref is None:
            continue
        item = Dataset()
        item.ReferencedSOPClassUID = ref.SOPClassUID
        item.ReferencedSOPInstanceUID = ref.SOPInstanceUID
        items.append(item)
    if items:
        ds.SourceImageSequence = DicomSequence(items)


def page_pdf_bytes(pixels: np.ndarray) -> bytes:
    """The page as a one-page PDF (Pillow; lossless Flate image, 150 dpi)."""
    from PIL import Image

    img = Image.fromarray(pixels).convert("P", palette=Image.Palette.ADAPTIVE, colors=256)
    buf = io.BytesIO()
    img.save(buf, "PDF", resolution=150.0, title="EchoCLIP key results", creator=f"echonode {__version__}")
    return buf.getvalue()


def build_page_pdf(interp: Interpretation, sources: Sequence[Dataset], *,
                   now: Optional[datetime.datetime] = None, pixels: Optional[np.ndarray] = None) -> Dataset:
    """The key-results page as an Encapsulated PDF in the analysed study.

    ``pixels``: the page already rendered by :func:`render_page` (so the SC and the PDF
    show the same page); rendered here when omitted.
    """
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ref, by_uid = _ref(interp, sources)
    now = now or datetime.datetime.now(datetime.timezone.utc)
    if pixels is None:
        pixels = render_page(interp, ref, now=now)
    uids = page_uids(interp)
    m = interp.model
    sop_class = "1.2.840.10008.5.1.4.1.1.104.1"   # Encapsulated PDF Storage
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = uids["pdf"]
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = uids["pdf"]
    # Patient and General Study modules: copied from the analysed clip
    for kw in ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
               "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID",
               "AccessionNumber", "StudyDescription"):
        if kw in ref:
            setattr(ds, kw, ref.get(kw))
    for kw in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
               "ReferringPhysicianName", "StudyID", "AccessionNumber"):
        if kw not in ds:
            setattr(ds, kw, "")
    ds.StudyInstanceUID = interp.study_instance_uid
    # Encapsulated Document Series, General Equipment, SC Equipment
    ds.Modality = "DOC"
    ds.SeriesInstanceUID = uids["pdf-series"]
    ds.SeriesNumber = PDF_SERIES_NUMBER
    ds.SeriesDescription = (f"{DEMO_BANNER} key results PDF" if interp.demo
                            else "EchoCLIP key results PDF for physician review")[:64]
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = "echonode"
    ds.SoftwareVersions = [__version__, m.weights_sha256[:16]]
    ds.ConversionType = "SYN"
    # Encapsulated Document module
    ds.InstanceNumber = 1
    ds.ContentDate = now.strftime("%Y%m%d")
    ds.ContentTime = now.strftime("%H%M%S")
    ds.AcquisitionDateTime = ""
    ds.BurnedInAnnotation = "YES"
    ds.DocumentTitle = ("DEMO MODEL: " if interp.demo else "") + "EchoCLIP key results"
    ds.ConceptNameCodeSequence = []
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    pdf = page_pdf_bytes(pixels)
    ds.EncapsulatedDocumentLength = len(pdf)
    ds.EncapsulatedDocument = pdf + (b"\0" if len(pdf) % 2 else b"")
    src = Dataset()
    src.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    src.ReferencedSOPInstanceUID = uids["page"]
    from pydicom.sequence import Sequence as DicomSequence
    ds.SourceInstanceSequence = DicomSequence([src])
    ds.InstanceCreationDate = ds.ContentDate
    ds.InstanceCreationTime = ds.ContentTime
    return ds
