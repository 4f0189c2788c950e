"""PromptCAM maps → Secondary Capture images (highdicom ``SCImage``, RGB, single frame).

Each :class:`~echonode.interpretation.PromptCam` becomes one SC image at the source
clip's own size (Rows and Columns of the analysed frame): the heat map is mapped back
through the preprocessing crop recorded with it (``PromptCam.crop``) onto the full
decoded frame (``PromptCam.source_frame``), coloured with a jet-like colormap and
alpha-blended (weight grows with saliency, so cold regions show the echo unchanged);
what lies outside the crop, which the model never saw, is dimmed. A legend panel is
burned in across the top: for the demo model the DEMO banner, then task title, score,
threshold and its source (or "uncalibrated"), the review statement and a colour bar,
in DejaVu Sans at a size legible at 100 % zoom, wrapped to the image width. A clip too
small to carry the legend over the image (under about 400 rows) gets it in a band below
the image instead: Columns stay, Rows grow, the image part stays pixel-aligned.
BurnedInAnnotation is YES. The SC images join the analysed study in a series of
their own, with deterministic UIDs (:func:`echonode.dicom.result_uids.result_uid`,
kinds ``sc`` / ``sc-series``), and reference their source frame.

This module never imports torch.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Optional

import numpy as np
from pydicom import Dataset
from pydicom.sequence import Sequence as DicomSequence

from echonode import __version__
from echonode.dicom.result_uids import object_uid
from echonode.dicom.sr import MANUFACTURER, check_sources
from echonode.interpretation import (
    DEMO_BANNER, THRESHOLD_CALIBRATED, THRESHOLD_PUBLISHED, Interpretation, PromptCam,
)

log = logging.getLogger(__name__)

__all__ = ["build_overlays", "render_overlay", "jet", "SC_SERIES_NUMBER", "cam_geometry", "heat_on_source",
           "crop_to_source", "peak_on_source", "build_cine_overlays", "render_cine"]

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


# ------------------------------------------------------------------ geometry
def cam_geometry(cam: PromptCam) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """(the full source frame, the (top, left, height, width) crop the heat map covers).

    Both are recorded by the interpreter (``PromptCam.source_frame`` / ``crop``); a map
    without them covers the whole of ``PromptCam.frame``.
    """
    if cam.source_frame is not None:
        base = np.asarray(cam.source_frame)
    else:
        base = np.asarray(cam.frame)
    if base.ndim == 2:
        base = np.repeat(base[..., None], 3, axis=-1)
    if base.ndim != 3 or base.shape[2] != 3:
        raise ValueError(f"PromptCam frame must be (H, W, 3) RGB, got shape {base.shape}")
    h, w = base.shape[:2]
    crop = tuple(int(v) for v in cam.crop) if cam.crop else (0, 0, h, w)
    if len(crop) != 4:
        raise ValueError(f"PromptCam.crop must be (top, left, height, width), got {cam.crop!r}")
    top, left, ch, cw = crop
    if ch < 1 or cw < 1 or top < 0 or left < 0 or top + ch > h or left + cw > w:
        raise ValueError(f"PromptCam.crop {crop} does not lie inside the {h}x{w} source frame")
    return base, crop


def heat_on_source(heatmap: np.ndarray, crop: tuple[int, int, int, int], shape: tuple[int, int]) -> np.ndarray:
    """The heat map resized onto its crop of a ``shape`` (rows, columns) frame; 0 outside.

    Pixel-centre aligned (Pillow's bilinear resize), so heat-map pixel (i, j) lands
    where :func:`crop_to_source` says.
    """
    from PIL import Image

    heat = np.clip(np.nan_to_num(np.asarray(heatmap, dtype=np.float32)), 0.0, 1.0)
    if heat.ndim != 2 or heat.shape[0] < 1 or heat.shape[1] < 1:
        raise ValueError(f"PromptCam.heatmap must be 2-D, got shape {heat.shape}")
    top, left, ch, cw = crop
    out = np.zeros(tuple(shape), dtype=np.float32)
    if heat.shape == (ch, cw):
        out[top:top + ch, left:left + cw] = heat
    else:
        img = Image.fromarray(heat, mode="F").resize((cw, ch), Image.Resampling.BILINEAR)
        out[top:top + ch, left:left + cw] = np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0)
    return out


def crop_to_source(row: float, col: float, crop: tuple[int, int, int, int],
                   heat_shape: tuple[int, int]) -> tuple[float, float]:
    """Heat-map pixel (``row``, ``col``) → (y, x) on the source frame, in DICOM image
    coordinates (continuous; (0, 0) is the top-left corner of the top-left pixel, so
    the pixel's index is ``floor``)."""
    top, left, ch, cw = crop
    return (top + (row + 0.5) * ch / heat_shape[0], left + (col + 0.5) * cw / heat_shape[1])


def peak_on_source(cam: PromptCam) -> tuple[float, float]:
    """The PromptCAM peak as (y, x) on the source frame (DICOM image coordinates)."""
    heat = np.nan_to_num(np.asarray(cam.heatmap, dtype=np.float32))
    r, c = np.unravel_index(int(np.argmax(heat)), heat.shape)
    _, crop = cam_geometry(cam)
    return crop_to_source(float(r), float(c), crop, heat.shape)


# ------------------------------------------------------------------ legend
def _legend_lines(interp: Interpretation, cam: PromptCam,
                  cine_frame: Optional[int] = None) -> list[tuple[str, tuple[int, int, int]]]:
    t = interp.tasks.get(cam.task_id)
    title = t.title if t is not None else cam.task_id
    lines: list[tuple[str, tuple[int, int, int]]] = []
    lines.append((f"PromptCAM: {title}" + (f", frame {cine_frame + 1}" if cine_frame is not None else ""),
                  (255, 255, 255)))
    score = f"Score {cam.score:.3f} (" + ("best match: " if cine_frame is not None else "") + \
        f"frame {cam.frame_index + 1})"
    if t is not None and t.threshold is not None and t.threshold_source in (THRESHOLD_CALIBRATED, THRESHOLD_PUBLISHED):
        score += f"; threshold {t.threshold:.3f} ({t.threshold_source})"
        if t.call:
            score += f"; call: {t.call}"
    else:
        score += "; uncalibrated: no threshold, no call"
    lines.append((score, (255, 255, 255)))
    lines.append(("Dimmed: outside the region the model saw", (200, 200, 200)))
    lines.append(("Automated zero-shot estimate for review by a physician", (255, 220, 120)))
    return lines


#: legend text height in pixels: legible at 100 % zoom, growing with the frame
MIN_FONT = 14
MAX_FONT = 26
DIM = 0.4            # brightness kept outside the crop
PANEL_ALPHA = 0.72   # legend panel opacity over the image
MAX_PANEL_FRACTION = 0.45   # a taller legend goes below the image instead (small clips)


def render_overlay(interp: Interpretation, cam: PromptCam, *, cine_frame: Optional[int] = None) -> np.ndarray:
    """The RGB pixels of one overlay at the source frame's own size.

    The heat map is mapped back through the preprocessing crop onto the full frame,
    what lies outside the crop is dimmed, and the legend (DEMO banner first for the
    demo model) is drawn on a translucent panel across the top. On a clip too small
    for a legible legend (the panel would cover more than ``MAX_PANEL_FRACTION`` of
    it) the legend goes in a band below the image instead (Columns stay, Rows grow);
    the DEMO banner stays across the top of the image.
    """
    from PIL import Image, ImageDraw

    from echonode.dicom.render import BANNER_BG, BANNER_FG, font, wrap

    if cam.frame is None or cam.heatmap is None:
        raise ValueError(f"PromptCam for task {cam.task_id!r} carries no frame/heatmap arrays")
    base, crop = cam_geometry(cam)
    h, w = base.shape[:2]
    heat = heat_on_source(cam.heatmap, crop, (h, w))
    img = blend(base, heat).astype(np.float32)
    top, left, ch, cw = crop
    inside = np.zeros((h, w), dtype=bool)
    inside[top:top + ch, left:left + cw] = True
    img[~inside] *= DIM
    img = np.clip(img + 0.5, 0, 255).astype(np.uint8)

    size = max(MIN_FONT, min(MAX_FONT, round(w / 42)))
    fnt, bold = font(size), font(round(size * 1.25), bold=True)   # the banner stands out
    pad = max(8, size // 2)
    line_h = int(size * 1.3)
    text_w = w - 2 * pad
    rows: list[tuple[str, tuple[int, int, int], object]] = []
    for text, colour in _legend_lines(interp, cam, cine_frame):
        rows += [(part, colour, fnt) for part in wrap(text, fnt, text_w)]
    banner = wrap(DEMO_BANNER, bold, text_w) if interp.demo else []
    bar_h = max(8, size // 2)
    banner_line = int(bold.size * 1.3)
    banner_h = (len(banner) * banner_line + 2 * pad) if banner else 0
    legend_h = pad + len(rows) * line_h + bar_h + pad + line_h + pad
    below = banner_h + legend_h > MAX_PANEL_FRACTION * h
    canvas = Image.new("RGB", (w, h + (legend_h if below else 0)), (0, 0, 0))
    canvas.paste(Image.fromarray(img), (0, 0))
    if not below:   # translucent panel: the echo stays faintly visible under the text
        region = np.asarray(canvas.crop((0, 0, w, banner_h + legend_h)), dtype=np.float32) * (1.0 - PANEL_ALPHA)
        canvas.paste(Image.fromarray(np.clip(region + 0.5, 0, 255).astype(np.uint8)), (0, 0))
    draw = ImageDraw.Draw(canvas)
    if banner:   # always across the top of the image itself
        draw.rectangle((0, 0, w, banner_h - 1), fill=BANNER_BG)
        y = pad
        for part in banner:
            draw.text((pad, y), part, fill=BANNER_FG, font=bold)
            y += banner_line
    y = (h if below else banner_h) + pad
    for text, colour, f in rows:
        draw.text((pad, y), text, fill=colour, font=f, stroke_width=1, stroke_fill=(0, 0, 0))
        y += line_h
    bar_w = max(10, text_w)
    bar = jet(np.linspace(0.0, 1.0, bar_w))[None, :, :].repeat(bar_h, axis=0)
    canvas.paste(Image.fromarray(bar), (pad, y))
    y += bar_h + pad   # clear of the bar, so the labels read as text
    draw.text((pad, y), "low", fill=(220, 220, 220), font=fnt)
    hi = "high saliency"
    draw.text((w - pad - int(draw.textlength(hi, font=fnt)), y), hi, fill=(220, 220, 220), font=fnt)
    return np.asarray(canvas, dtype=np.uint8)


def _cam_ref(cam: PromptCam, by_uid: dict, sources) -> Dataset:
    return by_uid.get(cam.sop_instance_uid) or sources[0]


def secondary_capture(interp: Interpretation, ref: Dataset, pixels: np.ndarray, *, kind: str, index: int,
                      series_kind: str, series_number: int, description: str, comments: str,
                      derivation: str = "") -> Dataset:
    """An RGB Secondary Capture of ``pixels`` in ``ref``'s study (patient/study copied from
    it), with deterministic UIDs (``result_uid`` kinds ``kind``/``index`` and
    ``series_kind``), burned-in annotation declared, echonode as the equipment."""
    import highdicom as hd

    m = interp.model
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=ref,
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        patient_orientation=("L", "F"),   # replaced below: no orientation for a US view
        series_instance_uid=object_uid(interp, series_kind),
        series_number=series_number,
        sop_instance_uid=object_uid(interp, kind, index),
        instance_number=index + 1,
        manufacturer=MANUFACTURER,
        series_description=description[:64],
    )
    sc.PatientOrientation = ""   # type 2: unknown for an ultrasound view
    # Laterality (type 2C) is absent for an unpaired body part; saying which one
    # lets validators evaluate the condition.
    sc.BodyPartExamined = str(getattr(ref, "BodyPartExamined", "") or "HEART")
    sc.SpecificCharacterSet = "ISO_IR 192"
    sc.BurnedInAnnotation = "YES"
    sc.ManufacturerModelName = "echonode"
    sc.SoftwareVersions = [__version__, m.weights_sha256[:16]]
    sc.ImageComments = ((f"{DEMO_BANNER}. " if interp.demo else "") + comments)[:10240]
    if derivation:
        sc.DerivationDescription = derivation[:1024]
    return sc


def build_overlays(interp: Interpretation, sources: list[Dataset]) -> list[Dataset]:
    """One RGB Secondary Capture per PromptCam in ``interp`` (empty list if none).

    ``sources``: the analysed instances, all in ``interp.study_instance_uid``
    (patient/study modules are copied from them).
    """
    cams = [c for c in interp.promptcams if c.frame is not None and c.heatmap is not None]
    skipped = len(interp.promptcams) - len(cams)
    if skipped:
        log.warning("build_overlays: %d PromptCAM map(s) without pixel arrays skipped", skipped)
    if not cams:
        return []
    by_uid = check_sources(interp, sources)
    description = (f"{DEMO_BANNER} PromptCAM" if interp.demo else "EchoCLIP PromptCAM for physician review")[:64]
    out = []
    for index, cam in enumerate(interp.promptcams):
        if cam.frame is None or cam.heatmap is None:
            continue
        ref = _cam_ref(cam, by_uid, sources)
        t = interp.tasks.get(cam.task_id)
        title = t.title if t is not None else cam.task_id
        sc = secondary_capture(
            interp, ref, render_overlay(interp, cam), kind="sc", index=index, series_kind="sc-series",
            series_number=SC_SERIES_NUMBER, description=description,
            comments=f"PromptCAM saliency for {title}; score {cam.score:.3f}. {interp.disclaimer}",
            derivation=(f"PromptCAM saliency of the prompt for {cam.task_id} mapped through the model's "
                        f"crop onto frame {cam.frame_index + 1}; outside the crop dimmed"))
        if cam.sop_instance_uid in by_uid:
            src = Dataset()
            src.ReferencedSOPClassUID = ref.SOPClassUID
            src.ReferencedSOPInstanceUID = ref.SOPInstanceUID
            if int(getattr(ref, "NumberOfFrames", 1) or 1) > 1:
                src.ReferencedFrameNumber = cam.frame_index + 1
            sc.SourceImageSequence = DicomSequence([src])
        out.append(sc)
    return out


MF_TRUE_COLOR_SC = "1.2.840.10008.5.1.4.1.1.7.4"   # Multi-frame True Color Secondary Capture
CINE_SERIES_NUMBER = 9905
CINE_FRAME_TIME_MS = 250.0   # 4 analysed frames a second: slow enough to follow each map


def render_cine(interp: Interpretation, cam: PromptCam) -> np.ndarray:
    """(T, rows, columns, 3): the overlay of every analysed frame with its own map."""
    if cam.cine_heatmaps is None or cam.cine_frames is None:
        raise ValueError(f"PromptCam for task {cam.task_id!r} carries no cine maps (model.promptcam_cine)")
    maps, frames = np.asarray(cam.cine_heatmaps), np.asarray(cam.cine_frames)
    if len(maps) != len(frames) or len(maps) < 1:
        raise ValueError(f"PromptCam {cam.task_id!r}: {len(maps)} cine maps for {len(frames)} frames")
    indices = tuple(cam.cine_indices) or tuple(range(len(frames)))
    out = [render_overlay(interp, dataclasses.replace(cam, heatmap=maps[j], source_frame=frames[j],
                                                      frame=frames[j] if cam.source_frame is None else cam.frame),
                          cine_frame=int(indices[j]))
           for j in range(len(frames))]
    return np.stack(out)


def build_cine_overlays(interp: Interpretation, sources: list[Dataset]) -> list[Dataset]:
    """One Multi-frame True Color Secondary Capture per PromptCam that carries cine maps
    (``model.promptcam_cine``): the analysed frames with their maps, played at
    ``CINE_FRAME_TIME_MS``. Series ``sc-cine-series``, instances ``sc-cine``/index."""
    cams = [(i, c) for i, c in enumerate(interp.promptcams) if c.cine_heatmaps is not None and c.cine_frames is not None]
    if not cams:
        return []
    by_uid = check_sources(interp, sources)
    description = f"{DEMO_BANNER} PromptCAM cine" if interp.demo else "EchoCLIP PromptCAM cine for physician review"
    out = []
    for index, cam in cams:
        ref = _cam_ref(cam, by_uid, sources)
        pixels = render_cine(interp, cam)
        t = interp.tasks.get(cam.task_id)
        title = t.title if t is not None else cam.task_id
        sc = secondary_capture(
            interp, ref, pixels[0], kind="sc-cine", index=index, series_kind="sc-cine-series",
            series_number=CINE_SERIES_NUMBER, description=description,
            comments=f"PromptCAM saliency for {title} on each analysed frame. {interp.disclaimer}",
            derivation=(f"PromptCAM saliency of the prompt for {cam.task_id} on each analysed frame, mapped "
                        "through the model's crop onto the frame; outside the crop dimmed"))
        sc.SOPClassUID = MF_TRUE_COLOR_SC
        sc.file_meta.MediaStorageSOPClassUID = MF_TRUE_COLOR_SC
        sc.NumberOfFrames = len(pixels)
        sc.FrameTime = CINE_FRAME_TIME_MS
        sc.FrameIncrementPointer = 0x00181063   # Frame Time
        sc.PixelData = np.ascontiguousarray(pixels).tobytes()
        sc.Rows, sc.Columns = int(pixels.shape[1]), int(pixels.shape[2])
        for kw in ("ConversionType",):
            if kw not in sc:
                sc.ConversionType = "WSD"
        if cam.sop_instance_uid in by_uid:
            n = int(getattr(ref, "NumberOfFrames", 1) or 1)
            items = []
            for f in (cam.cine_indices or ()):
                src = Dataset()
                src.ReferencedSOPClassUID = ref.SOPClassUID
                src.ReferencedSOPInstanceUID = ref.SOPInstanceUID
                if n > 1:
                    src.ReferencedFrameNumber = int(f) + 1
                items.append(src)
            if items:
                sc.SourceImageSequence = DicomSequence(items)
        out.append(sc)
    return out
