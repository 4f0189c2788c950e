"""PromptCAM maps → Secondary Capture images (highdicom ``SCImage``, RGB, single frame).

Each :class:`~echonode.interpretation.PromptCam` becomes one SC image: the heat map,
coloured with a jet-like colormap, alpha-blended over the decoded frame (weight grows
with saliency, so cold regions show the echo unchanged), with a legend band burned
in below the image: task title, score, threshold and its source (or "uncalibrated"),
a colour bar, the review statement and, for the demo model, the DEMO banner.
BurnedInAnnotation is YES. The SC images join the analysed study in a series of
their own, with deterministic UIDs (:func:`echonode.dicom.result_uids.result_uid`,
kinds ``sc`` / ``sc-series``), and reference their source frame.

This module never imports torch.
"""

from __future__ import annotations

import logging
import textwrap


import numpy as np
from pydicom import Dataset
from pydicom.sequence import Sequence as DicomSequence

from echonode import __version__
from echonode.dicom.result_uids import result_uid
from echonode.dicom.sr import MANUFACTURER, check_sources
from echonode.interpretation import (
    DEMO_BANNER, THRESHOLD_CALIBRATED, THRESHOLD_PUBLISHED, Interpretation, PromptCam,
)

log = logging.getLogger(__name__)

__all__ = ["build_overlays", "render_overlay", "jet", "SC_SERIES_NUMBER"]

SC_SERIES_NUMBER = 9902
ALPHA_MAX = 0.55
ALPHA_FLOOR = 0.15


def jet(x: np.ndarray) -> np.ndarray:
    """Jet-like colormap: values in [0, 1] → uint8 RGB (..., 3)."""
    x = np.clip(np.asarray(x, dtype=np.float32), 0.0, 1.0)
    r = np.clip(1.5 - np.abs(4.0 * x - 3.0), 0.0, 1.0)
    g = np.clip(1.5 - np.abs(4.0 * x - 2.0), 0.0, 1.0)
    b = np.clip(1.5 - np.abs(4.0 * x - 1.0), 0.0, 1.0)
    return (np.stack([r, g, b], axis=-1) * 255.0 + 0.5).astype(np.uint8)


def blend(frame: np.ndarray, heatmap: np.ndarray) -> np.ndarray:
    """The heat map over the frame; opacity grows from 0 at ALPHA_FLOOR to ALPHA_MAX at 1."""
    frame = np.asarray(frame)
    if frame.ndim == 2:
        frame = np.repeat(frame[..., None], 3, axis=-1)
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"PromptCam.frame must be (H, W, 3) RGB, got shape {frame.shape}")
    heat = np.asarray(heatmap, dtype=np.float32)
    if heat.shape != frame.shape[:2]:
        raise ValueError(f"PromptCam.heatmap shape {heat.shape} does not match frame {frame.shape[:2]}")
    heat = np.clip(np.nan_to_num(heat), 0.0, 1.0)
    # below ALPHA_FLOOR saliency the echo shows unchanged; above, opacity ramps up
    a = (ALPHA_MAX * np.clip((heat - ALPHA_FLOOR) / (1.0 - ALPHA_FLOOR), 0.0, 1.0))[..., None]
    out = frame.astype(np.float32) * (1.0 - a) + jet(heat).astype(np.float32) * a
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


FONT_CANDIDATES = (
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
)


def _font(size: int):
    """(font, full_unicode): DejaVu Sans when installed, else Pillow's default font."""
    from PIL import ImageFont
    for path in FONT_CANDIDATES:
        try:
            return ImageFont.truetype(path, size), True
        except OSError:
            continue
    try:
        return ImageFont.load_default(size=size), False
    except (TypeError, OSError):  # Pillow without FreeType
        return ImageFont.load_default(), False


def _legend_lines(interp: Interpretation, cam: PromptCam) -> list[tuple[str, tuple[int, int, int]]]:
    t = interp.tasks.get(cam.task_id)
    title = t.title if t is not None else cam.task_id
    lines: list[tuple[str, tuple[int, int, int]]] = []
    if interp.demo:
        lines.append((DEMO_BANNER, (255, 60, 60)))
    lines.append((f"PromptCAM: {title}", (255, 255, 255)))
    score = f"score {cam.score:.3f} (frame {cam.frame_index + 1})"
    if t is not None and t.threshold is not None and t.threshold_source in (THRESHOLD_CALIBRATED, THRESHOLD_PUBLISHED):
        score += f"; threshold {t.threshold:.3f} ({t.threshold_source})"
    else:
        score += "; uncalibrated: no threshold"
    lines.append((score, (255, 255, 255)))
    lines.append(("Automated zero-shot estimate for review by a physician", (255, 220, 120)))
    return lines


