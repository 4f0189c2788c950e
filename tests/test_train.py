"""``echonode train``: a short real training run must learn (so a broken loss or scoring fails CI)."""

from __future__ import annotations

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
    return P.generate_dataset(d, 110, seed=31, n_frames=12, rows=128, cols=128, longitudinal=0.3)


@pytest.mark.slow
def test_one_minute_of_training_beats_chance(dataset, tmp_path):
    out = tmp_path / "run"
    p = _run("train", "--manifest", str(dataset), "--out", str(out), "--epochs", "200", "--batch-size", "32",
             "--lr", "2e-3", "--max-minutes", "1", "--low-res", "96", "--low-res-fraction", "0.75", "--json")
    assert p.returncode == 0, p.stderr
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert summary["steps"] >= 10
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in recs if r["event"] == "epoch"]
    assert epochs and all("val_mcmrr" in r for r in epochs)
    steps = [r for r in recs if r["event"] == "step"]
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.3          # the contrastive loss falls
    # the bundle loads and its zero-shot scores separate what the phantoms show (training split:
    # this checks that loss, tokenizer, preprocessing and scoring fit together, not generalisation)
    ev = tmp_path / "eval"
    p = _run("eval", "--manifest", str(dataset), "--bundle", str(out / "bundle"), "--split", "train", "--out",
             str(ev), "--bootstrap", "50", "--no-plots", "--json", "--cache-dir", str(out / "cache"))
    assert p.returncode == 0, p.stderr
    h = json.loads(p.stdout.strip().splitlines()[-1])["headline"]
    assert h["mcmrr_over_chance"] < 0.6, h
    aucs = [h.get("auc_pacemaker"), h.get("auc_pericardial_effusion"), h.get("auc_mitraclip"), h.get("auc_tavr")]
    aucs = [a for a in aucs if a is not None]
    assert max(aucs) > 0.75 and np.mean(aucs) > 0.6, h


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
