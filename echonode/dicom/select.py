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
   The text comes from the peer, so it is bounded first (:func:`bounded_text`: runs of
   white space collapsed, then at most :data:`TEXT_MAX_CHARS` characters), and every
   pattern, the defaults and the site's own, has passed :func:`check_text_pattern`
   (no nested or chained unbounded repetition, no back-references), so no text can make
   a match backtrack beyond a fixed step budget.
6. No view information: ``select.unknown_view_policy`` (default ``analyse``, and the
   reason says so, because many carts never label their clips).
"""

from __future__ import annotations

import functools
import itertools
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

#: Free text is matched on its first TEXT_MAX_CHARS characters only. View labels are short
#: ("A4C", "Apical 4 chamber"); 1 KiB keeps every real label and bounds the work a peer
#: can cause per attribute.
TEXT_MAX_CHARS = 1024
#: Worst-case backtracking steps a pattern may need on a TEXT_MAX_CHARS text (estimated by
#: :func:`pattern_cost`). One unbounded repeat (``\s*``, ``.*``) costs about
#: TEXT_MAX_CHARS² ≈ 1 M; two chained ones (``.*.*``) are cubic and are refused.
PATTERN_STEP_BUDGET = 8 * TEXT_MAX_CHARS * TEXT_MAX_CHARS
PATTERN_MAX_CHARS = 256

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


def bounded_text(value: Any) -> str:
    """The part of a free-text attribute that selection looks at.

    Multi-valued text is joined with ``\\`` as on the wire; runs of white space become one
    space; at most :data:`TEXT_MAX_CHARS` characters are kept. The input is cut before it
    is joined or split, so a huge value costs no more than a short one.
    """
    if value is None:
        return ""
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value[: 4 * TEXT_MAX_CHARS]).decode("latin-1")
    if not isinstance(value, str):
        try:  # multi-valued (pydicom MultiValue, list): only the first values are looked at
            parts = list(itertools.islice(iter(value), TEXT_MAX_CHARS))
        except TypeError:
            parts = [value]
        value = "\\".join(str(p)[: 4 * TEXT_MAX_CHARS] for p in parts)
    return " ".join(value[: 4 * TEXT_MAX_CHARS].split())[:TEXT_MAX_CHARS]


def _parser():
    try:
        import re._parser as sre_parse  # Python 3.11+
        from re import _constants as sre_constants
    except ImportError:  # pragma: no cover - Python < 3.11
        import sre_constants
        import sre_parse
    return sre_parse, sre_constants


def pattern_cost(pattern: str, n: int = TEXT_MAX_CHARS) -> int:
    """Upper estimate of the backtracking steps ``re.search(pattern)`` needs on n characters.

    Raises ``ValueError`` naming the construct for what has no polynomial bound at all:
    a quantifier or an alternation inside a repeated group (``(a+)+``, ``(a|aa)*``),
    back-references and conditionals.
    Sequences multiply, alternatives add, a repeat of at most m costs (min(m, n) + 1)
    times its body; the search tries every one of the n start positions.
    """
    sre_parse, c = _parser()
    repeats = {c.MAX_REPEAT, c.MIN_REPEAT}
    if hasattr(c, "POSSESSIVE_REPEAT"):
        repeats.add(c.POSSESSIVE_REPEAT)

    def seq_cost(items, in_repeat: bool) -> int:
        total = 1
        for op, av in items:
            total *= item_cost(op, av, in_repeat)
            if total > 10**18:
                return total
        return total

    def item_cost(op, av, in_repeat: bool) -> int:
        if op in repeats:
            lo, hi, body = av
            if in_repeat:
                raise ValueError("a quantifier inside a repeated group (e.g. (a+)+) can backtrack exponentially")
            inner = seq_cost(body, in_repeat or hi > 1)
            return (min(hi, n) + 1) * inner
        if op == c.SUBPATTERN:
            return seq_cost(av[-1], in_repeat)
        if op == c.BRANCH:
            if in_repeat:
                raise ValueError("an alternation inside a repeated group (e.g. (a|aa)*) can backtrack exponentially")
            return sum(seq_cost(alt, in_repeat) for alt in av[1])
        if op in (c.ASSERT, c.ASSERT_NOT):
            return seq_cost(av[1], in_repeat)
        if hasattr(c, "ATOMIC_GROUP") and op == c.ATOMIC_GROUP:
            return seq_cost(av, in_repeat)
        if op in (c.GROUPREF, c.GROUPREF_EXISTS) or (hasattr(c, "GROUPREF_IGNORE") and op == c.GROUPREF_IGNORE):
            raise ValueError("back-references and conditional groups are not allowed")
        return 1

    parsed = sre_parse.parse(pattern, re.IGNORECASE)
    return n * seq_cost(list(parsed), False)


def check_text_pattern(pattern: str) -> None:
    """Raise ``ValueError`` (with the reason) unless ``pattern`` is safe to run on peer text."""
    if not isinstance(pattern, str) or not pattern:
        raise ValueError("an empty pattern matches everything")
    if len(pattern) > PATTERN_MAX_CHARS:
        raise ValueError(f"longer than {PATTERN_MAX_CHARS} characters")
    try:
        re.compile(pattern, re.IGNORECASE)
    except re.error as exc:
        raise ValueError(f"not a regular expression: {exc}") from None
    try:
        cost = pattern_cost(pattern)
    except re.error as exc:  # pragma: no cover - compile() above already parsed it
        raise ValueError(f"not a regular expression: {exc}") from None
    if cost > PATTERN_STEP_BUDGET:
        raise ValueError("too much backtracking on a 1 KiB text (more than one unbounded repeat "
                         "such as \\s* or .* in a row); use ? or a bounded {0,n} instead")


@functools.lru_cache(maxsize=64)
def _compiled(patterns: tuple[str, ...]) -> tuple[re.Pattern, ...]:
    return tuple(re.compile(p, re.IGNORECASE) for p in patterns)


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
    scheme = bounded_text(_get(item, "CodingSchemeDesignator", ""))[:16]
    value = bounded_text(_get(item, "CodeValue", "") or _get(item, "LongCodeValue", ""))[:64]
    meaning = bounded_text(_get(item, "CodeMeaning", ""))[:64] or None
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
    sop_class = bounded_text(_get(ds, "SOPClassUID", ""))[:64]  # a UID is at most 64 characters
    view_code, code_meaning, is_a4c_code = coded_view(ds)
    view_name = bounded_text(_get(ds, "ViewName", ""))[:64] or code_meaning

    def result(decision: str, reason: str) -> Decision:
        return Decision(decision, reason, view_code, view_name)

    if sop_class.startswith(SR_PREFIX):
        return result(SKIP, "structured report, not an image")
    if sop_class in SECONDARY_CAPTURE:
        return result(SKIP, "secondary capture, not an acquired ultrasound clip")
    if sop_class == ENHANCED_US_VOLUME:
        return result(SKIP, "enhanced US volume (3D/4D), not a 2D cine clip")
    modality = bounded_text(_get(ds, "Modality", ""))[:16].upper()
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

    a4c = _compiled(tuple(settings.a4c_text_patterns))
    other = _compiled(tuple(settings.skip_text_patterns))
    for attr in TEXT_ATTRIBUTES:
        text = bounded_text(_get(ds, attr, ""))
        if not text:
            continue
        for rx in a4c:
            if rx.search(text):
                return result(ANALYSE, f"A4C cine clip by {attr} matching /{rx.pattern}/ ({frames} frames)")
        for rx in other:
            if rx.search(text):
                return result(SKIP, f"other view by {attr} matching /{rx.pattern}/")

    if settings.unknown_view_policy == ANALYSE:
        return result(ANALYSE, f"cine clip without view information ({frames} frames); "
                               "analysed by select.unknown_view_policy=analyse")
    return result(SKIP, "cine clip without view information; skipped by select.unknown_view_policy=skip")
