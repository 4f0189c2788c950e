"""Any stored ultrasound object (or a video file) → uint8 RGB frames ``(T, H, W, 3)``.

This module speaks DICOM and never imports torch. It turns the pixel data of an
ultrasound instance, whatever its transfer syntax and photometric interpretation,
into the one form the model side consumes: RGB, 8 bits per channel, frames first.

Decoding
    pydicom 3's pixel decoders (``pydicom.pixels``) with the installed plugins
    (GDCM, pylibjpeg + libjpeg/openjpeg/rle, pyjpegls, Pillow) for native little and
    big endian, deflated, RLE, JPEG baseline/extended/lossless, JPEG-LS and
    JPEG 2000. JPEG XL (1.2.840.10008.1.2.4.110/111/112), which pydicom 3.0 does not
    know, is decoded frame by frame with ``imagecodecs.jpegxl_decode`` when the
    installed imagecodecs has JPEG XL; otherwise :class:`FrameDecodeError` says so.
    Only the requested frames are decoded (``indices``); fragments of encapsulated
    frames are located through the Basic Offset Table, the Extended Offset Table or,
    without either, by JPEG/JPEG-LS/JPEG 2000 end-of-image markers (PS3.5 A.4).

Colour (PS3.3 C.7.6.3.1.2)
    * YBR_FULL / YBR_FULL_422 → RGB with the ITU-R BT.601 full-range transform. The
      decoders report whether they already converted (JPEG decoders usually do);
      we follow pydicom's report, so no stream is converted twice.
    * YBR_ICT / YBR_RCT → RGB by the JPEG 2000 decoder's inverse component transform.
    * RGB, planar configuration 0 or 1 → RGB.
    * PALETTE COLOR → RGB through the (segmented or linear) palette LUTs; 16-bit LUT
      entries are scaled to 8 bits (``round(v / 257)``) unless every entry is
      ≤ 255, in which case the LUT really holds 8-bit values (a common writer quirk).
    * MONOCHROME2 / MONOCHROME1 → grey RGB (R = G = B); MONOCHROME1 is inverted.
      Data of more than 8 bits is scaled to 8 bits with the first VOI window
      (Window Center/Width, PS3.3 C.11.2.1.2.1) when present, otherwise with the
      min–max of the decoded frames; 8-bit data is used as stored (as the published
      pipeline reads its videos).

Timing
    ``frame_time_ms``: the attribute named by Frame Increment Pointer, else Frame
    Time, Frame Time Vector (mean of its non-zero entries), Cine Rate, Recommended
    Display Frame Rate; ``None`` when none is present. Videos: the container's FPS.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

log = logging.getLogger(__name__)

__all__ = [
    "Clip",
    "FrameDecodeError",
    "load_clip",
    "count_frames",
    "frame_time_ms",
    "sector_mask",
    "apply_mask",
    "VIDEO_SUFFIXES",
]

VIDEO_SUFFIXES = frozenset({".avi", ".mp4", ".m4v", ".mov", ".mkv", ".wmv", ".mpg", ".mpeg", ".webm"})

JPEGXL_SYNTAXES = {
    "1.2.840.10008.1.2.4.110": "JPEG XL Lossless",
    "1.2.840.10008.1.2.4.111": "JPEG XL JPEG Recompression",
    "1.2.840.10008.1.2.4.112": "JPEG XL",
}

# What to install when pydicom has no working plugin for a transfer syntax.
_INSTALL_HINTS = {
    "1.2.840.10008.1.2.4.50": "pylibjpeg + pylibjpeg-libjpeg, python-gdcm or Pillow",
    "1.2.840.10008.1.2.4.51": "pylibjpeg + pylibjpeg-libjpeg or python-gdcm",
    "1.2.840.10008.1.2.4.57": "pylibjpeg + pylibjpeg-libjpeg or python-gdcm",
    "1.2.840.10008.1.2.4.70": "pylibjpeg + pylibjpeg-libjpeg or python-gdcm",
    "1.2.840.10008.1.2.4.80": "pylibjpeg + pylibjpeg-libjpeg, pyjpegls or python-gdcm",
    "1.2.840.10008.1.2.4.81": "pylibjpeg + pylibjpeg-libjpeg, pyjpegls or python-gdcm",
    "1.2.840.10008.1.2.4.90": "pylibjpeg + pylibjpeg-openjpeg or python-gdcm",
    "1.2.840.10008.1.2.4.91": "pylibjpeg + pylibjpeg-openjpeg or python-gdcm",
    "1.2.840.10008.1.2.4.201": "pylibjpeg + pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.202": "pylibjpeg + pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.203": "pylibjpeg + pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.5": "pylibjpeg-rle (or nothing: pydicom's own RLE decoder)",
}


# Decoding plugins tried first, by speed measured on the realworld JPEG baseline clips
# (bench/decode.py); pydicom's default order is tried after them.
_PREFERRED_PLUGINS = {
    "1.2.840.10008.1.2.4.50": ("pillow", "pylibjpeg"),
    "1.2.840.10008.1.2.4.51": ("pylibjpeg",),
    "1.2.840.10008.1.2.4.90": ("pylibjpeg",),
    "1.2.840.10008.1.2.4.91": ("pylibjpeg",),
}


class FrameDecodeError(ValueError):
    """The pixel data of an object cannot be turned into frames.

    The one exception :func:`load_clip` raises for anything wrong with the object itself:
    unreadable files, missing or inconsistent Image Pixel attributes (the message names the
    attribute), undecodable pixel data, and whatever a decoder raises on a damaged stream.
    ``reason`` is a short, user-facing explanation (no patient data), e.g.
    ``"no pixel data"`` or ``"no decoder installed for JPEG XL (…); install …"``.
    """

    def __init__(self, reason: str, source: str | None = None):
        self.reason = reason
        self.source = source
        super().__init__(f"{source}: {reason}" if source else reason)


@dataclass
class Clip:
    """Decoded frames of one clip.

    ``frames`` is ``(T, H, W, 3)`` uint8 RGB; ``indices[i]`` is the source frame
    number of ``frames[i]``; ``n_frames`` is how many frames the source holds.
    """

    frames: np.ndarray
    indices: list[int]
    n_frames: int
    frame_time_ms: float | None = None
    source: str = "dicom"  # "dicom" | "video"
    photometric: str | None = None  # as stored (DICOM), before conversion to RGB
    transfer_syntax: str | None = None
    mask: np.ndarray | None = field(default=None, repr=False)  # sector mask, when applied

    @property
    def fps(self) -> float | None:
        return 1000.0 / self.frame_time_ms if self.frame_time_ms else None


# --------------------------------------------------------------------------- helpers


def _is_dataset(obj) -> bool:
    from pydicom.dataset import Dataset

    return isinstance(obj, Dataset)


def _looks_like_video(path: Path) -> bool:
    if path.suffix.lower() in VIDEO_SUFFIXES:
        return True
    try:
        with path.open("rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    if len(head) >= 132 and head[128:132] == b"DICM":
        return False
    # RIFF....AVI  /  ....ftyp (MP4/MOV)  /  EBML (MKV/WebM)
    return head[:4] == b"RIFF" or head[4:8] == b"ftyp" or head[:4] == b"\x1a\x45\xdf\xa3"


def _read_dataset(path: Path, *, pixels: bool):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # charset typos and similar are not our business here
            if not pixels:
                return pydicom.dcmread(path, stop_before_pixels=True)
            # Large elements (native pixel data) are deferred: their presence is known but
            # their bytes are read only when needed; native frames are then read straight
            # from the file (see _native_file_source), so a 200-frame clip costs 20 frames.
            return pydicom.dcmread(path, defer_size=_DEFER_BYTES)
    except InvalidDicomError as exc:
        raise FrameDecodeError(f"not a DICOM file ({exc})", str(path)) from exc
    except (OSError, ValueError, EOFError) as exc:
        raise FrameDecodeError(f"cannot read DICOM file: {exc}", str(path)) from exc
    except Exception as exc:  # damaged headers: struct.error, BytesLengthException, ...
        raise FrameDecodeError(f"cannot read DICOM file: {type(exc).__name__}: {exc}", str(path)) from exc


_DEFER_BYTES = 4 * 1024 * 1024


def _native_file_source(ds, tsuid: str):
    """(filename, offset of the Pixel Data value) for deferred native pixel data, else None."""
    from pydicom.dataelem import RawDataElement
    from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

    uid = UID(tsuid)
    if not uid.is_transfer_syntax or uid.is_compressed or uid == DeflatedExplicitVRLittleEndian:
        return None
    filename = getattr(ds, "filename", None)
    if not isinstance(filename, (str, os.PathLike)):
        return None
    try:
        el = ds.get_item("PixelData", keep_deferred=True)
    except (KeyError, TypeError):
        return None
    if not isinstance(el, RawDataElement) or el.value is not None or el.value_tell is None:
        return None
    return os.fspath(filename), int(el.value_tell)


def _has_pixels(ds) -> bool:
    return any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))


def _n_frames(ds) -> int:
    try:
        n = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        n = 1
    return max(n, 1)


def count_frames(path_or_dataset) -> int:
    """Number of frames in a DICOM object or video, without decoding pixel data.

    DICOM: Number of Frames (1 when absent); 0 when the object has no pixel data (for a
    file, judged from the Image Pixel module, so the pixel data is not even read).
    Video: the container's frame count (counted by grabbing when the container has none).
    A file whose Number of Frames could not fit in it (every frame takes at least the
    8-byte item header of a fragment) raises :class:`FrameDecodeError`, so callers never
    size a list of frame indices from an absurd claim.
    """
    if _is_dataset(path_or_dataset):
        ds = path_or_dataset
        return _n_frames(ds) if _has_pixels(ds) else 0
    path = Path(os.fspath(path_or_dataset))
    if _looks_like_video(path):
        return _video_count(path)
    ds = _read_dataset(path, pixels=False)
    if not (("Rows" in ds and "Columns" in ds) or _has_pixels(ds)):
        return 0
    n = _n_frames(ds)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise FrameDecodeError(f"cannot read DICOM file: {exc.strerror}", str(path)) from exc
    if n * 8 > size:
        raise FrameDecodeError(f"NumberOfFrames {n} cannot fit in a file of {size} bytes", str(path))
    return n


def frame_time_ms(ds) -> float | None:
    """Time between frames in milliseconds from the Cine module, or None."""

    def _ft():
        v = ds.get("FrameTime")
        return float(v) if v not in (None, "") and float(v) > 0 else None

    def _ftv():
        v = ds.get("FrameTimeVector")
        if v is None or v == "":
            return None
        vals = [float(x) for x in (v if not isinstance(v, (str, bytes, int, float)) else [v])]
        vals = [x for x in vals if x > 0]  # the first entry is 0 by definition
        return float(np.mean(vals)) if vals else None

    def _rate(keyword):
        def f():
            v = ds.get(keyword)
            return 1000.0 / float(v) if v not in (None, "") and float(v) > 0 else None

        return f

    by_tag = {
        0x00181063: _ft,
        0x00181065: _ftv,
        0x00180040: _rate("CineRate"),
        0x00082144: _rate("RecommendedDisplayFrameRate"),
    }
    order = [_ft, _ftv, _rate("CineRate"), _rate("RecommendedDisplayFrameRate")]
    fip = ds.get("FrameIncrementPointer")
    if fip is not None:
        tags = [fip] if isinstance(fip, int) else list(fip)
        for t in tags:
            fn = by_tag.get(int(t))
            if fn is not None:
                order.insert(0, fn)
    for fn in order:
        try:
            val = fn()
        except (TypeError, ValueError):
            val = None
        if val is not None:
            return val
    return None


def _frame_time_or_none(ds) -> float | None:
    """frame_time_ms, with malformed timing attributes (an unreadable Frame Increment
    Pointer, say) reading as no timing: timing never decides whether frames decode."""
    try:
        return frame_time_ms(ds)
    except Exception:
        return None


def _normalise_indices(indices: Iterable[int] | None, n: int, source: str) -> list[int]:
    if indices is None:
        return list(range(n))
    out = [int(i) for i in indices]
    bad = [i for i in out if i < 0 or i >= n]
    if bad:
        raise IndexError(f"{source}: frame indices {bad[:5]} out of range for {n} frame(s)")
    return out


# --------------------------------------------------------------------------- header checks
#
# Every number below comes from the peer that sent the object. Before anything is
# allocated from them they must agree with each other and with the bytes really present.

#: Largest decoded frame accepted (Rows × Columns × samples × bytes): 64 MiB holds a
#: 4096 × 4096 RGB frame; echo frames are about 1 MB.
MAX_FRAME_BYTES = 64 * 1024 * 1024
#: Entries a palette LUT may expand to (PS3.3 C.7.6.3.1.5: at most 2^16).
MAX_LUT_ENTRIES = 65536
#: Compressed frames may expand at most this much (decoded bytes requested / encapsulated
#: Pixel Data bytes, all frames together); ultrasound clips compress 5-50:1, a black
#: frame a few hundred to one. Requests below MIN_DECODE_BUDGET are always allowed.
MAX_DECODE_RATIO = 1000
MIN_DECODE_BUDGET = 4 * MAX_FRAME_BYTES
_UNDEFINED = 0xFFFFFFFF


def _attr(ds, keyword: str, default=None):
    try:
        return ds.get(keyword, default)
    except Exception as exc:  # pydicom converts lazily: a malformed value raises here
        raise FrameDecodeError(f"{keyword} cannot be read ({type(exc).__name__})") from exc


def _int_attr(ds, keyword: str, default: int | None, allowed: Iterable[int] | range) -> int:
    value = _attr(ds, keyword, None)
    if value is None or value == "":
        if default is None:
            raise FrameDecodeError(f"{keyword} is missing")
        return default
    try:
        if not isinstance(value, (int, str, float, bytes)) and hasattr(value, "__len__"):
            value = value[0]  # a multi-valued US: the first value (pydicom does the same)
        n = int(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        raise FrameDecodeError(f"{keyword} {str(value)[:32]!r} is not an integer") from None
    if n not in allowed:
        shown = f"{allowed.start}..{allowed.stop - 1}" if isinstance(allowed, range) else sorted(allowed)
        raise FrameDecodeError(f"{keyword} {n} is outside {shown}")
    return n


def _float_value(ds, keyword: str) -> float | None:
    """First value of a DS attribute as a finite float, None when absent."""
    value = _attr(ds, keyword, None)
    if value is None or value == "":
        return None
    try:
        if not isinstance(value, (str, bytes, int, float)) and hasattr(value, "__len__"):
            value = value[0]
        f = float(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        raise FrameDecodeError(f"{keyword} {str(value)[:32]!r} is not a number") from None
    if not np.isfinite(f):
        raise FrameDecodeError(f"{keyword} {f} is not a finite number")
    return f


@dataclass(frozen=True)
class _Geometry:
    rows: int
    cols: int
    samples: int
    bits_allocated: int
    bits_stored: int
    frames: int
    frame_bytes: int  # decoded size of one frame
    data_bytes: int  # Pixel Data bytes present
    encapsulated: bool

    def check_request(self, n_wanted: int) -> None:
        """Refuse to decode more than the compressed data can plausibly hold."""
        if not self.encapsulated:
            return  # native: every requested frame was shown to be present
        decoded = n_wanted * self.frame_bytes
        if decoded > max(MAX_DECODE_RATIO * self.data_bytes, MIN_DECODE_BUDGET):
            raise FrameDecodeError(
                f"{n_wanted} frame(s) of Rows {self.rows} x Columns {self.cols} x SamplesPerPixel {self.samples} "
                f"would decode to {decoded} bytes from {self.data_bytes} bytes of compressed Pixel Data "
                f"(more than {MAX_DECODE_RATIO}:1)"
            )


def _pixel_data_length(ds) -> int:
    """Bytes of the Pixel Data value really available (a deferred value: as far as the file goes)."""
    from pydicom.dataelem import RawDataElement

    try:
        el = ds.get_item("PixelData", keep_deferred=True)
    except Exception as exc:
        raise FrameDecodeError(f"Pixel Data cannot be read ({type(exc).__name__})") from exc
    if isinstance(el, RawDataElement) and el.value is None:
        length = int(el.length)
        filename = getattr(ds, "filename", None)
        if el.value_tell is not None and isinstance(filename, (str, os.PathLike)):
            try:
                available = os.path.getsize(filename) - int(el.value_tell)
            except OSError as exc:
                raise FrameDecodeError(f"Pixel Data cannot be read ({exc.strerror})") from exc
            if length == _UNDEFINED:
                return max(available, 0)
            return max(min(length, available), 0)
        return length
    value = el.value
    return len(value) if value is not None else 0


def _check_geometry(ds, tsuid: str) -> _Geometry:
    """The Image Pixel attributes, checked against each other and against the Pixel Data.

    Raises :class:`FrameDecodeError` naming the attribute. For native (uncompressed) data the
    frames claimed must fit in the bytes present; for encapsulated data each frame needs at
    least one fragment (PS3.5 A.4), so Number of Frames is bounded by the fragments present.
    """
    rows = _int_attr(ds, "Rows", None, range(1, 65536))
    cols = _int_attr(ds, "Columns", None, range(1, 65536))
    samples = _int_attr(ds, "SamplesPerPixel", 1, (1, 3, 4))
    bits_allocated = _int_attr(ds, "BitsAllocated", None, (1, 8, 16, 32))
    bits_stored = _int_attr(ds, "BitsStored", bits_allocated, range(1, bits_allocated + 1))
    _int_attr(ds, "HighBit", bits_stored - 1, range(0, bits_allocated))
    _int_attr(ds, "PixelRepresentation", 0, (0, 1))
    if samples > 1:
        _int_attr(ds, "PlanarConfiguration", 0, (0, 1))
    frames = _int_attr(ds, "NumberOfFrames", 1, range(1, 2**31))
    frame_bytes = rows * cols * samples * max(bits_allocated // 8, 1)
    if frame_bytes > MAX_FRAME_BYTES:
        raise FrameDecodeError(
            f"Rows {rows} x Columns {cols} x SamplesPerPixel {samples} x BitsAllocated {bits_allocated} "
            f"is {frame_bytes} bytes per frame, above the {MAX_FRAME_BYTES} accepted"
        )
    have = _pixel_data_length(ds)
    from pydicom.uid import UID

    uid = UID(tsuid)
    encapsulated = tsuid in JPEGXL_SYNTAXES or (uid.is_transfer_syntax and uid.is_encapsulated)
    if uid.is_transfer_syntax and not encapsulated:
        pi = str(_attr(ds, "PhotometricInterpretation", "") or "").strip().upper()
        samples_stored = 2 if (pi == "YBR_FULL_422" and samples == 3) else samples
        if bits_allocated == 1:
            need = (rows * cols * samples_stored * frames + 7) // 8
        else:
            need = rows * cols * samples_stored * (bits_allocated // 8) * frames
        if have < need:
            raise FrameDecodeError(
                f"NumberOfFrames {frames} x Rows {rows} x Columns {cols} x SamplesPerPixel {samples} x "
                f"BitsAllocated {bits_allocated} needs {need} bytes of Pixel Data; {have} present"
            )
    elif encapsulated:
        fragments = _count_fragments(ds, have, enough=frames)
        if frames > fragments:
            raise FrameDecodeError(
                f"NumberOfFrames {frames} but the encapsulated Pixel Data holds {fragments} fragment(s)"
            )
    return _Geometry(rows, cols, samples, bits_allocated, bits_stored, frames, frame_bytes, have, encapsulated)


def _count_fragments(ds, have: int, enough: int) -> int:
    """Fragments after the Basic Offset Table of encapsulated Pixel Data, counted from the
    item headers in place (no copy), stopping once ``enough`` are found."""
    try:
        data = ds.PixelData
    except Exception as exc:
        raise FrameDecodeError(f"Pixel Data cannot be read ({type(exc).__name__})") from exc
    if not isinstance(data, (bytes, bytearray)) or len(data) < 8:
        raise FrameDecodeError(f"encapsulated Pixel Data of {have} bytes has no Basic Offset Table item")
    item, end = b"\xfe\xff\x00\xe0", b"\xfe\xff\xdd\xe0"
    view = memoryview(data)
    if view[:4] != item:
        raise FrameDecodeError("encapsulated Pixel Data does not start with an item (Basic Offset Table)")
    offset = 8 + int.from_bytes(view[4:8], "little")
    count = 0
    while count < enough and offset + 8 <= len(view):
        tag = view[offset:offset + 4]
        if tag == end:
            break
        if tag != item:
            raise FrameDecodeError(f"encapsulated Pixel Data: no item tag at byte {offset}")
        length = int.from_bytes(view[offset + 4:offset + 8], "little")
        if offset + 8 + length > len(view):
            raise FrameDecodeError(f"encapsulated Pixel Data: fragment at byte {offset} runs past the data")
        offset += 8 + length
        count += 1
    return count


def _segmented_lut_entries(words: Sequence[int], eight_bit: bool = False, budget: int = MAX_LUT_ENTRIES) -> int:
    """Entries a segmented palette LUT (PS3.3 C.7.9.2) expands to, without expanding it.

    Indirect segments are followed with one shared budget of entries and segment visits, so
    a table that expands beyond MAX_LUT_ENTRIES (or loops through itself) is refused before
    pydicom builds it.
    """
    visits = [0]

    def walk(offset: int, limit: int | None, depth: int = 0) -> int:
        if depth > 4:
            raise FrameDecodeError("segmented palette LUT: indirect segments nest too deep")
        total, segments = 0, 0
        while offset + 1 < len(words) and (limit is None or segments < limit):
            visits[0] += 1
            if visits[0] > budget:
                raise FrameDecodeError("segmented palette LUT has too many segments")
            opcode, length = words[offset], words[offset + 1]
            offset += 2
            if opcode == 0:
                total += length
                offset += length
            elif opcode == 1:
                total += length
                offset += 1
            elif opcode == 2:
                if eight_bit:  # 8-bit indirect offsets are split over four entries; never seen in echo
                    raise FrameDecodeError("segmented palette LUT: 8-bit indirect segments are not supported")
                if offset + 1 >= len(words):
                    raise FrameDecodeError("segmented palette LUT: indirect segment is truncated")
                target = words[offset + 1] << 16 | words[offset]
                offset += 2
                if target >= len(words):
                    raise FrameDecodeError("segmented palette LUT: indirect segment points past the data")
                total += walk(target, length, depth + 1)
            else:
                raise FrameDecodeError(f"segmented palette LUT: unknown segment type {opcode}")
            segments += 1
            if total > budget:
                raise FrameDecodeError(f"segmented palette LUT expands beyond {budget} entries")
        return total

    return walk(0, None)


# --------------------------------------------------------------------------- colour


def _to_uint8_scaled(arr: np.ndarray, bits: int) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if bits <= 8:
        return np.clip(arr, 0, 255).astype(np.uint8)
    a = np.clip(arr.astype(np.float32), 0, 2**bits - 1) * (255.0 / (2**bits - 1))
    return np.rint(a).astype(np.uint8)


def _ybr_full_to_rgb(stack: np.ndarray) -> np.ndarray:
    """YBR_FULL (Y, Cb, Cr; ITU-R BT.601 full range, PS3.3 C.7.6.3.1.2) → RGB, uint8.

    OpenCV's YCrCb transform is the same JPEG/JFIF full-range transform; only the
    order of the chroma planes differs.
    """
    import cv2

    out = np.empty_like(stack)
    for k, f in enumerate(stack):
        out[k] = cv2.cvtColor(np.ascontiguousarray(f[..., (0, 2, 1)]), cv2.COLOR_YCrCb2RGB)
    return out


def _ybr_partial_to_rgb(stack: np.ndarray) -> np.ndarray:
    """YBR_PARTIAL_4xx (BT.601 studio range: Y 16–235, Cb/Cr 16–240) → RGB uint8.

    The inverse of the PS3.3 C.7.6.3.1.2 YBR_PARTIAL_422 equations; the decoder has
    already upsampled the chroma planes.
    """
    a = stack.astype(np.float32)
    y = (a[..., 0] - 16.0) * (255.0 / 219.0)
    cb = (a[..., 1] - 128.0) * (255.0 / 224.0)
    cr = (a[..., 2] - 128.0) * (255.0 / 224.0)
    r = y + 1.402 * cr
    g = y - 0.344136 * cb - 0.714136 * cr
    b = y + 1.772 * cb
    return np.rint(np.clip(np.stack([r, g, b], axis=-1), 0, 255)).astype(np.uint8)


def _palette_table(ds, dtype) -> tuple[np.ndarray, int]:
    """(K, 3) uint8 RGB table and the first mapped value, from the palette LUTs."""
    from pydicom.pixels import apply_color_lut

    for colour in ("Red", "Green", "Blue"):
        keyword = f"{colour}PaletteColorLookupTableDescriptor"
        desc = _attr(ds, keyword)
        if desc is None:
            raise FrameDecodeError(f"PALETTE COLOR without {keyword}")
        try:
            desc = [int(v) for v in (desc if not isinstance(desc, (int, str, bytes)) else [desc])]
        except (TypeError, ValueError):
            raise FrameDecodeError(f"{keyword} is not three integers") from None
        if len(desc) != 3:
            raise FrameDecodeError(f"{keyword} has {len(desc)} value(s); three are required (PS3.3 C.7.6.3.1.5)")
        if not 0 <= desc[0] < MAX_LUT_ENTRIES or desc[2] not in (8, 16):
            raise FrameDecodeError(f"{keyword} {desc} is not a valid descriptor (entries < 65536, 8 or 16 bits)")
        if colour == "Red":
            red = desc
        seg = _attr(ds, f"Segmented{colour}PaletteColorLookupTableData")
        plain = _attr(ds, f"{colour}PaletteColorLookupTableData")
        if plain is None and seg is not None:
            size = 1 if desc[2] == 8 else 2
            endian = "<" if getattr(ds, "is_little_endian", True) in (True, None) else ">"
            words = np.frombuffer(bytes(seg)[: len(seg) // size * size], f"{endian}u{size}").tolist()
            _segmented_lut_entries(words, eight_bit=size == 1)
        elif plain is None:
            raise FrameDecodeError(f"PALETTE COLOR without {colour}PaletteColorLookupTableData")
    n_entries = red[0] or MAX_LUT_ENTRIES
    first = red[1]
    values = np.arange(first, first + n_entries)
    if np.issubdtype(dtype, np.signedinteger):
        values = values.astype(np.int64)
    values = values.astype(dtype, copy=False)
    try:
        table = apply_color_lut(values, ds)[..., :3]
    except Exception as exc:  # malformed LUTs: say so instead of a deep stack
        raise FrameDecodeError(f"cannot apply the palette colour LUTs: {exc}") from exc
    if table.dtype != np.uint8:
        if int(table.max()) <= 255:  # 16-bit descriptor, 8-bit values (writer quirk)
            table = table.astype(np.uint8)
        else:
            table = np.rint(table.astype(np.float32) / 257.0).astype(np.uint8)
    return table, first


def _mono_to_uint8(arr: np.ndarray, ds, photometric: str) -> np.ndarray:
    bits = _int_attr(ds, "BitsStored", 8, range(1, 33))
    if arr.dtype == np.uint8 or (bits <= 8 and arr.min() >= 0 and arr.max() <= 255):
        out = arr.astype(np.uint8, copy=False)
        if photometric == "MONOCHROME1":
            out = 255 - out
        return out
    slope = _float_value(ds, "RescaleSlope")
    intercept = _float_value(ds, "RescaleIntercept")
    c, w = _float_value(ds, "WindowCenter"), _float_value(ds, "WindowWidth")
    a = arr.astype(np.float64)
    a = a * (slope or 1.0) + (intercept or 0.0)
    if c is not None and w is not None:
        w = max(w, 1.0)
        # PS3.3 C.11.2.1.2.1 (LINEAR)
        y = ((a - (c - 0.5)) / (w - 1.0) + 0.5) * 255.0
    else:
        lo, hi = float(a.min()), float(a.max())
        y = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    out = np.rint(np.clip(y, 0, 255)).astype(np.uint8)
    if photometric == "MONOCHROME1":
        out = 255 - out
    return out


def _to_rgb(stack: np.ndarray, ds, photometric: str) -> np.ndarray:
    """Decoded frames (T, H, W[, S]) in ``photometric`` → (T, H, W, 3) uint8 RGB."""
    from pydicom.pixels import convert_color_space

    bits = _int_attr(ds, "BitsStored", 8, range(1, 33))
    pi = photometric.upper().strip()
    if pi in ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420", "YBR_PARTIAL_422"):
        if stack.ndim != 4 or stack.shape[-1] != 3:
            raise FrameDecodeError(f"{pi} data decoded to shape {stack.shape[1:]}, expected 3 samples per pixel")
        if pi in ("YBR_FULL", "YBR_FULL_422"):
            # (YBR_FULL_422 arrives already upsampled by the decoder/pydicom.)
            if stack.dtype == np.uint8:
                stack = _ybr_full_to_rgb(stack)
            else:
                stack = np.stack([convert_color_space(f, "YBR_FULL", "RGB") for f in stack])
        elif pi in ("YBR_PARTIAL_420", "YBR_PARTIAL_422"):
            return _ybr_partial_to_rgb(stack)
        elif pi != "RGB":
            raise FrameDecodeError(f"decoded data still in {pi}; no conversion to RGB available")
        return _to_uint8_scaled(stack, bits)
    if pi == "PALETTE COLOR":
        table, first = _palette_table(ds, stack.dtype)
        idx = np.clip(stack.astype(np.int64) - first, 0, len(table) - 1)
        return table[idx]
    if pi in ("MONOCHROME1", "MONOCHROME2"):
        if stack.ndim == 4:
            stack = stack[..., 0]
        grey = _mono_to_uint8(stack, ds, pi)
        return np.repeat(grey[..., None], 3, axis=-1)
    raise FrameDecodeError(f"unsupported Photometric Interpretation {photometric!r}")


# --------------------------------------------------------------------------- decoding


def _jpegxl_decoder():
    """imagecodecs' JPEG XL decoder, or None when not installed / built without JPEG XL."""
    try:
        import imagecodecs
    except ImportError:
        return None
    try:
        if not imagecodecs.JPEGXL.available:
            return None
    except AttributeError:
        return None
    return imagecodecs.jpegxl_decode


