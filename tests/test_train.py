"""``echonode train``: a short real training run must learn (so a broken loss or scoring fails CI).

A 90-second CPU run (1 thread, 96 px) on 160 phantom studies must lower the loss and beat chance
in validation retrieval; the shipped demo model must separate fresh phantoms through ``echonode eval``.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest

from echonode import phantom as P


def _run(*args, timeout=600):
    p = subprocess.run([sys.executable, "-m", "echonode", *args], capture_output=True, text=True, timeout=timeout)
    return p


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    d = tmp_path_factory.mktemp("trainset")
    return P.generate_dataset(d, 160, seed=31, n_frames=12, rows=128, cols=128, longitudinal=0.3)


@pytest.mark.slow
def test_short_training_learns(dataset, tmp_path):
    """90 s of CPU training at 96 px: the contrastive loss falls and validation retrieval beats chance."""
    out = tmp_path / "run"
    p = _run("train", "--manifest", str(dataset), "--out", str(out), "--epochs", "400", "--batch-size", "32",
             "--lr", "2e-3", "--max-minutes", "1.5", "--threads", "1", "--low-res", "96",
             "--low-res-fraction", "1.0", "--val-every", "10", "--json")
    assert p.returncode == 0, p.stderr
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert summary["steps"] >= 50
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["loss"] for r in recs if r["event"] == "step"]
    assert np.mean(steps[-3:]) < np.mean(steps[:2]) - 0.05, steps        # the contrastive loss falls
    val = [r for r in recs if r["event"] == "epoch" and r.get("val_size") == 96]
    assert val and min(r["val_mcmrr"] / r["val_chance"] for r in val) < 0.85, val
    # the bundle it wrote is complete and loads, and records the LVEF values its training reports stated
    from echonode.model.bundle import Bundle
    b = Bundle.open(out / "bundle")
    assert b.architecture == "tiny"
    with open(dataset, newline="") as fh:
        efs = [round(float(r["lvef"])) for r in csv.DictReader(fh) if r["split"] == "train"]
    assert b.value_range("ejection_fraction") == (min(efs), max(efs))


def test_demo_model_scores_phantoms(tmp_path):
    """The shipped demo model, through eval's preprocessing, tokenizer and the interpreter's scoring,
    separates fresh phantoms (other seed, unseen patients): a broken scoring path fails here."""
    from echonode.model.bundle import DEMO_BUNDLE_DIR

    m = P.generate_dataset(tmp_path / "ph", 90, seed=77, n_frames=24, rows=160, cols=160, split="test")
    p = _run("eval", "--manifest", str(m), "--bundle", str(DEMO_BUNDLE_DIR), "--split", "test", "--out",
             str(tmp_path / "eval"), "--bootstrap", "50", "--no-plots", "--json", "--cache-dir", str(tmp_path / "c"))
    assert p.returncode == 0, p.stderr
    h = json.loads(p.stdout.strip().splitlines()[-1])["headline"]
    assert h["auc_pericardial_effusion"] > 0.8, h
    assert h["auc_severe_left_ventricle_dilation"] > 0.75, h
    assert h["auc_pacemaker"] > 0.8, h
    assert h["mcmrr_over_chance"] < 0.4, h
    assert h["lvef_mae_ratio"] < 0.9, h


def test_resume_and_bad_data(dataset, tmp_path):
    import csv

    # a manifest with an unreadable clip and an empty report: both reported and skipped
    rows = list(csv.DictReader(open(dataset, newline="")))[:24]
    base = dataset.parent
    bad = tmp_path / "broken.dcm"
    bad.write_bytes(b"not a dicom file at all")
    rows[0]["path"] = str(bad)
    rows[1]["report"] = ""
    for r in rows:
        r["split"] = "train" if r["split"] != "val" else "val"
        if not r["path"].startswith("/"):
            r["path"] = str(base / r["path"])
    m = tmp_path / "m.csv"
    with open(m, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    out = tmp_path / "run"
    p = _run("train", "--manifest", str(m), "--out", str(out), "--epochs", "1", "--batch-size", "8", "--lr", "1e-3",
             "--low-res", "64", "--json")
    assert p.returncode == 0, p.stderr
    assert "empty report" in p.stderr and "cannot decode" in p.stderr
    p = _run("train", "--manifest", str(m), "--out", str(out), "--epochs", "2", "--batch-size", "8", "--lr", "1e-3",
             "--low-res", "64", "--resume", "--json")
    assert p.returncode == 0, p.stderr
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(r["event"] == "resume" and r["epoch"] == 1 for r in recs)
    assert [r["epoch"] for r in recs if r["event"] == "epoch"] == [0, 1]
    from echonode.model.bundle import Bundle
    b = Bundle.open(out / "bundle")
    assert b.architecture == "tiny" and b.tokenizer_kind == "clip-bpe"
    # a split leak is refused
    rows[2]["patient_id"] = rows[3]["patient_id"] = "LEAK"
    rows[2]["split"], rows[3]["split"] = "train", "val"
    with open(m, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    p = _run("train", "--manifest", str(m), "--out", str(tmp_path / "r2"), "--epochs", "1")
    assert p.returncode == 1 and "more than one split" in p.stderr
