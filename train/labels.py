"""Ground-truth labels for evaluation and calibration.

Two sources, in this order:

1. **Truth columns** (phantom manifests, or a site's own labelled columns with the same
   names): ``lvef``, ``pasp``, ``pacemaker``, ``impella``, ``tavr``, ``mitraclip``
   (number of clips), ``lv_dilation``/``rv_dilation``/``la_dilation``/``ra_dilation``
   (0-3), ``lv_hypertrophy`` (0-3), ``pericardial_effusion`` (0-3), ``tamponade``.
2. **Report text** (real data), with the rules below. The report is normalised like the
   EchoCLIP-R cleaner does for matching: upper case, whitespace collapsed, ``WAS``→``IS``,
   ``-LY`` severity adverbs → adjectives (``SEVERELY``→``SEVERE``), ``PULMONARY ARTERY``→``PA``.
   A prompt of the task catalogue "appears" when its text (normalised, trailing period
   and space dropped, ``<#>`` and any number = any number) is a substring of the report.

=====================================  ====================================================
label                                  rule on the report text
=====================================  ====================================================
devices (pacemaker, impella, tavr,     1 if any catalogue prompt (``label_sources``) of the
mitraclip)                             task appears, else 0 (reports name devices present)
chamber size grade (LV, RV, LA, RA)    highest k of ``<SEV> DILATED <CHAMBER>`` (MILD=1,
                                       MODERATE=2, SEVERE=3); 0 if a normal-size sentence
                                       (``NORMAL LEFT VENTRICULAR SIZE``, ``THE LEFT ATRIUM
                                       IS NORMAL IN SIZE``, …) appears; else unknown
per-severity binary tasks              positive when grade ≥ that severity (e.g.
(``severe_left_ventricle_dilation``)   severe_… = grade 3; moderate_… = grade ≥ 2)
LV hypertrophy grade                   ``<SEV> LEFT VENTRICULAR HYPERTROPHY`` → 1-3;
                                       ``NORMAL LEFT VENTRICULAR WALL THICKNESS`` → 0
normal_wall_thickness                  1 when the hypertrophy grade is 0
pericardial effusion grade             the catalogue's effusion prompts with their values
                                       (TRIVIAL/SMALL 1, SMALL TO MODERATE/MODERATE 2,
                                       MODERATE TO LARGE/LARGE 3); ``NO PERICARDIAL
                                       EFFUSION`` → 0; else unknown
cardiac tamponade                      a tamponade prompt appears (``CARDIAC TAMPONADE IS
                                       (NOW) PRESENT``, ``EVIDENCE OF EARLY TAMPONADE``)
                                       and no ``NO LONGER PRESENT`` / ``NO … EVIDENCE``
LVEF (%)                               first ``LV EJECTION FRACTION IS n%`` or ``THE LEFT
                                       VENTRICULAR EJECTION FRACTION IS ESTIMATED TO BE n%``
PASP (mmHg)                            first ``ESTIMATED PA SYSTOLIC PRESSURE IS n MMHG``,
                                       ``ESTIMATED PA PRESSURE IS n``, ``PA PEAK PRESSURE
                                       IS n`` or ``ESTIMATED PEAK RVSP IS n`` (0-150)
=====================================  ====================================================

Unknown labels are NaN and the clip is left out of that task's metrics.
"""

from __future__ import annotations

import math
import re
from typing import Mapping, Optional

NAN = float("nan")

SEV = {"MILD": 1, "MODERATE": 2, "SEVERE": 3}
CHAMBERS = {
    "lv": ("LEFT VENTRICLE", ("NORMAL LEFT VENTRICULAR SIZE",)),
    "rv": ("RIGHT VENTRICLE", ("NORMAL RIGHT VENTRICULAR SIZE",)),
    "la": ("LEFT ATRIUM", ("NORMAL LEFT ATRIAL SIZE", "THE LEFT ATRIUM IS NORMAL IN SIZE")),
    "ra": ("RIGHT ATRIUM", ("NORMAL RIGHT ATRIAL SIZE", "THE RIGHT ATRIUM IS NORMAL IN SIZE")),
}
#: catalogue binary task → (chamber, minimum grade)
SEVERITY_TASKS = {}
for _c, _name in (("lv", "left_ventricle_dilation"), ("rv", "right_ventricle_size"),
                  ("la", "left_atrium_size"), ("ra", "right_atrium_size")):
    for _g, _w in ((1, "mild"), (2, "moderate"), (3, "severe")):
        SEVERITY_TASKS[f"{_w}_{_name}"] = (_c, _g)