def _decode_jpegxl(ds, wanted: list[int], n: int, tsuid: str) -> tuple[np.ndarray, str]:
    from pydicom.encaps import get_frame

    name = JPEGXL_SYNTAXES[tsuid]
    decode = _jpegxl_decoder()
    if decode is None:
        raise FrameDecodeError(
            f"no decoder installed for {name} ({tsuid}); install imagecodecs built with JPEG XL"
        )
    eot = None
    if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
        eot = (bytes(ds.ExtendedOffsetTable), bytes(ds.ExtendedOffsetTableLengths))
    frames = []
    for i in wanted:
        try:
            data = get_frame(ds.PixelData, i, number_of_frames=n, extended_offsets=eot)
            arr = decode(data)
        except Exception as exc:
            raise FrameDecodeError(f"{name} frame {i} could not be decoded: {exc}") from exc
        if arr.ndim == 3 and arr.shape[-1] == 4:
            arr = arr[..., :3]
        frames.append(arr)
    stack = np.stack(frames)
    # JPEG XL JPEG Recompression (…111) stores a YBR_FULL_422 JPEG losslessly; libjxl
    # reconstructs it to RGB pixels. The other JPEG XL syntaxes hold the samples in the
    # declared Photometric Interpretation (PS3.5 8.2.16 / A.4.13).
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    pi = str(ds.get("PhotometricInterpretation", "")).strip()
    if tsuid == "1.2.840.10008.1.2.4.111" and spp == 3:
        out_pi = "RGB"
    else:
        out_pi = pi or ("RGB" if spp == 3 else "MONOCHROME2")
    if spp == 1 and stack.ndim == 4:
        stack = stack[..., 0]
    return stack, out_pi


