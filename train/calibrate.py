"""``echonode calibrate``: decision thresholds from a labelled manifest, into the bundle.

* Tasks whose score separates the classes with an AUC below ``min_auc`` (0.6) or with
  fewer than 3 positives or negatives get no threshold (listed as skipped).
* Binary tasks: the threshold at Youden's index of the zero-shot score (the interpreter
  calls "present" when ``score > threshold``), with its AUC, n, sensitivity, specificity.
* Categorical levels that have no binary task of their own (e.g. pericardial effusion
  levels): key ``"<task>:<level value>"``, positive when the grade is at least that level.
  Levels with a binary task (``severe_left_ventricle_dilation`` …) use that task's entry.
* Longitudinal: ``same_patient_threshold`` (Youden on the cosine of two studies' embeddings,
  same patient vs different patients; below it the node flags a possible patient
  mismatch) and ``change_threshold`` (Youden on consecutive studies of one patient,
  "changed" = a procedure in between (manifest column ``procedure``) or a labelled change:
  a device appearing or LVEF moving by ≥ 10 points; below it the node flags a marked change).

The result is ``calibration.json`` in the bundle (format of the common contract) with
provenance (data set, date, n, tool). Longitudinal thresholds go to the EchoCLIP-R
bundle when one is given (it makes the study embeddings), else to the same bundle.
"""

from __future__ import annotations

import datetime as _dt
import math
from collections import defaultdict
from pathlib import Path
from typing import Optional

import numpy as np

from echonode import __version__
from train import labels as L
from train import metrics as M
from train.evaluate import EvalConfig, _select_rows, score_manifest
from train.manifest import load_manifest

MIN_POS = 3  # fewer positives (or negatives) than this: no threshold for the task
#: a score that does not separate the classes better than this gets no threshold: a yes/no
#: call from it would be noise (the interpreter then reports the task as uncalibrated)
MIN_AUC = 0.6


def _entry(y, s, min_auc: float = MIN_AUC) -> Optional[dict]:
    y = np.asarray(y, float)
    s = np.asarray(s, float)
    ok = np.isfinite(y) & np.isfinite(s)
    y, s = y[ok], s[ok]
    npos = int(y.sum())
    if npos < MIN_POS or len(y) - npos < MIN_POS:
        return None
    a = M.auc(y, s)
    if not a >= min_auc:
        return None
    yd = M.youden(y, s)
    return {"threshold": round(float(yd["threshold"]), 6), "auc": round(M.auc(y, s), 4), "n": int(len(y)),
            "n_pos": npos, "sensitivity": round(yd["sensitivity"], 4), "specificity": round(yd["specificity"], 4)}


def _changed(prev: dict, cur: dict, procedure: str) -> float:
    if procedure:
        return 1.0
    for dev in L.DEVICE_TASKS:
        a, b = prev.get(dev, math.nan), cur.get(dev, math.nan)
        if not (math.isnan(a) or math.isnan(b)) and a != b:
            return 1.0
    a, b = prev.get("lvef", math.nan), cur.get("lvef", math.nan)
    if not (math.isnan(a) or math.isnan(b)):
        return 1.0 if abs(a - b) >= 10 else 0.0
    return 0.0


