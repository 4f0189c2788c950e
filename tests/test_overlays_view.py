"""Overlays a cardiologist can read: at the clip's own size, the map registered with the
source frame, the legend and the DEMO banner legible (Tesseract reads them), valid DICOM."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from echonode.dicom.overlays import (
    DIM, build_overlays, cam_geometry, crop_to_source, heat_on_source, peak_on_source, render_overlay,
)
from echonode.interpretation import DEMO_BANNER
from echonode.model.preprocess import crop_and_scale, crop_box
from tests.fixtures.interp import dciodvfy
from tests.fixtures.view import COLS, MARKER, MARKER_IN, MARKER_OUT, ROWS, magenta_centroid, ocr, save_png


@pytest.mark.parametrize("shape", [(480, 640), (600, 800), (768, 1024), (640, 480), (101, 100), (224, 224), (9, 30)])
def test_crop_box_is_what_crop_and_scale_keeps(shape):
    """The geometry the overlay maps through is the preprocessing's own crop."""
    rng = np.random.default_rng(sum(shape))
    frame = rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8)
    top, left, h, w = crop_box(*shape)
    assert top >= 0 and left >= 0 and top + h <= shape[0] and left + w <= shape[1]
    import cv2
    expect = cv2.resize(np.ascontiguousarray(frame[top:top + h, left:left + w]), (64, 64),
                        interpolation=cv2.INTER_CUBIC)
    assert np.array_equal(crop_and_scale(frame, size=64), expect)


def test_crop_box_reference_numbers():
    # 640x480: square crop keeps columns 80..559, then 10 % (48 px) off each side
    assert crop_box(480, 640) == (48, 128, 384, 384)
    assert crop_box(640, 480) == (128, 48, 384, 384)
    assert crop_box(101, 100) == (10, 10, 81, 80)   # margins that round to 0 are skipped


@pytest.mark.parametrize("peak", [(0, 0), (111, 57), (223, 223), (40, 180)])
def test_synthetic_peak_lands_on_expected_source_pixel(peak):
    """A one-pixel peak in a 224x224 map of a 480x640 frame's crop lands where the crop and
    resize put that model pixel: row 48 + (r + 0.5) * 384/224, column 128 + (c + 0.5) * 384/224."""
    crop = crop_box(ROWS, COLS)
    heat = np.zeros((224, 224), np.float32)
    heat[peak] = 1.0
    on_src = heat_on_source(heat, crop, (ROWS, COLS))
    assert on_src.shape == (ROWS, COLS)
    y, x = crop_to_source(peak[0], peak[1], crop, heat.shape)
    assert (y, x) == pytest.approx((48 + (peak[0] + 0.5) * 384 / 224, 128 + (peak[1] + 0.5) * 384 / 224))
    r, c = np.unravel_index(int(np.argmax(on_src)), on_src.shape)
    assert abs(r - (y - 0.5)) <= 1.0 and abs(c - (x - 0.5)) <= 1.0
    # nothing outside the crop
    top, left, h, w = crop
    outside = on_src.copy()
    outside[top:top + h, left:left + w] = 0
    assert not outside.any()


def test_overlay_has_source_size_and_marker_at_same_pixel(view_study, tmp_path):
    """The overlay of the demo model's PromptCAM is the clip's Rows x Columns; magenta
    markers drawn into the clip are at the same pixels in it, inside the crop and outside
    (dimmed there)."""
    interp, src = view_study.interp, view_study.source
    cam = interp.promptcams[0]
    base, crop = cam_geometry(cam)
    assert base.shape[:2] == (src.Rows, src.Columns) == (ROWS, COLS)
    assert tuple(crop) == crop_box(ROWS, COLS)
    scs = build_overlays(interp, [src])
    assert len(scs) == len(interp.promptcams)
    for i, sc in enumerate(scs):
        path = tmp_path / f"sc{i}.dcm"
        sc.save_as(path, enforce_file_format=True)
        assert dciodvfy(path) == ([], [])
        back = pydicom.dcmread(path)
        assert (back.Rows, back.Columns) == (src.Rows, src.Columns)
        assert back.StudyInstanceUID == src.StudyInstanceUID
        assert back.SourceImageSequence[0].ReferencedFrameNumber == interp.promptcams[i].frame_index + 1
    px = pydicom.dcmread(tmp_path / "sc0.dcm").pixel_array
    for (r, c) in (MARKER_IN, MARKER_OUT):
        expect = (r + (MARKER - 1) / 2, c + (MARKER - 1) / 2)
        box = (r - 24, c - 24, r + MARKER + 24, c + MARKER + 24)
        assert magenta_centroid(base, box) == pytest.approx(expect, abs=1.0)   # the decoded source frame
        assert magenta_centroid(px, box) == pytest.approx(expect, abs=1.0)     # the overlay
    # outside the crop the frame is dimmed, not replaced
    r, c = MARKER_OUT
    ratio = px[r + 4:r + 12, c + 4:c + 12, 0].mean() / max(1.0, base[r + 4:r + 12, c + 4:c + 12, 0].mean())
    assert ratio == pytest.approx(DIM, abs=0.05)