def _decode_dicom(ds, wanted: list[int], n: int, source: str) -> tuple[np.ndarray, str]:
    """Decode the frames ``wanted`` (sorted, unique) → (stack, photometric of the stack)."""
    from pydicom.pixels import get_decoder

    tsuid = str(ds.file_meta.get("TransferSyntaxUID", "")) if hasattr(ds, "file_meta") else ""
    if not tsuid:
        raise FrameDecodeError("no Transfer Syntax UID in the file meta information")
    if tsuid in JPEGXL_SYNTAXES:
        return _decode_jpegxl(ds, wanted, n, tsuid)
    try:
        decoder = get_decoder(tsuid)
    except (NotImplementedError, ValueError) as exc:
        raise FrameDecodeError(f"no decoder for transfer syntax {tsuid}: {exc}") from exc
    if not decoder.is_available:
        hint = _INSTALL_HINTS.get(tsuid, "a pydicom pixel-data plugin for it")
        raise FrameDecodeError(
            f"no decoder installed for {decoder.UID.name} ({tsuid}); install {hint}"
        )
    from pydicom.pixels import as_pixel_options
    from pydicom.uid import UID

    pi_in = str(ds.get("PhotometricInterpretation", "")).strip()
    plugins = [p for p in _PREFERRED_PLUGINS.get(tsuid, ()) if p in decoder.available_plugins]
    native_file = _native_file_source(ds, tsuid)
    errors = []
    for plugin in plugins + [""]:  # "" = pydicom's own choice, trying every available plugin
        frames, pi_out = [], pi_in
        fh = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if native_file is not None:
                    fh = open(native_file[0], "rb")
                    fh.seek(native_file[1])
                    src = fh
                    opts = dict(as_pixel_options(ds), transfer_syntax_uid=UID(tsuid), pixel_keyword="PixelData")
                else:
                    src, opts = ds, {}
                # as_rgb=False: colour conversion is ours (OpenCV, much faster than
                # pydicom's numpy transform); the decoder reports the colour space of
                # what it returns in `changes`.
                for arr, changes in decoder.iter_array(
                    src, indices=wanted, as_rgb=False, decoding_plugin=plugin, **opts
                ):
                    pi_out = str(changes.get("photometric_interpretation", pi_out))
                    frames.append(arr)
            break
        except Exception as exc:
            errors.append(f"{plugin or 'default'}: {exc}")
        finally:
            if fh is not None:
                fh.close()
    else:
        raise FrameDecodeError(f"pixel data could not be decoded ({decoder.UID.name}): {'; '.join(errors)}")
    return np.stack(frames), pi_out


