"""Coded concepts for echonode's SR.

Task codes come from the task catalogue in use (built-in ``tasks.toml`` plus the site's
``model.tasks_file``) as data: the Interpreter copies each task's concept, site, unit,
value code, level codes and private code into ``TaskResult.coding`` (research/dicom-anchors.md
§5.5), so this module never reads the catalogue. It adds only the concepts of the SR frame itself. Where DICOM has no concept,
echonode uses the private coding scheme ``99ECHONODE`` (declared in the SR's Coding
Scheme Identification Sequence):

* ``ZS-*``   zero-shot method, score, threshold, threshold source, notes;
* ``LON-*``  longitudinal (EchoCLIP-R) comparison items;
* the catalogue's own private codes (``PACER-LEAD``, ``IMPELLA``, ...);
* ``ZST<12 hex>``  a task the catalogue does not know: the first 12 hex digits of
  sha256(task id), upper case; the CodeMeaning is the task's title.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional

from pydicom.sr.coding import Code

PRIVATE_SCHEME = "99ECHONODE"
PRIVATE_SCHEME_NAME = "echonode private codes"
PRIVATE_SCHEME_ORG = "echonode project"


def private(value: str, meaning: str) -> Code:
    return Code(value, PRIVATE_SCHEME, meaning)


def sct(value: str, meaning: str) -> Code:
    return Code(value, "SCT", meaning)


def dcm(value: str, meaning: str) -> Code:
    return Code(value, "DCM", meaning)


# ---------------------------------------------------------------- generic concepts
PRESENT = dcm("121053", "Present")
ABSENT = dcm("121054", "Absent")
YES = sct("373066001", "Yes")
NO = sct("373067005", "No")
ECHOCARDIOGRAPHY = sct("40701008", "Echocardiography")
APICAL_4_CHAMBER = sct("399214001", "Apical four chamber")
AI_FAMILY = dcm("123110", "Artificial Intelligence")
FINDING = dcm("121071", "Finding")
STUDY_INSTANCE_UID = dcm("110180", "Study Instance UID")
STUDY_DATE = dcm("111060", "Study Date")

UCUM_PERCENT = Code("%", "UCUM", "Percent")
UCUM_MMHG = Code("mm[Hg]", "UCUM", "mmHg")
UCUM_NO_UNITS = Code("1", "UCUM", "no units")

METHOD_BINARY = private("ZS-BIN", "EchoCLIP zero-shot binary: mean cosine similarity to prompts")
METHOD_REGRESSION = private("ZS-REG", "EchoCLIP zero-shot regression: prompt similarity ranking")
METHOD_CATEGORICAL = private("ZS-CAT", "EchoCLIP zero-shot categorical: best matching level")
SCORE = private("ZS-SCORE", "Zero-shot similarity score")
THRESHOLD = private("ZS-THRESHOLD", "Decision threshold for the similarity score")
THRESHOLD_SOURCE = private("ZS-THRSRC", "Threshold source")
METHOD_NOTE = private("ZS-METHOD", "Zero-shot method")
DERIVED_NOTE = private("ZS-DERIVED", "Derived call")
LEVEL_SCORES = private("ZS-LEVELS", "Zero-shot scores per level")
CATEGORY_NOTE = private("ZS-CATEGORY", "Zero-shot category")
DISCLAIMER = private("ZS-DISCLAIMER", "Nature of these results")
DEMO_BANNER = private("ZS-DEMO", "Demonstration model warning")
PROCESSING_NOTE = private("ZS-NOTE", "Processing note")

LON_SIMILARITY = private("LON-SIM", "Embedding similarity with prior study")
LON_SAME_THRESHOLD = private("LON-SAMETHR", "Same-patient similarity threshold")
LON_CHANGE_THRESHOLD = private("LON-CHGTHR", "Marked-change similarity threshold")
LON_MISMATCH = private("LON-MISMATCH", "Possible patient mismatch, for review")
LON_CHANGE = private("LON-CHANGE", "Possible marked change, for review")
LON_PRIOR = private("LON-PRIOR", "Prior study compared")
LON_NOTE = private("LON-NOTE", "Longitudinal comparison note")

QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")

@dataclass(frozen=True)
class TaskCodes:
    """How one task is coded in the SR (taken from the task catalogue).

    * ``concept``: the concept name (NUM name for regression, CODE name otherwise);
    * ``value_code``: binary tasks whose "present" is a specific value (e.g. chamber
      "Markedly enlarged"); absent is then coded as ``private`` = Absent;
    * ``levels``: categorical level value → code;
    * ``private``: the task's own private code (finding type).
    """

    concept: Code
    private: Code
    site: Optional[Code] = None
    unit: Optional[Code] = None
    value_code: Optional[Code] = None
    levels: Optional[dict] = None
    notes: str = ""


def _code(c) -> Optional[Code]:
    if c is None:
        return None
    return Code(c[0], c[1], c[2])


def fallback_code(task_id: str, title: str) -> Code:
    """The documented private code for a task the catalogue does not know."""
    h = hashlib.sha256(task_id.encode("utf-8")).hexdigest()[:12].upper()
    return private(f"ZST{h}", (title or task_id)[:64])


def codes_for(task) -> TaskCodes:
    """Codes for a :class:`~echonode.interpretation.TaskResult`, from the catalogue codes it
    carries (``task.coding``); a task without them gets :func:`fallback_code` as its concept."""
    coding = task.coding
    if coding is None:
        code = fallback_code(task.task_id, task.title)
        return TaskCodes(concept=code, private=code, unit=ucum(task.unit) if task.unit else None)
    return TaskCodes(
        concept=_code(coding.concept),
        private=_code(coding.private),
        site=_code(coding.site),
        unit=_code(coding.unit) or (ucum(task.unit) if task.unit else None),
        value_code=_code(coding.value_code),
        levels={int(v): _code(c) for v, c in coding.levels} or None,
        notes=coding.notes,
    )


def ucum(unit: Optional[str]) -> Code:
    """A UCUM Code for a unit string from the Interpretation."""
    if not unit or unit == "1":
        return UCUM_NO_UNITS
    if unit == "%":
        return UCUM_PERCENT
    if unit in ("mm[Hg]", "mmHg"):
        return UCUM_MMHG
    return Code(unit, "UCUM", unit)