def test_heat_peak_and_legend_are_where_the_map_says(view_study):
    interp = view_study.interp
    cam = interp.promptcams[0]
    y, x = peak_on_source(cam)
    top, left, h, w = cam.crop
    assert top <= y <= top + h and left <= x <= left + w
    heat = heat_on_source(cam.heatmap, cam.crop, cam.source_frame.shape[:2])
    r, c = np.unravel_index(int(np.argmax(heat)), heat.shape)
    assert abs(r + 0.5 - y) <= 2.0 and abs(c + 0.5 - x) <= 2.0


def test_ocr_reads_full_legend_and_banner(view_study, tmp_path):
    interp = view_study.interp
    cam = interp.promptcams[0]
    px = render_overlay(interp, cam)
    assert px.shape[:2] == (ROWS, COLS)
    png = save_png(px, tmp_path / "overlay.png")
    text = " ".join(ocr(png).split())
    t = interp.tasks[cam.task_id]
    assert DEMO_BANNER in text
    assert f"PromptCAM: {t.title}" in text
    assert f"Score {cam.score:.3f} (frame {cam.frame_index + 1})" in text
    if t.threshold is not None:
        assert f"threshold {t.threshold:.3f} ({t.threshold_source})" in text
    else:
        assert "uncalibrated: no threshold, no call" in text
    assert "Automated zero-shot estimate for review by a physician" in text
    assert "Dimmed: outside the region the model saw" in text
    assert "low" in text and "high saliency" in text


def test_small_clip_legend_goes_below_never_cut(interp_factory, tmp_path):
    """A 240x320 clip cannot carry a legible legend over the image: it goes below, whole."""
    interp = interp_factory(demo=True)
    cam = interp.promptcams[0]
    px = render_overlay(interp, cam)
    h, w = cam.frame.shape[:2]
    assert px.shape[1] == w and px.shape[0] > h
    text = " ".join(ocr(save_png(px, tmp_path / "small.png")).split())
    assert "DEMO MODEL" in text and "NOT FOR CLINICAL" in text
    assert "review by" in text and "high saliency" in text


def test_promptcam_cine_plays_every_analysed_frame_with_its_map(view_study, tmp_path):
    """``promptcam_cine``: a Multi-frame True Color SC of the analysed frames, each with its
    own map, at the clip's size, the markers in place on every frame; dciodvfy clean."""
    from echonode.dicom.frames import load_clip
    from echonode.dicom.overlays import MF_TRUE_COLOR_SC, build_cine_overlays
    from echonode.interpret.engine import ClipInput, Interpreter
    from echonode.interpretation import ClipRef
    from echonode.model.preprocess import sample_indices
    from echonode.pipeline.modelsel import DEMO_MODEL_DIR

    src = view_study.source
    clip = load_clip(view_study.path, indices=sample_indices(24, limit=12))
    ref = ClipRef(sop_instance_uid=src.SOPInstanceUID, series_instance_uid=src.SeriesInstanceUID,
                  sop_class_uid=src.SOPClassUID, n_frames=clip.n_frames, frames_used=tuple(clip.indices))
    interp = Interpreter(DEMO_MODEL_DIR, promptcam_tasks=("pacemaker",), promptcam_cine=True).interpret(
        src.StudyInstanceUID, [ClipInput(ref, clip.frames)])
    (cam,) = interp.promptcams
    assert cam.cine_heatmaps.shape[0] == len(clip.frames) == len(cam.cine_indices)
    local = list(cam.cine_indices).index(cam.frame_index)
    assert np.array_equal(cam.cine_heatmaps[local], cam.heatmap)    # the best frame's map is the still's
    assert not np.array_equal(cam.cine_heatmaps[0], cam.cine_heatmaps[-1])
    (sc,) = build_cine_overlays(interp, [src])
    path = tmp_path / "cine.dcm"
    sc.save_as(path, enforce_file_format=True)
    assert dciodvfy(path) == ([], [])
    back = pydicom.dcmread(path)
    assert back.SOPClassUID == MF_TRUE_COLOR_SC and int(back.NumberOfFrames) == len(clip.frames)
    assert (back.Rows, back.Columns) == (src.Rows, src.Columns)
    assert [int(s.ReferencedFrameNumber) for s in back.SourceImageSequence] == [i + 1 for i in clip.indices]
    px = back.pixel_array
    r, c = MARKER_IN
    for j in range(len(px)):
        box = (r - 24, c - 24, r + MARKER + 24, c + MARKER + 24)
        assert magenta_centroid(px[j], box) == pytest.approx((r + (MARKER - 1) / 2, c + (MARKER - 1) / 2), abs=1.0)
    assert build_cine_overlays(view_study.interp, [src]) == []    # no cine maps, no cine


def test_crop_and_source_frame_survive_json_round_trip(view_study):
    """The crop is data: an Interpretation stored with its arrays renders the same overlay."""
    from echonode.interpretation import Interpretation

    interp = view_study.interp
    back = Interpretation.from_dict(interp.to_dict(include_arrays=True))
    cam, cam2 = interp.promptcams[0], back.promptcams[0]
    assert cam2.crop == cam.crop and cam2.source_frame.shape == cam.source_frame.shape
    assert np.array_equal(render_overlay(interp, cam), render_overlay(back, cam2))
    assert "crop" in interp.to_dict()["promptcams"][0] and "source_frame" not in interp.to_dict()["promptcams"][0]