def _load_dicom(ds, indices, source: str) -> Clip:
    if not _has_pixels(ds):
        raise FrameDecodeError("no pixel data", source)
    if "PixelData" not in ds:
        raise FrameDecodeError("float pixel data is not an ultrasound image", source)
    tsuid = str(ds.file_meta.get("TransferSyntaxUID", "")) if hasattr(ds, "file_meta") else ""
    try:
        if not tsuid:
            raise FrameDecodeError("no Transfer Syntax UID in the file meta information")
        geometry = _check_geometry(ds, tsuid)  # before anything is sized by the header
        pi = str(_attr(ds, "PhotometricInterpretation", "") or "").strip()
        timing = _frame_time_or_none(ds)
    except FrameDecodeError as exc:
        raise FrameDecodeError(exc.reason, source) from exc
    n = geometry.frames
    order = _normalise_indices(indices, n, source)
    wanted = sorted(set(order))
    if not wanted:
        return Clip(np.zeros((0, geometry.rows, geometry.cols, 3), np.uint8), [], n, timing, "dicom", pi or None, tsuid)
    try:
        geometry.check_request(len(wanted))
        stack, pi_dec = _decode_dicom(ds, wanted, n, source)
        rgb = _to_rgb(stack, ds, pi_dec)
    except FrameDecodeError as exc:
        if exc.source is None:
            raise FrameDecodeError(exc.reason, source) from exc
        raise
    except Exception as exc:  # a decoder or converter failing on damaged data: still one error type
        raise FrameDecodeError(f"pixel data could not be converted: {type(exc).__name__}: {str(exc)[:200]}",
                               source) from exc
    if order != wanted:
        pos = {f: k for k, f in enumerate(wanted)}
        rgb = rgb[[pos[i] for i in order]]
    return Clip(
        frames=np.ascontiguousarray(rgb),
        indices=order,
        n_frames=n,
        frame_time_ms=timing,
        source="dicom",
        photometric=pi or None,
        transfer_syntax=tsuid,
    )


