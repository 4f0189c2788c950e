"""Preprocessing parity with the published pipeline (research/echoclip.md §3)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from echonode.model.configs import OPENAI_MEAN, OPENAI_STD
from echonode.model.preprocess import crop_and_scale, preprocess_frames, sample_indices, scale_frames


def reference_crop_and_scale(img, res=(224, 224), zoom=0.1):
    """The facts' description, written out literally (crashes where the reference crashes)."""
    in_w, in_h = img.shape[1], img.shape[0]
    r_in, r_out = in_w / in_h, res[0] / res[1]
    if r_in > r_out:
        pad = int(round((in_w - r_out * in_h) / 2))
        img = img[:, pad:-pad]
    if r_in < r_out:
        pad = int(round((in_h - in_w / r_out) / 2))
        img = img[pad:-pad]
    if zoom != 0:
        pad_x = round(int(img.shape[1] * zoom))
        pad_y = round(int(img.shape[0] * zoom))
        img = img[pad_y:-pad_y, pad_x:-pad_x]
    return cv2.resize(img, res, interpolation=cv2.INTER_CUBIC)


def read_avi_bgr(path):
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    cap.release()
    return np.array(frames)


@pytest.fixture(scope="module")
def video_bgr(echoclip_data):
    frames = read_avi_bgr(echoclip_data / "example_video.avi")
    assert frames.shape == (113, 224, 224, 3)
    return frames


def test_parity_with_reference_on_example_video(video_bgr):
    idx = sample_indices(len(video_bgr))
    assert idx == list(range(0, 40, 2))
    ref = np.stack([reference_crop_and_scale(f) for f in video_bgr[idx]])  # BGR, as the model saw it
    rgb = video_bgr[idx][..., ::-1].copy()  # what echonode's frame reader hands over
    ours = scale_frames(rgb, channel_order="bgr")
    diff = np.abs(ours.astype(int) - ref.astype(int))
    assert diff.max() <= 1
    # the video is not strictly grey, so the channel order is observable
    assert np.abs(ref[..., 0].astype(int) - ref[..., 2].astype(int)).max() > 0
    x = preprocess_frames(rgb)
    expect = (torch.from_numpy(ref).permute(0, 3, 1, 2).float() / 255 - torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)) \
        / torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    assert x.shape == (20, 3, 224, 224) and x.dtype == torch.float32
    assert torch.allclose(x, expect, atol=1.0 / 255 / 0.26 + 1e-6)


def test_channel_order_rgb_differs(video_bgr):
    rgb = video_bgr[:2][..., ::-1].copy()
    bgr_in = preprocess_frames(rgb, channel_order="bgr")
    rgb_in = preprocess_frames(rgb, channel_order="rgb")
    assert not torch.allclose(bgr_in, rgb_in)
    with pytest.raises(ValueError, match="channel_order"):
        preprocess_frames(rgb, channel_order="yuv")


@pytest.mark.parametrize("hw", [(480, 640), (600, 800), (768, 1024), (708, 1016), (434, 636), (112, 112),
                                (640, 480), (103, 100), (224, 224)])
def test_same_as_reference_where_reference_works(hw):
    rng = np.random.default_rng(hw[0] * 7 + hw[1])
    img = rng.integers(0, 256, size=(*hw, 3), dtype=np.uint8)
    assert np.array_equal(crop_and_scale(img), reference_crop_and_scale(img))


@pytest.mark.parametrize("hw", [(100, 101), (101, 100), (9, 9), (1, 1), (3, 40), (40, 3), (2, 2)])
def test_small_and_odd_sizes_do_not_crash(hw):
    img = np.full((*hw, 3), 77, dtype=np.uint8)
    out = crop_and_scale(img)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    assert int(out.min()) == 77 == int(out.max())


def test_reference_crashes_on_empty_slice():
    """Documents the bug we fix: a margin that rounds to 0 slices [0:-0]."""
    with pytest.raises(cv2.error):
        reference_crop_and_scale(np.zeros((100, 101, 3), np.uint8))


def test_sample_indices():
    assert sample_indices(113) == list(range(0, 40, 2))
    assert sample_indices(7) == [0, 2, 4, 6]
    assert sample_indices(1) == [0]
    assert sample_indices(0) == []
    assert sample_indices(10, limit=None, stride=1) == list(range(10))
    with pytest.raises(ValueError):
        sample_indices(10, stride=0)


def test_grey_and_bad_input():
    grey = np.zeros((2, 60, 80), np.uint8)
    assert preprocess_frames(grey).shape == (2, 3, 224, 224)
    assert preprocess_frames(np.zeros((1, 60, 80, 3), np.uint8), size=112).shape == (1, 3, 112, 112)
    with pytest.raises(ValueError, match="uint8"):
        preprocess_frames(np.zeros((1, 8, 8, 3), np.float32))
    with pytest.raises(ValueError):
        preprocess_frames(np.zeros((1, 8, 8, 4), np.uint8))