#: categorical catalogue task → chamber
CHAMBER_CATEGORICAL = {"left_ventricle_size": "lv", "right_ventricle_size": "rv",
                       "left_atrium_size": "la", "right_atrium_size": "ra"}
DEVICE_TASKS = ("pacemaker", "impella", "tavr", "mitraclip")

_EF = re.compile(r"(?:LV EJECTION FRACTION IS|LEFT VENTRICULAR EJECTION FRACTION IS ESTIMATED TO BE)\s*(\d+(?:\.\d+)?)\s*%")
_PASP = re.compile(r"(?:ESTIMATED PA SYSTOLIC PRESSURE IS|ESTIMATED PA PRESSURE IS|PA PEAK PRESSURE IS|"
                   r"ESTIMATED PEAK RVSP IS)\s*(\d+(?:\.\d+)?)\s*MMHG")
_EFFUSION = (("MODERATE TO LARGE PERICARDIAL EFFUSION", 3), ("SMALL TO MODERATE PERICARDIAL EFFUSION", 2),
             ("LARGE PERICARDIAL EFFUSION", 3), ("MODERATE PERICARDIAL EFFUSION", 2),
             ("SMALL PERICARDIAL EFFUSION", 1), ("TRIVIAL PERICARDIAL EFFUSION", 1))


def normalise(text: str) -> str:
    t = " ".join(str(text).upper().split())
    t = re.sub(r"\bWAS\b", "IS", t)
    t = re.sub(r"\bWERE\b", "ARE", t)
    for a, b in (("NORMALLY", "NORMAL"), ("MILDLY", "MILD"), ("MODERATELY", "MODERATE"),
                 ("SEVERELY", "SEVERE"), ("PULMONARY ARTERY", "PA")):
        t = t.replace(a, b)
    t = re.sub(r"\s+(MMHG|MM|CM|%)", r"\1", t)
    return t


def prompt_pattern(prompt: str, capture: bool = False) -> re.Pattern:
    p = normalise(prompt).rstrip(" .")
    # "<#>" and any number in the prompt (testers carry example values such as 4.0CM) match any number
    p = re.sub(r"\d+(?:\.\d+)?", "<#>", p)
    parts = [re.escape(x) for x in p.split("<#>")]
    return re.compile((r"(\d+(?:\.\d+)?)" if capture else r"\d+(?:\.\d+)?").join(parts))


def stated_value_range(reports, templates) -> Optional[tuple[int, int]]:
    """(lowest, highest) whole value that ``reports`` state in one of the regression prompt
    ``templates`` (``<#>`` = the value, e.g. ``LV EJECTION FRACTION IS <#>%.``), or None."""
    pats = [prompt_pattern(t, capture=True) for t in templates if "<#>" in t]
    texts = [normalise(r) for r in reports]
    vals = [float(m.group(1)) for t in texts for pat in pats for m in pat.finditer(t)]
    return (int(math.floor(min(vals))), int(math.ceil(max(vals)))) if vals else None


def prompt_in(report_norm: str, prompts) -> bool:
    return any(prompt_pattern(p).search(report_norm) for p in prompts)


def _f(row: Mapping, key: str) -> Optional[float]:
    v = row.get(key) if row else None
    if v is None or str(v).strip() == "":
        return None
    try:
        x = float(v)
    except ValueError:
        return None
    return x if math.isfinite(x) else None


def chamber_grade(report_norm: str, chamber: str) -> float:
    name, normals = CHAMBERS[chamber]
    best = None
    for word, g in SEV.items():
        if re.search(rf"\b{word} DILATED {name}\b", report_norm):
            best = g if best is None else max(best, g)
    if best is not None:
        return float(best)
    if any(n in report_norm for n in normals):
        return 0.0
    return NAN


