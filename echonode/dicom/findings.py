"""The key findings of an Interpretation, chosen and worded once for every reader.

The key-results page (:mod:`echonode.dicom.page`) and the SR's leading summary
container (:mod:`echonode.dicom.sr_summary`) both show these, in this order:

1. left ventricular function: LVEF (the regression task in ``%``) with its derived
   categories (``lvef_lt_50`` ...);
2. devices (catalogue group ``device``);
3. chamber sizes (the categorical tasks of group ``chamber``);
4. hypertrophy (categorical tasks of group ``lv``);
5. pericardium: effusion and tamponade (group ``pericardium``);
6. haemodynamics: PASP, right atrial pressure (group ``hemodynamics``, and any other
   regression task).

Nothing is re-derived: every word comes from a :class:`TaskResult` field (value, call,
category, threshold source). A task appears in the first section whose rule it meets;
tasks in no section (valves, rhythm, the binary chamber grades behind the categorical
ones) stay in the SR's per-task groups.

This module imports neither torch nor pydicom.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from echonode.interpretation import (
    CALL_ABSENT, CALL_PRESENT, THRESHOLD_CALIBRATED, THRESHOLD_NONE, THRESHOLD_PUBLISHED,
    Interpretation, TaskResult,
)

__all__ = ["Finding", "Section", "key_findings", "is_lvef", "calibration_split", "comparison_lines",
           "UNIT_WORDS"]

UNIT_WORDS = {"%": "%", "mm[Hg]": "mmHg", "mmHg": "mmHg", "1": ""}


def is_lvef(t: TaskResult) -> bool:
    """The ejection fraction: the regression task reported in percent."""
    return t.mode == "regression" and t.unit == "%"


def _categorical(group: str) -> Callable[[TaskResult], bool]:
    return lambda t: t.group == group and t.mode == "categorical"


SECTION_RULES: tuple[tuple[str, Callable[[TaskResult], bool]], ...] = (
    ("Left ventricular function", is_lvef),
    ("Devices", lambda t: t.group == "device"),
    ("Chamber sizes", _categorical("chamber")),
    ("Hypertrophy", _categorical("lv")),
    ("Pericardium", lambda t: t.group == "pericardium"),
    ("Haemodynamics", lambda t: t.group == "hemodynamics" or t.mode == "regression"),
)


@dataclass(frozen=True)
class Finding:
    task: TaskResult
    call: str                  # what the model says, in words: "57 %", "PRESENT", "Mild", "not called"
    detail: str                # where the call comes from: score, threshold and its source
    calibrated: bool           # the call rests on a calibrated or published threshold
    derived: tuple[str, ...] = ()   # e.g. "LVEF < 50 %: no"

    @property
    def title(self) -> str:
        return self.task.title


@dataclass(frozen=True)
class Section:
    title: str
    findings: tuple[Finding, ...]


def _num(v: Optional[float], unit: Optional[str]) -> str:
    u = UNIT_WORDS.get(unit or "", unit or "")
    return f"{v:.0f} {u}".strip() if v is not None else "not available"


def _derived_words(key: str, flag: Optional[bool]) -> str:
    word = "not determined" if flag is None else ("yes" if flag else "no")
    label = key.replace("_", " ")
    if key.startswith("lvef_lt_") and key[8:].isdigit():
        label = f"LVEF < {key[8:]} %"
    elif key == "hfref":
        label = "HFrEF"
    elif key.startswith("lvef_ge_") and key[8:].isdigit():
        label = f"LVEF \u2265 {key[8:]} %"
    return f"{label}: {word}"


def _threshold_words(t: TaskResult) -> str:
    if t.threshold_source == THRESHOLD_PUBLISHED:
        return f"published threshold {t.threshold:.3f}" if t.threshold is not None else "published thresholds"
    if t.threshold_source == THRESHOLD_CALIBRATED:
        return f"calibrated threshold {t.threshold:.3f}" if t.threshold is not None else "calibrated level thresholds"
    return "uncalibrated"


def finding(t: TaskResult) -> Finding:
    """One task's result as words."""
    calibrated = t.threshold_source in (THRESHOLD_CALIBRATED, THRESHOLD_PUBLISHED)
    if t.mode == "regression":
        derived = tuple(_derived_words(k, v) for k, v in sorted(t.derived.items(), reverse=True))
        detail = "zero-shot estimate, " + ("calibrated" if calibrated else "uncalibrated")
        return Finding(t, _num(t.value, t.unit), detail, calibrated, derived)
    score = t.score
    if score is None and t.category and t.category in t.scores:
        score = t.scores[t.category]
    score_words = f"score {score:.3f}" if score is not None else "no score"
    if t.mode == "binary":
        if t.call == CALL_PRESENT:
            call = "PRESENT"
        elif t.call == CALL_ABSENT:
            call = "absent"
        else:
            call = "not called"
        return Finding(t, call, f"{score_words}; {_threshold_words(t)}", calibrated)
    call = t.category if t.category else "not called"
    return Finding(t, call, f"{score_words}; {_threshold_words(t)}", calibrated)


def key_findings(interp: Interpretation) -> list[Section]:
    """The sections above, each with the tasks of ``interp`` that belong to it (empty
    sections are left out)."""
    placed: set[str] = set()
    out = []
    for title, rule in SECTION_RULES:
        items = []
        for tid, t in interp.tasks.items():
            if tid in placed or not rule(t):
                continue
            placed.add(tid)
            items.append(finding(t))
        if items:
            out.append(Section(title, tuple(items)))
    return out


def calibration_split(interp: Interpretation) -> tuple[list[str], list[str]]:
    """(titles of tasks whose call rests on a calibrated/published threshold,
    titles of uncalibrated tasks), in catalogue order."""
    cal, unc = [], []
    for t in interp.tasks.values():
        (unc if t.threshold_source == THRESHOLD_NONE else cal).append(t.title)
    return cal, unc


def comparison_lines(interp: Interpretation) -> list[str]:
    """The comparison with the prior study, in words (empty without EchoCLIP-R)."""
    lon = interp.longitudinal
    if lon is None:
        return []
    ref = lon.reference
    if ref is None:
        return ["No prior study of this patient to compare with."]
    d = ref.study_date
    date = f"{d[:4]}-{d[4:6]}-{d[6:8]}" if len(d) == 8 and d.isdigit() else "unknown date"
    lines = [f"Prior study of {date}: similarity {ref.similarity:.3f}"]

    def flag(v: Optional[bool], yes: str, no: str) -> str:
        return "not assessed (uncalibrated)" if v is None else (yes if v else no)
    lines.append("Possible patient mismatch: " + flag(lon.possible_patient_mismatch, "YES, please check", "no"))
    lines.append("Marked change since prior: " + flag(lon.marked_change, "YES, please compare", "no"))
    if len(lon.priors) > 1:
        lines.append(f"{len(lon.priors)} prior studies compared")
    return lines
