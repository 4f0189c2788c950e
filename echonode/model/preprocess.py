"""Frames → normalised model input, exactly as the published EchoCLIP inference pipeline.

research/echoclip.md §3: each frame is centre-cropped to a square, 10 % is trimmed from
each side, it is resized to 224×224 with bicubic interpolation (OpenCV), divided by 255
and normalised with the OpenAI CLIP mean/std. Frames 0, 2, …, 38 are used.

Channel order: the reference reads AVI files with OpenCV, which gives **BGR**, and never
converts, so channel 0 fed to the model is blue. ``channel_order="bgr"`` (the default)
reproduces that from RGB frames; ``"rgb"`` feeds RGB. Grey B-mode is unaffected; colour
Doppler is not.

Fix over the reference: when a crop margin rounds to 0 (e.g. a 101×100 frame, or a side
shorter than 10 px) the reference slices ``[0:-0]`` (empty) and OpenCV throws; here that
crop step is skipped instead.
"""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np
import torch

from echonode.model.configs import OPENAI_MEAN, OPENAI_STD

CHANNEL_ORDERS = ("bgr", "rgb")


def crop_box(height: int, width: int, zoom: float = 0.1) -> tuple[int, int, int, int]:
    """The region of an ``height``×``width`` frame that :func:`crop_and_scale` keeps.

    Returns ``(top, left, crop_height, crop_width)`` in source pixels: the centred square
    (Python's banker's rounding for its margin, as the reference), then ``int(dim * zoom)``
    trimmed from each side; margins that round to 0 are skipped. The PromptCAM overlay
    uses it to map the model-input heat map back onto the source frame.
    """
    h, w = int(height), int(width)
    if h < 1 or w < 1:
        raise ValueError(f"crop_box expects a positive frame size, got {h}x{w}")
    top = left = 0
    if w > h:
        pad = int(round((w - h) / 2))
        if pad > 0:
            left, w = pad, w - 2 * pad
    elif h > w:
        pad = int(round((h - w) / 2))
        if pad > 0:
            top, h = pad, h - 2 * pad
    if zoom:
        pad_x, pad_y = int(w * zoom), int(h * zoom)
        if pad_y > 0:
            top, h = top + pad_y, h - 2 * pad_y
        if pad_x > 0:
            left, w = left + pad_x, w - 2 * pad_x
    return top, left, h, w


def crop_and_scale(frame: np.ndarray, size: int = 224, zoom: float = 0.1,
                   interpolation: int = cv2.INTER_CUBIC) -> np.ndarray:
    """Centre-crop to square, trim ``zoom`` of each side, resize to ``size``×``size``.

    Same arithmetic as the reference (Python's banker's rounding for the square crop,
    ``int(dim * zoom)`` for the trim); margins that round to 0 are skipped, not sliced.
    The kept region is :func:`crop_box`.
    """
    frame = np.asarray(frame)
    if frame.ndim not in (2, 3) or frame.shape[0] < 1 or frame.shape[1] < 1:
        raise ValueError(f"crop_and_scale expects an (H, W[, C]) image, got shape {frame.shape}")
    top, left, h, w = crop_box(frame.shape[0], frame.shape[1], zoom)
    frame = frame[top:top + h, left:left + w]
    return cv2.resize(np.ascontiguousarray(frame), (size, size), interpolation=interpolation)


def sample_indices(n_frames: int, limit: int | None = 40, stride: int = 2) -> list[int]:
    """Frame indices the reference uses: ``range(0, min(limit, n_frames), stride)``.

    ``limit=None`` means every frame (EchoCLIP-R's study embedding uses all frames).
    """
    if stride < 1:
        raise ValueError(f"stride must be ≥ 1, got {stride}")
    n = max(0, int(n_frames))
    end = n if limit is None else min(int(limit), n)
    return list(range(0, end, stride))


def scale_frames(frames_rgb: np.ndarray, channel_order: str = "bgr", size: int = 224,
                 zoom: float = 0.1) -> np.ndarray:
    """(T, H, W, 3) uint8 RGB → (T, size, size, 3) uint8 in the model's channel order."""
    if channel_order not in CHANNEL_ORDERS:
        raise ValueError(f"channel_order must be one of {CHANNEL_ORDERS}, got {channel_order!r}")
    frames = np.asarray(frames_rgb)
    if frames.ndim == 3:  # (T, H, W) grey
        frames = np.repeat(frames[..., None], 3, axis=-1)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected frames (T, H, W, 3), got shape {frames.shape}")
    if frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames, got {frames.dtype}")
    out = np.empty((frames.shape[0], size, size, 3), dtype=np.uint8)
    for i, f in enumerate(frames):
        out[i] = crop_and_scale(f, size=size, zoom=zoom)
    if channel_order == "bgr":
        out = out[..., ::-1]
    return out


def normalize(frames: np.ndarray, mean: Sequence[float] = OPENAI_MEAN,
              std: Sequence[float] = OPENAI_STD) -> torch.Tensor:
    """(T, S, S, 3) uint8 → (T, 3, S, S) float32: ``(x / 255 − mean) / std`` per channel."""
    a = np.ascontiguousarray(frames)
    if not a.flags.writeable:  # a memory-mapped frame cache: torch must not alias read-only memory
        a = a.copy()
    x = torch.from_numpy(a).permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return x.sub_(m).div_(s).contiguous()


def preprocess_frames(frames_rgb: np.ndarray, channel_order: str = "bgr", size: int = 224, *,
                      zoom: float = 0.1, mean: Sequence[float] = OPENAI_MEAN,
                      std: Sequence[float] = OPENAI_STD) -> torch.Tensor:
    """(T, H, W, 3) uint8 RGB frames → (T, 3, size, size) float32 model input.

    The default ``channel_order="bgr"`` feeds the model what the published pipeline fed it.
    """
    return normalize(scale_frames(frames_rgb, channel_order=channel_order, size=size, zoom=zoom), mean, std)