def report_labels(report: str, catalog=None) -> dict[str, float]:
    """Labels from report text (see the module table); NaN = unknown."""
    r = normalise(report)
    out: dict[str, float] = {}
    for dev in DEVICE_TASKS:
        prompts = catalog[dev].prompts if catalog and dev in catalog else ()
        out[dev] = 1.0 if prompts and prompt_in(r, prompts) else 0.0
    for c in CHAMBERS:
        out[f"{c}_dilation"] = chamber_grade(r, c)
    m = re.search(r"\b(MILD|MODERATE|SEVERE) LEFT VENTRICULAR HYPERTROPHY\b", r)
    out["lv_hypertrophy"] = float(SEV[m.group(1)]) if m else (0.0 if "NORMAL LEFT VENTRICULAR WALL THICKNESS" in r else NAN)
    eff = NAN
    for phrase, g in _EFFUSION:
        if phrase in r:
            eff = float(g)
            break
    if math.isnan(eff) and "NO PERICARDIAL EFFUSION" in r:
        eff = 0.0
    out["pericardial_effusion"] = eff
    tamp = ("CARDIAC TAMPONADE IS PRESENT" in r or "CARDIAC TAMPONADE IS NOW PRESENT" in r
            or "EVIDENCE OF EARLY TAMPONADE" in r) and "NO LONGER PRESENT" not in r \
        and "NO ECHOCARDIOGRAPHIC EVIDENCE TO SUGGEST CARDIAC TAMPONADE" not in r
    out["tamponade"] = 1.0 if tamp else (0.0 if not math.isnan(eff) else NAN)
    m = _EF.search(r)
    out["lvef"] = float(m.group(1)) if m else NAN
    m = _PASP.search(r)
    out["pasp"] = float(m.group(1)) if m and 0 <= float(m.group(1)) <= 150 else NAN
    return out


def truth_labels(extra: Mapping) -> Optional[dict[str, float]]:
    """Labels from truth columns, or None when the row has none."""
    keys = ("lvef", "pasp", "pacemaker", "impella", "tavr", "mitraclip", "lv_dilation", "rv_dilation",
            "la_dilation", "ra_dilation", "lv_hypertrophy", "pericardial_effusion", "tamponade")
    vals = {k: _f(extra, k) for k in keys}
    if all(v is None for v in vals.values()):
        return None
    out = {k: (NAN if v is None else float(v)) for k, v in vals.items()}
    if not math.isnan(out["mitraclip"]):
        out["mitraclip"] = float(out["mitraclip"] > 0)
    return out


def row_labels(report: str, extra: Mapping, catalog=None) -> tuple[dict[str, float], str]:
    """(labels, source) where source is "truth" or "report"."""
    t = truth_labels(extra)
    if t is not None:
        return t, "truth"
    return report_labels(report, catalog), "report"


def task_label(task_id: str, labels: Mapping[str, float]) -> float:
    """The binary label of a catalogue task (NaN = unknown / not labelled)."""
    if task_id in DEVICE_TASKS:
        return labels.get(task_id, NAN)
    if task_id in SEVERITY_TASKS:
        c, g = SEVERITY_TASKS[task_id]
        v = labels.get(f"{c}_dilation", NAN)
        return NAN if math.isnan(v) else float(v >= g)
    if task_id == "normal_wall_thickness":
        v = labels.get("lv_hypertrophy", NAN)
        return NAN if math.isnan(v) else float(v == 0)
    if task_id == "cardiac_tamponade":
        return labels.get("tamponade", NAN)
    return NAN


def categorical_grade(task_id: str, labels: Mapping[str, float]) -> float:
    if task_id in CHAMBER_CATEGORICAL:
        return labels.get(f"{CHAMBER_CATEGORICAL[task_id]}_dilation", NAN)
    if task_id == "lv_hypertrophy":
        return labels.get("lv_hypertrophy", NAN)
    if task_id == "pericardial_effusion":
        v = labels.get("pericardial_effusion", NAN)
        if labels.get("tamponade") == 1.0:
            return 4.0
        return v
    return NAN


REGRESSION_LABELS = {"ejection_fraction": "lvef", "pulmonary_artery_pressure": "pasp"}
