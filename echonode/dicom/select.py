"""Is this instance an apical-4-chamber cine clip worth analysing? Answers with a reason.

:func:`decide` looks only at header attributes (it never decodes pixels), so it runs
at receive time on the dataset parsed with ``stop_before_pixels``. Rules, in order:

1. Structured Reports, Secondary Capture and Enhanced US Volume objects are skipped.
2. Spectral Doppler and M-mode, from the Sequence of Ultrasound Regions
   (PS3.3 C.8.5.5.1: Region Spatial Format (0018,6012) 2 = M-Mode, 3 = Spectral;
   Region Data Type (0018,6014) 3 = PW Spectral Doppler, 4 = CW Spectral Doppler),
   are skipped.
3. Not a cine clip (fewer than ``select.min_frames`` frames) is skipped.
4. A coded view (View Code Sequence (0054,0220), CID 12226) decides: apical four
   chamber (SCT 399214001, or the legacy SNOMED-RT code G-A19C) is analysed, any other
   coded view is skipped.
5. View name / free text (View Name (0008,2127), Series Description, Image Comments,
   Protocol Name, Acquisition/Performed Procedure descriptions) is matched against
   ``select.a4c_text_patterns`` (analyse) and ``select.skip_text_patterns`` (skip).
6. No view information: ``select.unknown_view_policy`` (default ``analyse``, and the
   reason says so, because many carts never label their clips).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional

from echonode.config import SelectSettings

ANALYSE = "analyse"
SKIP = "skip"

#: (coding scheme designator, code value) pairs that mean "apical four chamber".
A4C_CODES = {
    ("SCT", "399214001"),
    ("SNM3", "G-A19C"),
    ("SRT", "G-A19C"),
    ("99SDM", "G-A19C"),
}

SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
SECONDARY_CAPTURE = {
    "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.7.1", "1.2.840.10008.5.1.4.1.1.7.2",
    "1.2.840.10008.5.1.4.1.1.7.3", "1.2.840.10008.5.1.4.1.1.7.4",
}
ENHANCED_US_VOLUME = "1.2.840.10008.5.1.4.1.1.6.2"
US_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.3.1", "1.2.840.10008.5.1.4.1.1.3",
    "1.2.840.10008.5.1.4.1.1.6.1", "1.2.840.10008.5.1.4.1.1.6",
}

# PS3.3 C.8.5.5.1.1 / C.8.5.5.1.2
SPATIAL_MMODE = 2
SPATIAL_SPECTRAL = 3
DATA_PW_SPECTRAL = 3
DATA_CW_SPECTRAL = 4

TEXT_ATTRIBUTES = ("ViewName", "SeriesDescription", "ImageComments", "ProtocolName",
                   "PerformedProcedureStepDescription", "AcquisitionDeviceProcessingDescription")


@dataclass(frozen=True)
class Decision:
    decision: str          # "analyse" | "skip"
    reason: str
    view_code: Optional[str] = None   # "SCT:399214001"
    view_name: Optional[str] = None

    @property
    def analyse(self) -> bool:
        return self.decision == ANALYSE


def _get(ds: Any, keyword: str, default: Any = None) -> Any:
    try:
        value = ds.get(keyword, default)
    except Exception:  # a malformed element must not break selection
        return default
    return default if value is None else value


def _int(value: Any) -> Optional[int]:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def coded_view(ds: Any) -> tuple[Optional[str], Optional[str], bool]:
    """(view_code "SCHEME:VALUE", code meaning, is_a4c) from View Code Sequence, or Nones."""
    seq = _get(ds, "ViewCodeSequence")
    if not seq:
        return None, None, False
    try:
        item = seq[0]
    except Exception:
        return None, None, False
    scheme = str(_get(item, "CodingSchemeDesignator", "")).strip()
    value = str(_get(item, "CodeValue", "") or _get(item, "LongCodeValue", "")).strip()
    meaning = str(_get(item, "CodeMeaning", "")).strip() or None
    if not value:
        return None, meaning, False
    return f"{scheme}:{value}", meaning, (scheme, value) in A4C_CODES


def _regions(ds: Any) -> list[tuple[Optional[int], Optional[int]]]:
    seq = _get(ds, "SequenceOfUltrasoundRegions")
    out = []
    if not seq:
        return out
    try:
        for item in seq:
            out.append((_int(_get(item, "RegionSpatialFormat")), _int(_get(item, "RegionDataType"))))
    except Exception:
        return out
    return out


def number_of_frames(ds: Any) -> int:
    n = _int(_get(ds, "NumberOfFrames"))
    return n if n and n > 0 else 1


def decide(ds: Any, settings: SelectSettings | None = None) -> Decision:
    """Decide analyse/skip for one instance header (pydicom Dataset or mapping-like)."""
    settings = settings or SelectSettings()
    sop_class = str(_get(ds, "SOPClassUID", "")).strip()
    view_code, code_meaning, is_a4c_code = coded_view(ds)
    view_name = str(_get(ds, "ViewName", "")).strip() or code_meaning

    def result(decision: str, reason: str) -> Decision:
        return Decision(decision, reason, view_code, view_name)

    if sop_class.startswith(SR_PREFIX):
        return result(SKIP, "structured report, not an image")
    if sop_class in SECONDARY_CAPTURE:
        return result(SKIP, "secondary capture, not an acquired ultrasound clip")
    if sop_class == ENHANCED_US_VOLUME:
        return result(SKIP, "enhanced US volume (3D/4D), not a 2D cine clip")
    modality = str(_get(ds, "Modality", "")).strip().upper()
    if sop_class not in US_CLASSES and modality != "US":
        return result(SKIP, f"not an ultrasound image (SOP class {sop_class or 'missing'})")

    regions = _regions(ds)
    if any(sf == SPATIAL_SPECTRAL or dt in (DATA_PW_SPECTRAL, DATA_CW_SPECTRAL) for sf, dt in regions):
        return result(SKIP, "spectral Doppler (ultrasound region of spectral type)")
    if any(sf == SPATIAL_MMODE for sf, _ in regions):
        return result(SKIP, "M-mode (ultrasound region of M-mode type)")

    frames = number_of_frames(ds)
    if frames < max(2, settings.min_frames):
        what = "single frame" if frames == 1 else f"{frames} frames < select.min_frames={settings.min_frames}"
        return result(SKIP, f"not a cine clip ({what})")

    if view_code:
        if is_a4c_code:
            return result(ANALYSE, f"A4C cine clip by coded view {view_code} ({frames} frames)")
        return result(SKIP, f"coded view {view_code} ({code_meaning or 'no meaning'}) is not apical four chamber")

    for attr in TEXT_ATTRIBUTES:
        text = str(_get(ds, attr, "")).strip()
        if not text:
            continue
        for pat in settings.a4c_text_patterns:
            if re.search(pat, text, re.IGNORECASE):
                return result(ANALYSE, f"A4C cine clip by {attr} matching /{pat}/ ({frames} frames)")
        for pat in settings.skip_text_patterns:
            if re.search(pat, text, re.IGNORECASE):
                return result(SKIP, f"other view by {attr} matching /{pat}/")

    if settings.unknown_view_policy == ANALYSE:
        return result(ANALYSE, f"cine clip without view information ({frames} frames); "
                               "analysed by select.unknown_view_policy=analyse")
    return result(SKIP, "cine clip without view information; skipped by select.unknown_view_policy=skip")