# --------------------------------------------------------------------------- video


def _open_video(path: Path):
    import cv2

    if not path.is_file():
        raise FrameDecodeError("video file not found", str(path))
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise FrameDecodeError("OpenCV cannot open this video (unsupported container or codec)", str(path))
    return cap


def _video_count(path: Path) -> int:
    import cv2

    cap = _open_video(path)
    try:
        n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        if n <= 0:
            n = 0
            while cap.grab():
                n += 1
        return n
    finally:
        cap.release()


def _load_video(path: Path, indices) -> Clip:
    import cv2

    cap = _open_video(path)
    try:
        fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        n_meta = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        wanted_set = None if indices is None else {int(i) for i in indices}
        if wanted_set is not None and any(i < 0 for i in wanted_set):
            raise IndexError(f"{path}: negative frame index")
        last = None if wanted_set is None else (max(wanted_set) if wanted_set else -1)
        got: dict[int, np.ndarray] = {}
        i = 0
        while last is None or i <= last:
            if wanted_set is None or i in wanted_set:
                ok, frame = cap.read()
                if not ok:
                    break
                got[i] = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            else:
                if not cap.grab():
                    break
            i += 1
        # Frames really present: all read (indices=None) or the container's count.
        n = i if indices is None else max(n_meta, i)
        if indices is None:
            order = list(range(i))
        else:
            order = [int(k) for k in indices]
            missing = [k for k in order if k not in got]
            if missing:
                raise IndexError(f"{path}: frame indices {missing[:5]} out of range for {n} frame(s)")
        if order:
            frames = np.stack([got[k] for k in order])
        else:
            w = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH) or 0)
            h = int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT) or 0)
            frames = np.zeros((0, h, w, 3), np.uint8)
        if indices is None and not order:
            raise FrameDecodeError("video has no decodable frames", str(path))
    finally:
        cap.release()
    return Clip(
        frames=np.ascontiguousarray(frames),
        indices=order,
        n_frames=n,
        frame_time_ms=(1000.0 / fps) if fps > 0 else None,
        source="video",
        photometric=None,
        transfer_syntax=None,
    )


