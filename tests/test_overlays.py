"""PromptCAM Secondary Capture overlays: valid (dciodvfy), same study, burned-in legend."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from echonode.dicom.overlays import blend, build_overlays, jet, render_overlay
from echonode.dicom.result_uids import result_uid
from tests.fixtures.interp import dciodvfy, make_interpretation, make_sources


@pytest.fixture(scope="module")
def sources(realworld_dir):
    return make_sources(realworld_dir)


@pytest.mark.parametrize("demo", [False, True])
def test_overlays_valid_same_study_own_series(sources, tmp_path, demo):
    interp = make_interpretation(sources, demo=demo)
    scs = build_overlays(interp, sources)
    assert len(scs) == len(interp.promptcams) == 2
    m = interp.model
    for i, (sc, cam) in enumerate(zip(scs, interp.promptcams)):
        path = tmp_path / f"sc{i}.dcm"
        sc.save_as(path, enforce_file_format=True)
        errors, warnings = dciodvfy(path)
        assert errors == [] and warnings == []
        back = pydicom.dcmread(path)
        assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
        assert back.StudyInstanceUID == interp.study_instance_uid
        assert back.PatientID == sources[0].PatientID
        assert back.SeriesInstanceUID not in {s.SeriesInstanceUID for s in sources}
        assert back.SeriesInstanceUID == result_uid(interp.study_instance_uid, m.weights_sha256,
                                                    m.echonode_version, "sc-series")
        assert back.SOPInstanceUID == result_uid(interp.study_instance_uid, m.weights_sha256,
                                                 m.echonode_version, "sc", i)
        assert back.BurnedInAnnotation == "YES"
        assert back.PhotometricInterpretation == "RGB" and back.SamplesPerPixel == 3
        assert back.SourceImageSequence[0].ReferencedSOPInstanceUID == cam.sop_instance_uid
        assert back.SourceImageSequence[0].ReferencedFrameNumber == cam.frame_index + 1
        assert ("DEMO MODEL" in back.SeriesDescription) is demo
        px = back.pixel_array
        h, w = cam.frame.shape[:2]
        assert px.shape[1] == w and px.shape[0] > h  # legend band below the image
    assert len({sc.SOPInstanceUID for sc in scs}) == 2


def test_demo_banner_is_burned_in(sources):
    """The demo render differs from the clinical one in the banner rows: the yellow band appears."""
    clinical = make_interpretation(sources, demo=False)
    demo = make_interpretation(sources, demo=True)
    a = render_overlay(clinical, clinical.promptcams[0])
    b = render_overlay(demo, demo.promptcams[0])
    h = clinical.promptcams[0].frame.shape[0]
    # top banner across the image: safety-yellow background
    top = b[1:4, :, :].astype(int)
    assert np.mean((top[..., 0] > 200) & (top[..., 1] > 150) & (top[..., 2] < 60)) > 0.5
    assert not np.array_equal(a[:h], b[:h])
    # the clip is too small for the legend over the image: it is in a band below, in white
    assert b.shape[0] > h and not np.array_equal(a[h:], np.zeros_like(a[h:]))


def test_heatmap_is_blended_where_salient():
    frame = np.full((40, 60, 3), 100, np.uint8)
    heat = np.zeros((40, 60), np.float32)
    heat[10:20, 10:20] = 1.0
    out = blend(frame, heat)
    assert np.array_equal(out[30:, 40:], frame[30:, 40:])  # cold: unchanged
    hot = out[15, 15].astype(int)
    assert hot[0] > 100 and hot[2] < 100  # jet red blended in
    assert tuple(jet(np.array([0.0]))[0]) == (0, 0, 128) or jet(np.array([0.0]))[0, 2] > 100
    assert tuple(jet(np.array([1.0]))[0])[0] > 100 and jet(np.array([1.0]))[0, 2] == 0
    with pytest.raises(ValueError, match="does not match"):
        blend(frame, np.zeros((5, 5), np.float32))


def test_no_promptcams_no_overlays(sources):
    interp = make_interpretation(sources, promptcams=False)
    assert build_overlays(interp, sources) == []


def test_engine_outputs_validate(tiny_bundle, realworld_dir, tmp_path, capsys, monkeypatch):
    """`echonode analyze --out` on a real clip (tiny random model): every SR and SC it
    writes through build_sr/build_overlays passes dciodvfy; the SR re-reads in highdicom."""
    import highdicom as hd

    from echonode.cli import main
    from tests.fixtures.interp import write_sources
    from tests.test_sr import EXPECTED_SR_WARNINGS

    monkeypatch.setenv("ECHONODE_DATA_DIR", str(tmp_path / "data"))  # prompt cache etc. stay in tmp
    monkeypatch.delenv("ECHONODE_CONFIG", raising=False)
    src = make_sources(realworld_dir)[:1]
    (path,) = write_sources(src, tmp_path / "in")
    out = tmp_path / "out"
    rc = main(["analyze", "--model", str(tiny_bundle.path), "--out", str(out), str(path)])
    assert rc == 0, capsys.readouterr().err
    folder = out / src[0].StudyInstanceUID
    srs = sorted(folder.glob("SR_*.dcm"))
    scs = sorted(folder.glob("SC_*.dcm"))
    pages = sorted(folder.glob("PAGE_*.dcm"))
    assert len(srs) == 1 and len(scs) >= 1 and len(pages) == 1
    scs += pages   # the key-results page is a Secondary Capture too
    errors, warnings = dciodvfy(srs[0])
    assert errors == [] and warnings == EXPECTED_SR_WARNINGS
    for sc in scs:
        assert dciodvfy(sc) == ([], [])
    sr = hd.sr.srread(srs[0])
    assert sr.StudyInstanceUID == src[0].StudyInstanceUID
    assert any(g.get_measurements(name=pydicom.sr.coding.Code("18043-0", "LN", "LVEF"))
               for g in sr.content.get_image_measurement_groups())