def render_overlay(interp: Interpretation, cam: PromptCam) -> np.ndarray:
    """The RGB pixels of one overlay: blended image with a legend band below it."""
    from PIL import Image, ImageDraw

    if cam.frame is None or cam.heatmap is None:
        raise ValueError(f"PromptCam for task {cam.task_id!r} carries no frame/heatmap arrays")
    img = blend(cam.frame, cam.heatmap)
    h, w = img.shape[:2]
    size = max(10, min(24, w // 32))
    font, unicode_ok = _font(size)

    def fix(text: str) -> str:  # the default font has no em dash
        return text if unicode_ok else text.replace("\u2014", "-")
    line_h = size + 4
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    avg = max(1.0, probe.textlength("abcdefghijklmnopqrstuvwxyz0123456789", font=font) / 36.0)
    max_chars = max(12, int((w - 12) / avg))
    wrapped: list[tuple[str, tuple[int, int, int]]] = []
    for text, colour in _legend_lines(interp, cam):
        for part in textwrap.wrap(fix(text), max_chars) or [""]:
            wrapped.append((part, colour))
    bar_h = max(6, size // 2)
    band = 6 + line_h * len(wrapped) + bar_h + line_h + 6
    canvas = Image.new("RGB", (w, h + band), (0, 0, 0))
    canvas.paste(Image.fromarray(img), (0, 0))
    draw = ImageDraw.Draw(canvas)
    y = h + 6
    for text, colour in wrapped:
        draw.text((6, y), text, fill=colour, font=font)
        y += line_h
    bar_w = max(10, w - 12)
    bar = jet(np.linspace(0.0, 1.0, bar_w))[None, :, :].repeat(bar_h, axis=0)
    canvas.paste(Image.fromarray(bar), (6, y))
    y += bar_h + 2
    draw.text((6, y), "low", fill=(200, 200, 200), font=font)
    hi_w = int(draw.textlength("high saliency", font=font))
    draw.text((w - 6 - hi_w, y), "high saliency", fill=(200, 200, 200), font=font)
    if interp.demo:  # also across the top of the image itself
        draw.rectangle((0, 0, w, line_h + 4), fill=(120, 0, 0))
        draw.text((6, 2), fix(DEMO_BANNER), fill=(255, 255, 255), font=font)
    return np.asarray(canvas, dtype=np.uint8)


def _cam_ref(cam: PromptCam, by_uid: dict, sources) -> Dataset:
    return by_uid.get(cam.sop_instance_uid) or sources[0]


def build_overlays(interp: Interpretation, sources: list[Dataset]) -> list[Dataset]:
    """One RGB Secondary Capture per PromptCam in ``interp`` (empty list if none).

    ``sources``: the analysed instances, all in ``interp.study_instance_uid``
    (patient/study modules are copied from them).
    """
    import highdicom as hd

    cams = [c for c in interp.promptcams if c.frame is not None and c.heatmap is not None]
    skipped = len(interp.promptcams) - len(cams)
    if skipped:
        log.warning("build_overlays: %d PromptCAM map(s) without pixel arrays skipped", skipped)
    if not cams:
        return []
    by_uid = check_sources(interp, sources)
    m = interp.model
    series_uid = result_uid(interp.study_instance_uid, m.weights_sha256, m.echonode_version, "sc-series")
    description = (f"{DEMO_BANNER} PromptCAM" if interp.demo else "EchoCLIP PromptCAM for physician review")[:64]
    out = []
    for index, cam in enumerate(interp.promptcams):
        if cam.frame is None or cam.heatmap is None:
            continue
        ref = _cam_ref(cam, by_uid, sources)
        pixels = render_overlay(interp, cam)
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=ref,
            pixel_array=pixels,
            photometric_interpretation="RGB",
            bits_allocated=8,
            coordinate_system="PATIENT",
            patient_orientation=("L", "F"),   # replaced below: no orientation for a US view
            series_instance_uid=series_uid,
            series_number=SC_SERIES_NUMBER,
            sop_instance_uid=result_uid(interp.study_instance_uid, m.weights_sha256, m.echonode_version,
                                        "sc", index),
            instance_number=index + 1,
            manufacturer=MANUFACTURER,
            series_description=description,
        )
        sc.PatientOrientation = ""   # type 2: unknown for an ultrasound view
        # Laterality (type 2C) is absent for an unpaired body part; saying which one
        # lets validators evaluate the condition.
        sc.BodyPartExamined = str(getattr(ref, "BodyPartExamined", "") or "HEART")
        sc.SpecificCharacterSet = "ISO_IR 192"
        sc.BurnedInAnnotation = "YES"
        sc.ManufacturerModelName = "echonode"
        sc.SoftwareVersions = [__version__, m.weights_sha256[:16]]
        t = interp.tasks.get(cam.task_id)
        title = t.title if t is not None else cam.task_id
        sc.ImageComments = (f"{DEMO_BANNER}. " if interp.demo else "") + \
            f"PromptCAM saliency for {title}; score {cam.score:.3f}. {interp.disclaimer}"
        sc.DerivationDescription = (f"PromptCAM saliency of the prompt for {cam.task_id} "
                                    f"blended over frame {cam.frame_index + 1}")[:1024]
        if cam.sop_instance_uid in by_uid:
            src = Dataset()
            src.ReferencedSOPClassUID = ref.SOPClassUID
            src.ReferencedSOPInstanceUID = ref.SOPInstanceUID
            if int(getattr(ref, "NumberOfFrames", 1) or 1) > 1:
                src.ReferencedFrameNumber = cam.frame_index + 1
            sc.SourceImageSequence = DicomSequence([src])
        out.append(sc)
    return out