# --------------------------------------------------------------------------- public


def load_clip(path_or_dataset, indices: Sequence[int] | None = None, *, sector_mask: bool = False) -> Clip:
    """Decode frames of a DICOM object (path or :class:`pydicom.Dataset`) or a video file.

    ``indices`` selects source frames (in the order given; ``None`` = all); only those
    frames are decoded. Raises :class:`FrameDecodeError` (with ``.reason``) when the
    object has no pixel data or cannot be decoded, and ``IndexError`` for indices out
    of range. ``sector_mask=True`` blanks everything outside the ultrasound sector
    (see :func:`sector_mask`); the published pipeline does not mask, so it is off by
    default.
    """
    if indices is not None:
        indices = [int(i) for i in indices]  # iterators, ranges and numpy arrays alike
    ds = None
    if _is_dataset(path_or_dataset):
        ds = path_or_dataset
        fname = getattr(ds, "filename", None)
        src = str(fname or "<dataset>")
        if not _has_pixels(ds) and "Rows" in ds and isinstance(fname, (str, os.PathLike)) and Path(fname).is_file():
            ds = _read_dataset(Path(fname), pixels=True)  # read with stop_before_pixels=True
        clip = _load_dicom(ds, indices, src)
    else:
        path = Path(os.fspath(path_or_dataset))
        if _looks_like_video(path):
            clip = _load_video(path, indices)
        else:
            if not path.is_file():
                raise FrameDecodeError("file not found", str(path))
            ds = _read_dataset(path, pixels=True)
            clip = _load_dicom(ds, indices, str(path))
    if sector_mask and len(clip.frames):
        m = _sector_mask_impl(clip.frames, ds)
        clip.frames = apply_mask(clip.frames, m)
        clip.mask = m
    return clip


