"""Coded concepts for echonode's SR: one torch-free table keyed by EchoCLIP task id.

Codes follow research/dicom-anchors.md §5.5 (checked against pydicom's PS3.16
dictionaries). Where DICOM has no concept, echonode uses the private coding scheme
``99ECHONODE`` (declared in the SR's Coding Scheme Identification Sequence):

* ``ZS-*``   zero-shot method, score, threshold, threshold source, notes;
* ``DEV-*``  device subtypes DICOM lacks (Impella, TAVR, MitraClip);
* ``LVL-*``  severity levels DICOM lacks (small to moderate, moderate to large);
* ``LON-*``  longitudinal (EchoCLIP-R) comparison items;
* ``ZST<12 hex>``  a site-added task unknown to this table: the first 12 hex digits
  of sha256(task id); the CodeMeaning is the task's title.

Why a table here rather than in the prompt catalogue: the catalogue belongs to the
model side and the SR writer must stay importable without torch; this table is pure
data and is looked up by task id (aliases included), with the fallback above.
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
CHAMBER_SIZE = private("CHAMBER-SIZE", "Cardiac chamber size")

LON_SIMILARITY = private("LON-SIM", "Embedding similarity with prior study")
LON_SAME_THRESHOLD = private("LON-SAMETHR", "Same-patient similarity threshold")
LON_CHANGE_THRESHOLD = private("LON-CHGTHR", "Marked-change similarity threshold")
LON_MISMATCH = private("LON-MISMATCH", "Possible patient mismatch, for review")
LON_CHANGE = private("LON-CHANGE", "Possible marked change, for review")
LON_PRIOR = private("LON-PRIOR", "Prior study compared")
LON_NOTE = private("LON-NOTE", "Longitudinal comparison note")

QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")

# sites
LV = sct("87878005", "Left ventricle")
RV = sct("53085002", "Right ventricle")
LA = sct("82471001", "Left atrium")
RA = sct("73829009", "Right atrium")
PERICARDIUM = sct("76848001", "Pericardium")
AORTIC_VALVE = sct("34202007", "Aortic Valve")
MITRAL_VALVE = sct("91134007", "Mitral Valve")

TAMPONADE = sct("35304003", "Cardiac tamponade")
LVEF = Code("18043-0", "LN", "Left Ventricular Ejection Fraction by US")

# CID 3705 chamber size
CHAMBER_LEVELS = {
    "normal": sct("373124004", "Normal size cardiac chamber"),
    "mild": sct("373126002", "Mildly enlarged cardiac chamber"),
    "moderate": sct("373127006", "Moderately enlarged cardiac chamber"),
    "severe": sct("373128001", "Markedly enlarged cardiac chamber"),
}
# CID 3716 severity (+ absent for "normal")
SEVERITY_LEVELS = {
    "normal": ABSENT,
    "mild to moderate": sct("371923003", "Mild to Moderate"),
    "moderate to severe": sct("371924009", "Moderate to Severe"),
    "mild": sct("255604002", "Mild"),
    "moderate": sct("6736007", "Moderate"),
    "severe": sct("24484000", "Severe"),
}
# effusion size (size qualifiers; two private levels DICOM lacks)
EFFUSION_LEVELS = {
    "none": ABSENT,
    "normal": ABSENT,
    "small to moderate": private("LVL-SM-MOD", "Small to moderate"),
    "moderate to large": private("LVL-MOD-LG", "Moderate to large"),
    "trivial": dcm("113201", "Trace"),
    "trace": dcm("113201", "Trace"),
    "small": sct("255507004", "Small"),
    "moderate": sct("6736007", "Moderate"),
    "large": sct("255509001", "Large"),
    "tamponade": PRESENT,
}


@dataclass(frozen=True)
class TaskCodes:
    """How one task is coded in the SR.

    kind: ``num`` (NUM with ``concept`` in ``unit``), ``finding`` (CODE
    ``concept`` = Present/Absent), ``levels`` (CODE ``concept`` = a level code from
    ``levels``).
    """

    concept: Code
    kind: str
    site: Optional[Code] = None
    unit: Optional[Code] = None
    finding_type: Optional[Code] = None   # more specific (often private) concept
    negated: bool = False                 # "present" means the concept is absent
    levels: Optional[dict] = None


TASK_CODES: dict[str, TaskCodes] = {
    "ejection_fraction": TaskCodes(LVEF, "num", site=LV, unit=UCUM_PERCENT),
    # No PASP code in the DICOM echo CIDs (anchors §5.5): RVSP, the echo proxy, with the
    # method stated as a zero-shot estimate of PA systolic pressure.
    "pulmonary_artery_pressure_continuous": TaskCodes(
        sct("399023006", "Right Ventricular Peak Systolic Pressure"), "num", unit=UCUM_MMHG,
        finding_type=private("PASP-EST", "Estimated pulmonary artery systolic pressure")),
    "right_atrial_pressure": TaskCodes(sct("276755008", "Right Atrial Pressure"), "num", site=RA, unit=UCUM_MMHG),
    "pacemaker": TaskCodes(sct("360129009", "Cardiac pacemaker lead"), "finding"),
    "impella": TaskCodes(sct("360066001", "Left Ventricular Assist Device"), "finding", site=LV,
                         finding_type=private("DEV-IMPELLA", "Percutaneous microaxial LV assist device (Impella)")),
    "tavr": TaskCodes(sct("25510005", "Heart valve prosthesis"), "finding", site=AORTIC_VALVE,
                      finding_type=private("DEV-TAVR", "Transcatheter aortic valve prosthesis")),
    "mitraclip": TaskCodes(sct("77720000", "Clip"), "finding", site=MITRAL_VALVE,
                           finding_type=private("DEV-MITRACLIP", "Mitral transcatheter edge-to-edge repair clip")),
    "pericardial_effusion": TaskCodes(sct("373945007", "Pericardial effusion"), "levels", site=PERICARDIUM,
                                      levels=EFFUSION_LEVELS),
    "tamponade": TaskCodes(TAMPONADE, "finding", site=PERICARDIUM),
    "lv_hypertrophy": TaskCodes(sct("55827005", "Left ventricular hypertrophy"), "levels", site=LV,
                                levels=SEVERITY_LEVELS),
    "normal_wall_thickness": TaskCodes(sct("55827005", "Left ventricular hypertrophy"), "finding", site=LV,
                                       negated=True),
    "left_ventricle_size": TaskCodes(CHAMBER_SIZE, "levels", site=LV, levels=CHAMBER_LEVELS),
    "right_ventricle_size": TaskCodes(CHAMBER_SIZE, "levels", site=RV, levels=CHAMBER_LEVELS),
    "left_atrium_size": TaskCodes(CHAMBER_SIZE, "levels", site=LA, levels=CHAMBER_LEVELS),
    "right_atrium_size": TaskCodes(CHAMBER_SIZE, "levels", site=RA, levels=CHAMBER_LEVELS),
    "no_valvular_heart_disease": TaskCodes(sct("368009", "Valvular heart disease"), "finding", negated=True),
    "atrial_fibrillation": TaskCodes(sct("49436004", "Atrial Fibrillation"), "finding"),
}

ALIASES = {
    "lvef": "ejection_fraction",
    "pasp": "pulmonary_artery_pressure_continuous",
    "pulmonary_artery_pressure": "pulmonary_artery_pressure_continuous",
    "rap": "right_atrial_pressure",
    "lv_size": "left_ventricle_size",
    "rv_size": "right_ventricle_size",
    "la_size": "left_atrium_size",
    "ra_size": "right_atrium_size",
    "lvh": "lv_hypertrophy",
    "afib": "atrial_fibrillation",
}

# derived flags (TaskResult.derived) that have a standard concept of their own
DERIVED_CODES = {
    "tamponade": TAMPONADE,
}


def fallback_code(task_id: str, title: str) -> Code:
    """The documented private code for a task this table does not know."""
    h = hashlib.sha256(task_id.encode("utf-8")).hexdigest()[:12].upper()
    return private(f"ZST{h}", (title or task_id)[:64])


def codes_for(task_id: str, title: str = "", mode: str = "binary", unit: Optional[str] = None) -> TaskCodes:
    """Codes for ``task_id`` (aliases followed), else a private fallback by mode."""
    key = ALIASES.get(task_id, task_id)
    if key in TASK_CODES:
        return TASK_CODES[key]
    concept = fallback_code(task_id, title)
    if mode == "regression":
        return TaskCodes(concept, "num", unit=ucum(unit))
    if mode == "categorical":
        return TaskCodes(concept, "levels", levels=SEVERITY_LEVELS)
    return TaskCodes(concept, "finding")


def ucum(unit: Optional[str]) -> Code:
    """A UCUM Code for a unit string from the Interpretation."""
    if not unit or unit == "1":
        return UCUM_NO_UNITS
    if unit == "%":
        return UCUM_PERCENT
    if unit in ("mm[Hg]", "mmHg"):
        return UCUM_MMHG
    return Code(unit, "UCUM", unit)


def normalise_level(category: str) -> str:
    s = category.lower().replace("_", " ").replace("-", " ")
    return " ".join(s.split())


def level_code(levels: dict, category: Optional[str]) -> Optional[Code]:
    """The level code whose key occurs in ``category`` (longest key first)."""
    if not category:
        return None
    cat = normalise_level(category)
    for key in sorted(levels, key=len, reverse=True):
        if key in cat:
            return levels[key]
    if cat in ("no", "absent"):
        return ABSENT
    return None