def longitudinal(scores, min_auc: float = MIN_AUC) -> tuple[Optional[dict], dict]:
    """(longitudinal calibration or None, details)."""
    emb = scores.study_emb
    rows = scores.rows
    if emb is None or len(rows) < 3:
        return None, {"note": "too few studies"}
    y, sim = M.same_patient_pairs(emb, [r.patient_id for r in rows])
    out: dict = {}
    det: dict = {"same_patient_pairs": int(y.sum()), "different_patient_pairs": int((~y).sum())}
    if y.sum() >= MIN_POS and (~y).sum() >= MIN_POS and M.auc(y, sim) >= min_auc:
        yd = M.youden(y, sim)
        out["same_patient_threshold"] = round(float(yd["threshold"]), 6)
        out["auc"] = round(M.auc(y, sim), 4)
        out["n"] = int(len(y))
        out["same_patient_sensitivity"] = round(yd["sensitivity"], 4)
        out["same_patient_specificity"] = round(yd["specificity"], 4)
    # change: consecutive studies of one patient
    by_pid = defaultdict(list)
    for i, r in enumerate(rows):
        by_pid[r.patient_id].append(i)
    ch_y, ch_s = [], []
    e = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    for idx in by_pid.values():
        idx = sorted(idx, key=lambda i: rows[i].study_date)
        for a, b in zip(idx[:-1], idx[1:]):
            ch_y.append(_changed(scores.labels[a], scores.labels[b], (rows[b].value("procedure") or "")))
            ch_s.append(float(e[a] @ e[b]))
    det["consecutive_pairs"] = len(ch_y)
    det["changed_pairs"] = int(sum(ch_y))
    ch = _entry(ch_y, -np.asarray(ch_s), min_auc) if ch_y else None
    if ch:
        out["change_threshold"] = round(-ch["threshold"], 6)  # flag when similarity < threshold
        out["change_auc"] = ch["auc"]
        out["change_n"] = ch["n"]
    return (out or None), det


def calibrate(manifest: str, bundle: str, *, split: str = "val", r_bundle: str = "", device: str = "cpu",
              precision: str = "fp32", channel_order: str = "bgr", cache_dir: str = "", tasks_file: str = "",
              dataset: str = "", write: bool = True, min_auc: float = MIN_AUC) -> dict:
    """Compute thresholds; write them into the bundle(s) unless ``write`` is False."""
    from echonode.interpret.prompts import load_catalog
    from echonode.model.bundle import Bundle, write_calibration

    man = load_manifest(manifest)
    rows = _select_rows(man, split)
    if len(rows) < 4:
        raise ValueError(f"{manifest}: split {split!r} has {len(rows)} usable row(s); need at least 4")
    cfg = EvalConfig(manifest=manifest, bundle=bundle, r_bundle=r_bundle, split=split, device=device,
                     precision=precision, channel_order=channel_order, cache_dir=cache_dir or str(Path(manifest).parent / ".echonode-cache"),
                     tasks_file=tasks_file)
    s = score_manifest(cfg, rows)
    catalog = load_catalog(tasks_file or None)
    tasks: dict = {}
    skipped: list = []
    for tid, sc in s.binary.items():
        y = [L.task_label(tid, lab) for lab in s.labels]
        e = _entry(y, sc, min_auc)
        if e:
            tasks[tid] = e
        elif not all(math.isnan(v) for v in y):
            skipped.append(tid)
    for tid, per in s.categorical.items():
        task = catalog.get(tid)
        g = np.array([L.categorical_grade(tid, lab) for lab in s.labels], float)
        if np.all(np.isnan(g)) or task is None:
            continue
        for lv in task.levels:
            if lv.value == 0 or lv.value not in per:
                continue
            if lv.task and lv.task in tasks:
                continue
            y = np.where(np.isnan(g), np.nan, (g >= lv.value).astype(float))
            e = _entry(y, per[lv.value], min_auc)
            if e:
                tasks[f"{tid}:{lv.value}"] = e
            else:
                skipped.append(f"{tid}:{lv.value}")
    lon, lon_details = longitudinal(s, min_auc)
    prov = {"dataset": dataset or f"{Path(manifest).name} [{split}]",
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "n": len(s.rows), "tool": f"echonode calibrate {__version__}"}
    cal = {"provenance": prov, "tasks": tasks}
    target_r = r_bundle or bundle
    if lon and target_r == bundle:
        cal["longitudinal"] = lon
    written = []
    if write:
        write_calibration(Bundle.open(bundle).path, cal)
        written.append(str(Path(bundle)))
        if lon and target_r != bundle:
            rb = Bundle.open(target_r)
            rcal = dict(rb.calibration or {})
            rcal["provenance"] = prov
            rcal.setdefault("tasks", {})
            rcal["longitudinal"] = lon
            write_calibration(rb.path, rcal)
            written.append(str(Path(target_r)))
    return {"calibration": cal, "longitudinal": lon, "longitudinal_details": lon_details, "skipped": skipped,
            "written": written, "problems": list(man.problems) + list(s.problems)}