# --------------------------------------------------------------------------- masking


def _region_mask(ds, h: int, w: int) -> np.ndarray | None:
    """Union of the 2D regions (Region Spatial Format 1) of the US Region Sequence.

    Returns None when there is no such region, or when a region lies outside the
    image (the pixel data was resized without updating the regions).
    """
    regions = ds.get("SequenceOfUltrasoundRegions") if ds is not None else None
    if not regions:
        return None
    mask = np.zeros((h, w), bool)
    found = False
    for r in regions:
        try:
            if int(r.get("RegionSpatialFormat", -1)) != 1:
                continue
            x0, y0 = int(r.RegionLocationMinX0), int(r.RegionLocationMinY0)
            x1, y1 = int(r.RegionLocationMaxX1), int(r.RegionLocationMaxY1)
        except (AttributeError, TypeError, ValueError):
            continue
        if x0 < 0 or y0 < 0 or x1 >= w or y1 >= h or x1 < x0 or y1 < y0:
            return None
        mask[y0 : y1 + 1, x0 : x1 + 1] = True
        found = True
    return mask if found else None


def _content_mask(frames: np.ndarray) -> np.ndarray | None:
    """The ultrasound sector from image content, or None when nothing plausible is found.

    Pixels that change over time (or, for a single frame, that are not black) are
    opened morphologically (removing thin lines: ECG trace, calipers, text strokes);
    the largest connected region is taken and filled to its convex hull.
    """
    import cv2

    t, h, w = frames.shape[:3]
    grey = frames.max(axis=-1) if frames.ndim == 4 else frames
    if t >= 2:
        cand = (grey.max(axis=0).astype(np.int16) - grey.min(axis=0)) > 12
        if cand.mean() < 0.02:  # (nearly) static clip: use brightness instead
            cand = grey.mean(axis=0) > 12
    else:
        cand = grey[0] > 12
    k = max(3, int(round(min(h, w) / 60)) | 1)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
    opened = cv2.morphologyEx(cand.astype(np.uint8), cv2.MORPH_OPEN, kernel)
    opened = cv2.morphologyEx(opened, cv2.MORPH_CLOSE, kernel)
    n_lab, labels, stats, _ = cv2.connectedComponentsWithStats(opened, connectivity=8)
    if n_lab <= 1:
        return None
    biggest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    if stats[biggest, cv2.CC_STAT_AREA] < 0.02 * h * w:
        return None
    pts = cv2.findNonZero((labels == biggest).astype(np.uint8))
    hull = cv2.convexHull(pts)
    mask = np.zeros((h, w), np.uint8)
    cv2.fillConvexPoly(mask, hull, 1)
    return mask.astype(bool)


