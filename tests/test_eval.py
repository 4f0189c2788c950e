"""Evaluation metrics, label rules, manifests, eval/calibrate commands."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from echonode import phantom as P
from train import labels as L
from train import metrics as M
from train.manifest import ManifestError, load_manifest


# ------------------------------------------------------------------ metrics

def test_auc_known_values():
    assert M.auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert M.auc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert M.auc([0, 1], [0.5, 0.5]) == 0.5
    # hand-computed: positives {0.4, 0.8}, negatives {0.1, 0.4, 0.6}: pairs won 1+0.5+0 + 1+1+1 = 4.5 / 6
    assert M.auc([1, 0, 0, 1, 0], [0.4, 0.1, 0.4, 0.8, 0.6]) == pytest.approx(4.5 / 6)
    assert math.isnan(M.auc([1, 1], [0.1, 0.2]))


def test_bootstrap_and_youden():
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(200), np.ones(100)]
    s = np.r_[rng.normal(0, 1, 200), rng.normal(1.5, 1, 100)]
    a = M.auc(y, s)
    lo, hi = M.bootstrap_ci(y, s, n_boot=300)
    assert lo < a < hi and hi - lo < 0.15
    yd = M.youden(y, s)
    sens, spec = M.sens_spec(y, s, yd["threshold"])
    assert sens == pytest.approx(yd["sensitivity"]) and spec == pytest.approx(yd["specificity"])
    assert 0.3 < yd["threshold"] < 1.2
    assert M.mae([1, 2, 3], [2, 2, 5]) == pytest.approx(1.0)


def test_retrieval_ranks():
    e = np.eye(5)
    r = M.retrieval(e, e)
    assert r["mcmrr"] == 1.0 and r["chance_rank"] == 3.0
    r = M.retrieval(e, e[::-1])                   # everything wrong
    assert r["mcmrr"] > 1.0
    y, sim = M.same_patient_pairs(np.array([[1, 0], [1, 0.1], [0, 1], [0.1, 1]]), ["a", "a", "b", "b"])
    assert y.sum() == 2 and M.auc(y, sim) == 1.0


# ------------------------------------------------------------------ labels

def test_report_rules_agree_with_phantom_truth():
    from echonode.interpret.prompts import load_catalog

    cat = load_catalog()
    for s in range(60):
        rng = np.random.default_rng(s)
        t = P.sample_truth(rng)
        lab = L.report_labels(P.make_report(t, rng), cat)
        truth = L.truth_labels(t.as_row())
        for k in ("pacemaker", "impella", "tavr", "mitraclip", "lv_dilation", "rv_dilation", "la_dilation",
                  "ra_dilation", "lv_hypertrophy", "pericardial_effusion", "tamponade", "lvef", "pasp"):
            assert lab[k] == truth[k], (s, k, lab[k], truth[k])


def test_report_rules_on_free_text():
    lab = L.report_labels("Severely dilated left ventricle. LV ejection fraction was 35 %. "
                          "Estimated pulmonary artery systolic pressure was 48 mmHg. Small pericardial effusion.")
    assert lab["lv_dilation"] == 3 and lab["lvef"] == 35 and lab["pasp"] == 48 and lab["pericardial_effusion"] == 1
    assert math.isnan(lab["rv_dilation"])           # not mentioned: unknown, not normal
    assert L.task_label("severe_left_ventricle_dilation", lab) == 1
    assert L.task_label("moderate_left_ventricle_dilation", lab) == 1   # grade >= 2
    assert math.isnan(L.task_label("mild_right_ventricle_size", lab))


def test_stated_value_range_and_trained_ranges():
    from train.loop import trained_value_ranges

    ef = ["THE LEFT VENTRICULAR EJECTION FRACTION IS ESTIMATED TO BE <#>% ", "LV EJECTION FRACTION IS <#>%. "]
    reports = ["Normal LV size. LV ejection fraction was 35 %. Estimated PA pressure is 40 mmHg.",
               "THE LEFT VENTRICULAR EJECTION FRACTION IS ESTIMATED TO BE 67.5% NORMAL WALL THICKNESS.",
               "LV EJECTION FRACTION IS 52%. LV EJECTION FRACTION IS 20 %.",
               "NO NUMBERS HERE. EJECTION FRACTION 90%."]               # not in a prompt's phrasing
    assert L.stated_value_range(reports, ef) == (20, 68)
    assert L.stated_value_range(["NORMAL STUDY."], ef) is None
    # from scratch ({}): the ranges the reports state; a published start (None) reads 0-100: nothing
    # recorded; a trained start is widened
    got = trained_value_ranges(reports, {})
    assert got["ejection_fraction"] == [20, 68] and got["pulmonary_artery_pressure"] == [40, 40]
    assert trained_value_ranges(reports, None) is None
    assert trained_value_ranges(reports, {"ejection_fraction": [10, 50]})["ejection_fraction"] == [10, 68]
    assert trained_value_ranges(["NORMAL STUDY."], {}) is None


# ------------------------------------------------------------------ manifests

def _write_manifest(path, rows):
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["path", "report", "patient_id", "study_date", "split"])
        w.writeheader()
        w.writerows(rows)


def test_manifest_problems_and_leaks(tmp_path):
    (tmp_path / "a.dcm").write_bytes(b"x")
    good = {"path": "a.dcm", "report": "NORMAL LEFT VENTRICULAR SIZE. ", "patient_id": "p1",
            "study_date": "2024-01-01", "split": "train"}
    _write_manifest(tmp_path / "m.csv", [good, {**good, "report": ""}, {**good, "path": "missing.dcm"},
                                         {**good, "split": "holdout"}])
    m = load_manifest(tmp_path / "m.csv")
    assert len(m.rows) == 1 and len(m.problems) == 3
    assert any("empty report" in p for p in m.problems)
    _write_manifest(tmp_path / "leak.csv", [good, {**good, "split": "test"}])
    with pytest.raises(ManifestError, match="more than one split"):
        load_manifest(tmp_path / "leak.csv")
    with pytest.raises(ManifestError, match="missing column"):
        (tmp_path / "bad.csv").write_text("path,report\na.dcm,x\n")
        load_manifest(tmp_path / "bad.csv")


def test_manifest_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    (tmp_path / "a.dcm").write_bytes(b"x")
    t = pa.table({"path": ["a.dcm"], "report": ["X. "], "patient_id": ["p"], "study_date": ["2024-01-01"],
                  "split": ["val"], "lvef": [55.0]})
    pq.write_table(t, tmp_path / "m.parquet")
    m = load_manifest(tmp_path / "m.parquet")
    assert m.rows[0].split == "val" and m.rows[0].value("lvef") == "55.0"


# ------------------------------------------------------------------ eval + calibrate end to end

@pytest.fixture(scope="module")
def phantom_set(tmp_path_factory):
    d = tmp_path_factory.mktemp("evalset")
    m = P.generate_dataset(d, 16, seed=21, n_frames=6, rows=96, cols=96, longitudinal=0.7, split="val")
    return m


@pytest.fixture(scope="module")
def random_bundle(tmp_path_factory):
    import torch
    from echonode.model.bundle import write_bundle
    from echonode.model.clip import build_model

    torch.manual_seed(0)
    b = write_bundle(tmp_path_factory.mktemp("b") / "tiny", build_model("tiny").state_dict(), name="tiny-random",
                     architecture="tiny", tokenizer_kind="clip-bpe")
    return b.path


def test_eval_and_calibrate_commands(phantom_set, random_bundle, tmp_path):
    out = tmp_path / "eval"
    p = subprocess.run([sys.executable, "-m", "echonode", "eval", "--manifest", str(phantom_set), "--bundle",
                        str(random_bundle), "--split", "val", "--out", str(out), "--bootstrap", "50", "--json",
                        "--cache-dir", str(tmp_path / "cache")], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout.strip().splitlines()[-1])
    for f in ("metrics.md", "metrics.csv", "metrics.json", "roc.png", "scatter_ejection_fraction.png"):
        assert (out / f).stat().st_size > 0
    met = json.loads((out / "metrics.json").read_text())
    assert met["n"] == 16 and met["label_sources"] == {"truth": 16}
    assert "retrieval" in met and met["retrieval"]["chance_rank"] == 8.5
    assert "ejection_fraction" in met["regression"] and "lvef_mae" in res["headline"]
    assert "pacemaker" in met["binary"]
    # calibrate writes a calibration the bundle loader accepts
    p = subprocess.run([sys.executable, "-m", "echonode", "calibrate", "--manifest", str(phantom_set), "--bundle",
                        str(random_bundle), "--split", "val", "--json", "--cache-dir", str(tmp_path / "cache")],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    from echonode.model.bundle import Bundle
    cal = Bundle.open(random_bundle).calibration
    assert cal["provenance"]["n"] == 16 and cal["provenance"]["tool"].startswith("echonode calibrate")
    for tid, e in cal["tasks"].items():
        assert math.isfinite(e["threshold"]) and 0 <= e["auc"] <= 1 and e["n"] >= 6
    assert "same_patient_threshold" in cal.get("longitudinal", {})


def test_eval_refuses_leaky_manifest(tmp_path, random_bundle):
    (tmp_path / "a.dcm").write_bytes(b"x")
    row = {"path": "a.dcm", "report": "X. ", "patient_id": "p", "study_date": "2024-01-01", "split": "train"}
    _write_manifest(tmp_path / "m.csv", [row, {**row, "split": "test"}])
    p = subprocess.run([sys.executable, "-m", "echonode", "eval", "--manifest", str(tmp_path / "m.csv"),
                        "--bundle", str(random_bundle), "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert p.returncode == 1 and "more than one split" in p.stderr
