"""Phantom echoes: determinism, visible signs of the truth, reports, real DICOM."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys

import numpy as np
import pydicom
import pytest

from echonode import phantom as P


def _render(**truth):
    base = dict(lvef=60, heart_rate=70, pasp=25, lv_dilation=0, rv_dilation=0, la_dilation=0, ra_dilation=0,
                lv_hypertrophy=0, pericardial_effusion=0, tamponade=False, pacemaker=False, mitraclip=0,
                impella=False, tavr=False)
    base.update(truth)
    return P.render_clip(P.PhantomTruth(**base), n_frames=24, rows=128, cols=128, seed=3, anatomy_seed=9,
                         ecg=False).astype(np.float32)


def test_deterministic_from_seed():
    a = P.make_clip(7, n_frames=6, rows=96, cols=96)
    b = P.make_clip(7, n_frames=6, rows=96, cols=96)
    c = P.make_clip(8, n_frames=6, rows=96, cols=96)
    assert a.frames.dtype == np.uint8 and a.frames.shape == (6, 96, 96, 3)
    assert np.array_equal(a.frames, b.frames) and a.report == b.report and a.truth == b.truth
    assert not np.array_equal(a.frames, c.frames)


def test_sector_and_speckle_look_like_echo():
    f = _render()[0, ..., 0]
    assert f[2, 2] == 0 and f[2, -3] == 0            # outside the sector is black
    inside = f[40:90, 40:90]
    assert inside.std() > 10                         # speckle, not flat shading


def test_effusion_opens_dark_space():
    dark = lambda v: ((v[..., 0] > 0) & (v[..., 0] < 60)).mean()   # echo-free, inside the sector
    assert dark(_render(pericardial_effusion=3)) > dark(_render()) + 0.03


def test_lvef_drives_wall_motion():
    # the LV cavity area (echo-free pixels in the LV half) swings more over the cycle at high EF
    def swing(ef):
        v = _render(lvef=ef)[:, 15:80, 64:115, 0]
        area = ((v > 0) & (v < 60)).mean(axis=(1, 2))
        return area.max() - area.min()
    assert swing(70) > swing(15) * 1.5


def test_dilation_and_devices_are_visible():
    cavity = lambda v: ((v > 0) & (v < 60)).mean()
    assert cavity(_render(lv_dilation=3)[:, 15:80, 64:120, 0]) > cavity(_render()[:, 15:80, 64:120, 0]) * 1.15
    bright = lambda v: (v[..., 0] > 200).mean()
    base = _render()
    assert bright(_render(pacemaker=True)[:, :, :64]) > bright(base[:, :, :64]) + 0.0015   # lead in RA/RV
    assert bright(_render(mitraclip=2)) > bright(base)
    assert bright(_render(tavr=True)) > bright(base)
    assert not np.array_equal(_render(impella=True), _render())


def test_report_uses_template_vocabulary_and_prompts():
    from echonode.model.tokenize import TemplateTokenizer

    tok = TemplateTokenizer()
    for s in range(20):
        rng = np.random.default_rng(s)
        truth = P.sample_truth(rng, pacemaker=bool(s % 2), mitraclip=s % 3, tavr=bool(s % 4 == 0))
        rep = P.make_report(truth, rng)
        assert tok.encode(rep).dropped_chars == 0, rep   # every phrase is in template_vocab.txt
        assert f"{int(round(truth.lvef))}%" in rep
        if truth.pacemaker:
            assert "SUGGESTIVE OF CATHETER, PACER LEAD, OR ICD LEAD. " in rep
        if truth.tavr:
            assert "A BIOPROSTHETIC STENT-VALVE IS PRESENT IN THE AORTIC POSITION. " in rep
        if truth.mitraclip:
            assert "MITRACLIP" in rep


def test_dicom_as_carts_write_it(tmp_path):
    from echonode.dicom.frames import load_clip

    clip = P.make_clip(3, n_frames=8, rows=128, cols=160)
    path = P.write_dicom(tmp_path / "a4c.dcm", clip, patient_id="PH-T1", patient_name="PHANTOM^T",
                         birth_date="19500101", sex="F", study_uid=P._uid("t", "study"),
                         series_uid=P._uid("t", "series"), sop_uid=P._uid("t", "sop"), study_date="20240102")
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == P.US_MULTIFRAME_SOP_CLASS
    assert ds.file_meta.TransferSyntaxUID == P.JPEG_BASELINE
    assert ds.PhotometricInterpretation == "YBR_FULL_422"
    assert int(ds.NumberOfFrames) == 8 and (ds.Rows, ds.Columns) == (128, 160)
    assert float(ds.FrameTime) == pytest.approx(clip.frame_time_ms, abs=0.01)
    assert ds.ViewCodeSequence[0].CodeValue == "399214001"
    assert ds.ViewCodeSequence[0].CodingSchemeDesignator == "SCT"
    got = load_clip(path)
    assert got.frames.shape == clip.frames.shape
    assert np.abs(got.frames.astype(int) - clip.frames.astype(int)).mean() < 6   # lossy, but the same image
    if shutil.which("dciodvfy"):
        p = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
        errors = [ln for ln in (p.stdout + p.stderr).splitlines() if ln.startswith("Error")]
        assert not errors, errors


def test_dataset_manifest_longitudinal_and_splits(tmp_path):
    m = P.generate_dataset(tmp_path / "a", 14, seed=4, n_frames=4, rows=64, cols=64, longitudinal=0.8)
    rows = list(csv.DictReader(open(m, newline="")))
    assert len(rows) == 14
    assert set(P.MANIFEST_COLUMNS) <= set(rows[0])
    by_pid = {}
    for r in rows:
        assert (tmp_path / "a" / r["path"]).is_file()
        by_pid.setdefault(r["patient_id"], []).append(r)
    assert any(len(v) > 1 for v in by_pid.values())                 # patients with several studies
    for v in by_pid.values():
        assert len({r["split"] for r in v}) == 1                      # a patient stays in one split
        dates = [r["study_date"] for r in v]
        assert dates == sorted(dates) and len(set(dates)) == len(dates)
        assert len({r["study_uid"] for r in v}) == len(v)
    m2 = P.generate_dataset(tmp_path / "b", 14, seed=4, n_frames=4, rows=64, cols=64, longitudinal=0.8)
    assert open(m).read() == open(m2).read()                          # deterministic, UIDs included
    with pytest.raises(ValueError):
        P.generate_dataset(tmp_path / "c", 2, split="bogus")


def test_cli(tmp_path):
    out = tmp_path / "cli"
    p = subprocess.run([sys.executable, "-m", "echonode", "phantom", "--out", str(out), "--studies", "2", "--seed", "1",
                        "--frames", "3", "--size", "64", "--json"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert (out / "manifest.csv").is_file()
    p = subprocess.run([sys.executable, "-m", "echonode", "phantom", "--out", str(out), "--studies", "0"],
                       capture_output=True, text=True)
    assert p.returncode == 2