def _sector_mask_impl(frames: np.ndarray, ds=None) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim == 3 and frames.shape[-1] == 3:  # one (H, W, 3) frame
        frames = frames[None]
    h, w = frames.shape[1:3]
    region = _region_mask(ds, h, w)
    if region is not None:
        # The region rectangle still holds text and markers burned in beside the fan:
        # refine it by content inside the rectangle; keep the rectangle if that fails.
        inside = apply_mask(frames, region)
        content = _content_mask(inside)
        if content is not None:
            content &= region
            if content.sum() >= 0.2 * region.sum():
                return content
        return region
    content = _content_mask(frames)
    return content if content is not None else np.ones((h, w), bool)


def sector_mask(frames: np.ndarray, ds=None) -> np.ndarray:
    """Boolean (H, W) mask of the ultrasound sector (True = keep).

    From the 2D regions (Region Spatial Format 1) of the Sequence of Ultrasound
    Regions (PS3.3 C.8.5.5) when ``ds`` has them and they fit the image, refined by
    the image content inside them; otherwise from the image content alone (see
    :func:`_content_mask`). When nothing plausible is found the mask keeps everything,
    so masking never blanks a clip. ``frames``: (T, H, W, 3) or (T, H, W).
    """
    return _sector_mask_impl(frames, ds)


def apply_mask(frames: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A copy of ``frames`` (T, H, W[, C]) with pixels outside ``mask`` set to 0."""
    frames = np.asarray(frames)
    mask = np.asarray(mask, bool)
    if mask.shape != frames.shape[1:3]:
        raise ValueError(f"mask shape {mask.shape} does not match frames {frames.shape[1:3]}")
    m = mask[None, :, :, None] if frames.ndim == 4 else mask[None]
    return np.where(m, frames, 0).astype(frames.dtype, copy=False)
