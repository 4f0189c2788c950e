"""echonode.dicom.frames on every real-world ultrasound file, plus the edge cases.

No mocks of decoders: every file is decoded by the installed plugins. The only
monkeypatch simulates an absent JPEG XL decoder, to check the error's reason.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")

from echonode.dicom import frames as fr  # noqa: E402
from echonode.dicom.frames import (  # noqa: E402
    Clip,
    FrameDecodeError,
    apply_mask,
    count_frames,
    frame_time_ms,
    load_clip,
    sector_mask,
)

from conftest import REALWORLD  # noqa: E402

US_FILES = sorted(REALWORLD.glob("us_multiframe/*.dcm")) + sorted(REALWORLD.glob("us_singleframe/*.dcm"))
SR_FILES = sorted(REALWORLD.glob("sr/*.dcm"))
MF = REALWORLD / "us_multiframe"
SF = REALWORLD / "us_singleframe"


def _read(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path)


def _chroma(rgb: np.ndarray) -> np.ndarray:
    """max |R-G|, |G-B|, |R-B| per pixel."""
    a = rgb.astype(np.int16)
    return np.max(np.abs(np.stack([a[..., 0] - a[..., 1], a[..., 1] - a[..., 2], a[..., 0] - a[..., 2]])), axis=0)


def test_realworld_files_present():
    assert len(US_FILES) == 19, f"expected 19 ultrasound files under {REALWORLD}, found {len(US_FILES)}"
    assert len(SR_FILES) == 3


# --------------------------------------------------------------------------- every file


@pytest.mark.parametrize("path", US_FILES, ids=lambda p: p.name)
def test_every_us_file_decodes_to_expected_shape(path):
    ds = _read(path)
    n = int(ds.get("NumberOfFrames", 1) or 1)
    rows, cols = int(ds.Rows), int(ds.Columns)
    ts = str(ds.file_meta.TransferSyntaxUID)
    assert count_frames(path) == n
    if ts in fr.JPEGXL_SYNTAXES and fr._jpegxl_decoder() is None:
        with pytest.raises(FrameDecodeError) as ei:
            load_clip(path)
        assert "no decoder installed for JPEG XL" in ei.value.reason and ts in ei.value.reason
        return
    clip = load_clip(path)
    assert isinstance(clip, Clip)
    assert clip.frames.shape == (n, rows, cols, 3)
    assert clip.frames.dtype == np.uint8
    assert clip.indices == list(range(n))
    assert clip.n_frames == n
    assert clip.source == "dicom"
    assert clip.transfer_syntax == ts
    assert clip.photometric == ds.PhotometricInterpretation
    # Real images: not a constant frame (a broken decode often is).
    assert clip.frames[0].std() > 1.0


@pytest.mark.parametrize("path", SR_FILES, ids=lambda p: p.name)
def test_sr_files_have_no_pixel_data(path):
    with pytest.raises(FrameDecodeError) as ei:
        load_clip(path)
    assert ei.value.reason == "no pixel data"
    assert count_frames(path) == 0


def test_jpegxl_decodes_with_imagecodecs_or_says_why(monkeypatch):
    path = MF / "dcm4che__will-jxl.dcm"
    if fr._jpegxl_decoder() is not None:
        clip = load_clip(path, [0, 26])
        assert clip.frames.shape == (2, 708, 1016, 3)
        # Colour-flow clip: red and blue flow both present (a YBR/RGB mix-up loses this).
        f = clip.frames.astype(np.int16)
        red = (f[..., 0] > 150) & (f[..., 2] < 80)
        blue = (f[..., 2] > 150) & (f[..., 0] < 80)
        assert red.sum() > 500 and blue.sum() > 500
    monkeypatch.setattr(fr, "_jpegxl_decoder", lambda: None)
    with pytest.raises(FrameDecodeError) as ei:
        load_clip(path)
    assert ei.value.reason.startswith("no decoder installed for JPEG XL JPEG Recompression (1.2.840.10008.1.2.4.111)")
    assert "imagecodecs" in ei.value.reason
    assert str(path) in str(ei.value)


# --------------------------------------------------------------------------- frame selection


def test_index_selection_returns_only_requested_frames_in_order():
    path = MF / "pydicom__examples_ybr_color.dcm"  # JPEG baseline, 30 frames, BOT
    full = load_clip(path)
    sel = load_clip(path, [29, 0, 2, 2])
    assert sel.indices == [29, 0, 2, 2]
    assert sel.n_frames == 30
    assert sel.frames.shape == (4, 240, 320, 3)
    for k, i in enumerate(sel.indices):
        np.testing.assert_array_equal(sel.frames[k], full.frames[i])
    empty = load_clip(path, [])
    assert empty.frames.shape == (0, 240, 320, 3)
    with pytest.raises(IndexError):
        load_clip(path, [30])
    with pytest.raises(IndexError):
        load_clip(path, [-1])


def test_fragmented_frames_without_offset_table():
    # 8 frames in 44 fragments of 8 KiB, empty Basic Offset Table (dcmcjpeg +fs 8).
    path = MF / "dicomParser__IM00001.fragmented_no_bot_jpeg_baseline.50.dcm"
    full = load_clip(path)
    last = load_clip(path, [7, 3])
    np.testing.assert_array_equal(last.frames[0], full.frames[7])
    np.testing.assert_array_equal(last.frames[1], full.frames[3])
    assert not np.array_equal(full.frames[7], full.frames[0])


def test_analysis_indices_on_long_clip():
    path = MF / "pydicom-data__color3d_jpeg_baseline.dcm"  # 120 frames, empty BOT
    idx = list(range(0, 40, 2))
    clip = load_clip(path, idx)
    assert clip.indices == idx and clip.frames.shape == (20, 480, 640, 3)
    one = load_clip(path, [38])
    np.testing.assert_array_equal(one.frames[0], clip.frames[-1])


def test_dataset_input_equals_path_input():
    path = MF / "dcm4che__US-PAL-8-10x-echo.dcm"
    a = load_clip(path, [1, 9])
    b = load_clip(_read(path), [1, 9])
    np.testing.assert_array_equal(a.frames, b.frames)
    assert count_frames(_read(path)) == 10
    # A header read without pixel data is completed from its file.
    hdr = pydicom.dcmread(path, stop_before_pixels=True)
    np.testing.assert_array_equal(load_clip(hdr, [1, 9]).frames, a.frames)


# --------------------------------------------------------------------------- timing


def test_frame_timing_from_files():
    assert load_clip(MF / "pydicom__examples_ybr_color.dcm", [0]).frame_time_ms == pytest.approx(33.333)
    # FrameTime 47.4359 wins over CineRate 21 (47.62 ms; Frame Increment Pointer names FrameTime).
    assert frame_time_ms(_read(MF / "dcm4che__will-jxl.dcm")) == pytest.approx(47.4359)
    ds = _read(MF / "dicomParser__IM00001.implicit_little_endian.dcm")
    vec = [float(x) for x in ds.FrameTimeVector]
    assert load_clip(ds, [0]).frame_time_ms == pytest.approx(np.mean([v for v in vec if v > 0]))
    assert load_clip(SF / "dcm4che__YBR_422.dcm").frame_time_ms is None


def test_frame_timing_attributes():
    from pydicom.dataset import Dataset

    ds = Dataset()
    assert frame_time_ms(ds) is None
    ds.RecommendedDisplayFrameRate = 25
    assert frame_time_ms(ds) == pytest.approx(40.0)
    ds.CineRate = 50
    assert frame_time_ms(ds) == pytest.approx(20.0)
    ds.FrameTimeVector = [0, 10, 30]
    assert frame_time_ms(ds) == pytest.approx(20.0)
    ds.FrameTime = 33.3
    assert frame_time_ms(ds) == pytest.approx(33.3)
    ds.FrameIncrementPointer = 0x00181065  # says: use the Frame Time Vector
    assert frame_time_ms(ds) == pytest.approx(20.0)


# --------------------------------------------------------------------------- colour


@pytest.mark.parametrize(
    "path",
    [
        SF / "dcm4che__YBR_FULL-RLE.dcm",  # RLE, YBR_FULL, planar configuration 1
        MF / "fo-dicom__DIRW0007.dcm",  # JPEG baseline YBR_FULL_422 (grey apical echo)
        MF / "pydicom-data__color3d_jpeg_baseline.dcm",
        SF / "dcm4che__YBR_422.dcm",  # native YBR_FULL_422
    ],
    ids=lambda p: p.name,
)
def test_grey_ultrasound_stays_grey(path):
    """B-mode pixels must come out with R≈G≈B; a skipped or doubled YBR→RGB
    conversion turns grey into green or purple."""
    ds = _read(path)
    clip = load_clip(ds, [0])
    region = fr._region_mask(ds, ds.Rows, ds.Columns)  # the 2D tissue region (not the UI)
    assert region is not None
    f = clip.frames[0]
    tissue = (f.max(axis=-1) > 30) & region
    assert tissue.sum() > 1000
    assert np.mean(_chroma(f)[tissue] <= 6) > 0.9


@pytest.mark.parametrize("name", ["pydicom-data__US1_J2KI.dcm", "pydicom-data__US1_J2KR.dcm"])
def test_jpeg2000_ybr_ict_and_rct_grey_bmode_and_colour_doppler(name):
    """JPEG 2000 YBR_ICT / YBR_RCT power-Doppler frame (no US regions in the header): the B-mode
    strip below the two Doppler boxes is grey, the boxes themselves carry colour."""
    f = load_clip(SF / name).frames[0]
    bmode = f[298:336, 20:620]
    tissue = bmode.max(axis=-1) > 30
    assert tissue.sum() > 10000
    assert np.mean(_chroma(bmode)[tissue] <= 6) > 0.95
    assert np.mean(_chroma(f[150:292, 90:545]) > 60) > 0.1


def test_monochrome_is_grey():
    f = load_clip(SF / "fo-dicom__GH364.dcm").frames[0]
    assert np.array_equal(f[..., 0], f[..., 1]) and np.array_equal(f[..., 1], f[..., 2])


@pytest.mark.parametrize(
    "path",
    [
        SF / "dcm4che__US-RGB-8-esopecho.dcm",
        MF / "dbdicom__UltrasoundPaletteColor_0020.dcm",
        MF / "dicomParser__IM00001.fragmented_no_bot_jpeg_baseline.50.dcm",
        SF / "dcm4che__US-RGB-8-epicard.dcm",  # planar configuration 1, colour flow
    ],
    ids=lambda p: p.name,
)
def test_colour_doppler_files_have_colour(path):
    f = load_clip(path, [0]).frames[0]
    assert np.mean(_chroma(f) > 60) > 0.002


def test_ybr_jpeg_matches_native_rgb_of_same_clip():
    rgb = load_clip(MF / "dicomParser__IM00001.implicit_little_endian.dcm").frames.astype(np.int16)
    jpg = load_clip(MF / "dicomParser__IM00001.fragmented_no_bot_jpeg_baseline.50.dcm").frames.astype(np.int16)
    assert np.abs(rgb - jpg).mean() < 4.0
    assert np.abs(rgb.mean(axis=(0, 1, 2)) - jpg.mean(axis=(0, 1, 2))).max() < 2.0


def test_jpeg2000_lossy_matches_lossless():
    a = load_clip(SF / "pydicom-data__US1_J2KI.dcm").frames.astype(np.int16)  # YBR_ICT
    b = load_clip(SF / "pydicom-data__US1_J2KR.dcm").frames.astype(np.int16)  # YBR_RCT
    assert np.abs(a - b).mean() < 3.0


def test_palette_rle_equals_palette_jpegls():
    a = load_clip(MF / "dcm4che__US-PAL-8-10x-echo.dcm")
    b = load_clip(MF / "dcm4che__jpeg-ls-Palette.dcm")
    np.testing.assert_array_equal(a.frames, b.frames)


def test_palette_8bit_index_16bit_lut_by_hand():
    path = MF / "dcm4che__US-PAL-8-10x-echo.dcm"
    ds = _read(path)
    # the raw 8-bit indices of frame 0, from pydicom's own RLE decoder (no palette applied)
    idx = pydicom.pixels.pixel_array(path, index=0, decoding_plugin="pydicom")
    assert idx.dtype == np.uint8 and idx.shape == (ds.Rows, ds.Columns)
    luts = [
        np.frombuffer(getattr(ds, f"{c}PaletteColorLookupTableData"), "<u2")
        for c in ("Red", "Green", "Blue")
    ]
    want = np.stack([np.rint(lut[idx] / 257.0) for lut in luts], axis=-1).astype(np.uint8)
    np.testing.assert_array_equal(load_clip(path).frames[0], want)


def test_palette_16bit_segmented_lut():
    path = SF / "pydicom-data__gdcm-US-ALOKA-16.dcm"
    ds = _read(path)
    assert ds.BitsAllocated == 16 and "SegmentedRedPaletteColorLookupTableData" in ds
    f = load_clip(path).frames[0]
    assert f.shape == (480, 640, 3) and f.dtype == np.uint8
    # The two B-mode regions (x 32..639, y 24..415) are grey and use the 8-bit range.
    bmode = f[24:416, 32:640]
    assert np.mean(_chroma(bmode) <= 6) > 0.95
    assert bmode.max() > 200 and np.mean(bmode > 20) > 0.2


def test_planar_configuration_1_rgb_big_endian_by_hand():
    path = SF / "dcm4che__US-RGB-8-epicard.dcm"
    ds = _read(path)
    assert ds.PlanarConfiguration == 1 and ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.2"
    raw = np.frombuffer(ds.PixelData, np.uint8)[: 3 * ds.Rows * ds.Columns]
    want = raw.reshape(3, ds.Rows, ds.Columns).transpose(1, 2, 0)
    np.testing.assert_array_equal(load_clip(path).frames[0], want)


def test_deflated_transfer_syntax(tmp_path):
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    src = SF / "dcm4che__US-RGB-8-esopecho.dcm"
    ds = _read(src)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    out = tmp_path / "deflated.dcm"
    ds.save_as(out, enforce_file_format=True)
    assert _read(out).file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    np.testing.assert_array_equal(load_clip(out).frames, load_clip(src).frames)


def _mono_ds(arr: np.ndarray, photometric: str, bits: int, **extra):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16 if bits > 8 else 8
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    for k, v in extra.items():
        setattr(ds, k, v)
    ds.PixelData = arr.astype(np.uint16 if bits > 8 else np.uint8).tobytes()
    return ds


def test_monochrome_16bit_window_and_minmax_and_monochrome1():
    arr = np.array([[0, 1000, 2000, 4095]], np.uint16)
    # VOI window centre 2048 width 4096 → linear ramp over 0..4095
    win = load_clip(_mono_ds(arr, "MONOCHROME2", 12, WindowCenter=2048, WindowWidth=4096)).frames[0, 0, :, 0]
    assert win[0] == 0 and win[-1] == 255 and 55 < win[1] < 70 and 120 < win[2] < 135
    # No window: min–max of the decoded frames
    mm = load_clip(_mono_ds(arr, "MONOCHROME2", 12)).frames[0, 0, :, 0]
    np.testing.assert_array_equal(mm, np.rint(arr[0] * 255.0 / 4095).astype(np.uint8))
    inv = load_clip(_mono_ds(arr, "MONOCHROME1", 12)).frames[0, 0, :, 0]
    np.testing.assert_array_equal(inv, 255 - mm)
    eight = load_clip(_mono_ds(np.array([[0, 7, 200]], np.uint8), "MONOCHROME2", 8)).frames[0, 0]
    np.testing.assert_array_equal(eight, [[0, 0, 0], [7, 7, 7], [200, 200, 200]])


# --------------------------------------------------------------------------- errors


def test_not_dicom_and_truncated(tmp_path):
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"\x00" * 64 + b"not dicom at all" * 20)
    with pytest.raises(FrameDecodeError):
        load_clip(junk)
    src = MF / "pydicom__examples_ybr_color.dcm"
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    with pytest.raises(FrameDecodeError):
        load_clip(cut)
    # damaged headers make pydicom raise struct.error / BytesLengthException: still a FrameDecodeError
    blob = (MF / "dbdicom__UltrasoundPaletteColor_0020.dcm").read_bytes()
    for n in (143, 154):
        cut.write_bytes(blob[:n])
        with pytest.raises(FrameDecodeError):
            load_clip(cut)
        with pytest.raises(FrameDecodeError):
            count_frames(cut)
    with pytest.raises(FrameDecodeError) as ei:
        load_clip(tmp_path / "missing.dcm")
    assert "not found" in ei.value.reason


# --------------------------------------------------------------------------- video


def test_avi_reading(echoclip_data):
    import cv2

    path = echoclip_data / "example_video.avi"
    assert count_frames(path) == 113
    clip = load_clip(path)
    assert clip.source == "video"
    assert clip.frames.shape == (113, 224, 224, 3) and clip.frames.dtype == np.uint8
    assert clip.n_frames == 113 and clip.indices == list(range(113))
    assert clip.frame_time_ms and clip.frame_time_ms > 0
    cap = cv2.VideoCapture(str(path))
    for _ in range(10):
        cap.read()
    ok, bgr = cap.read()
    cap.release()
    assert ok
    np.testing.assert_array_equal(clip.frames[10], bgr[..., ::-1])  # RGB, not BGR
    idx = list(range(0, 40, 2))
    sel = load_clip(path, idx)
    np.testing.assert_array_equal(sel.frames, clip.frames[idx])
    gen = load_clip(path, (i for i in idx))  # a one-shot iterator works too
    assert gen.indices == idx
    with pytest.raises(IndexError):
        load_clip(path, [113])


# --------------------------------------------------------------------------- masking


def _synthetic_echo(t=8, h=200, w=240, seed=0):
    """A speckled fan that changes every frame, static burned-in text, a moving ECG dot."""
    import cv2

    rng = np.random.default_rng(seed)
    frames = np.zeros((t, h, w, 3), np.uint8)
    fan = np.zeros((h, w), np.uint8)
    cv2.ellipse(fan, (w // 2, 10), (150, 150), 0, 50, 130, 1, -1)
    for k in range(t):
        speckle = rng.integers(20, 220, size=(h, w), dtype=np.uint8)
        frames[k][fan.astype(bool)] = speckle[fan.astype(bool), None]
        cv2.putText(frames[k], "HR 61 bpm", (2, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1)
        frames[k, h - 12 : h - 10, 5 + 20 * k : 9 + 20 * k] = 200  # ECG sweep
    return frames, fan.astype(bool)


def test_sector_mask_from_content():
    frames, fan = _synthetic_echo()
    m = sector_mask(frames)
    assert m.shape == fan.shape and m.dtype == bool
    assert np.mean(m[fan]) > 0.97  # keeps the sector
    assert not m[:25, :100].any()  # text blanked
    assert not m[-14:, :].any()  # ECG trace blanked
    masked = apply_mask(frames, m)
    assert masked[:, ~m].max() == 0
    np.testing.assert_array_equal(masked[:, m], frames[:, m])


def test_sector_mask_uses_us_regions_and_load_clip_option():
    path = MF / "fo-dicom__DIRW0007.dcm"  # 2D region x 27..548, y 48..391, text inside it
    idx = list(range(0, 40, 2))
    plain = load_clip(path, idx)
    clip = load_clip(path, idx, sector_mask=True)
    m = clip.mask
    assert m is not None and m.shape == (456, 576)
    assert not m[:48].any() and not m[392:].any() and not m[:, 549:].any()
    assert 0.15 < m.mean() < 0.5
    assert not m[60:200, 450:548].any()  # the text column right of the fan
    assert m[300, 288]  # the heart
    assert clip.frames[:, ~m].max() == 0
    np.testing.assert_array_equal(clip.frames[:, m], plain.frames[:, m])


def test_sector_mask_on_video_and_out_of_image_regions(echoclip_data):
    m = sector_mask(load_clip(echoclip_data / "example_video.avi", range(0, 40, 2)).frames)
    assert 0.3 < m.mean() < 0.9 and not m[0, 0] and m[112, 112]
    # examples_ybr_color was downscaled without updating its US regions: content is used.
    path = MF / "pydicom__examples_ybr_color.dcm"
    ds = _read(path)
    assert fr._region_mask(ds, ds.Rows, ds.Columns) is None
    clip = load_clip(path, range(0, 30, 2), sector_mask=True)
    assert 0.1 < clip.mask.mean() < 0.6


def test_large_native_clip_reads_only_requested_frames_from_file(tmp_path):
    """A native multi-frame file above the defer threshold is not loaded whole: the
    requested frames are read from the file, and equal the frames of a full decode."""
    src = _read(MF / "dicomParser__IM00001.implicit_little_endian.dcm")  # 8 x 240 x 320 RGB
    base = np.frombuffer(src.PixelData, np.uint8).reshape(8, 240, 320, 3)
    big = np.concatenate([np.roll(base, k, axis=2) for k in range(20)])  # 160 frames, 37 MB
    src.PixelData = big.tobytes()
    src.NumberOfFrames = len(big)
    out = tmp_path / "big_native.dcm"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the source's misspelt character set
        src.save_as(out)
    ds = fr._read_dataset(out, pixels=True)
    assert fr._native_file_source(ds, str(ds.file_meta.TransferSyntaxUID)) is not None
    idx = [159, 0, 77]
    clip = load_clip(out, idx)
    np.testing.assert_array_equal(clip.frames, big[idx])
    assert clip.n_frames == 160
    # Pixel Data stays deferred when decoding through a Dataset read by us as well.
    clip2 = load_clip(ds, [5])
    np.testing.assert_array_equal(clip2.frames[0], big[5])
    assert ds.get_item("PixelData", keep_deferred=True).value is None


def test_ybr_partial_to_rgb():
    """PS3.3 C.7.6.3.1.2: Y = 16 + .2568R + .5041G + .0979B, Cb = 128 - .1482R - .2910G + .4392B,
    Cr = 128 + .4392R - .3678G - .0714B; the inverse must give the colours back."""
    rgb = np.array([[[0, 0, 0], [255, 255, 255], [200, 30, 40], [20, 60, 220], [128, 128, 128]]], float)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    ybr = np.stack(
        [
            16 + 0.2568 * r + 0.5041 * g + 0.0979 * b,
            128 - 0.1482 * r - 0.2910 * g + 0.4392 * b,
            128 + 0.4392 * r - 0.3678 * g - 0.0714 * b,
        ],
        axis=-1,
    )
    stack = np.rint(ybr).astype(np.uint8)[None]
    from pydicom.dataset import Dataset

    out = fr._to_rgb(stack, Dataset(), "YBR_PARTIAL_420")
    assert np.abs(out[0].astype(int) - rgb.astype(int)).max() <= 2


# --------------------------------------------------------------------------- hostile headers
#
# Each case takes a real clip, breaks one header attribute the way a half-broken scanner or
# an attacker might, writes it to disk and decodes it: the result is always FrameDecodeError
# (a ValueError) whose message names the attribute, never another exception type, and
# nothing is allocated from the claimed sizes.

NATIVE_RGB = MF / "dicomParser__IM00001.implicit_little_endian.dcm"  # 8 x 240 x 320 RGB, native
JPEG_CLIP = MF / "pydicom__examples_ybr_color.dcm"                     # 30 frames, JPEG baseline
PALETTE = MF / "dcm4che__US-PAL-8-10x-echo.dcm"                         # RLE palette, 16-bit LUT
SEGMENTED = SF / "pydicom-data__gdcm-US-ALOKA-16.dcm"                   # segmented 16-bit LUT


class _Text(str):
    """A value written as text whatever the attribute's VR."""


def _broken(tmp_path, src, name="broken.dcm", **attrs):
    """``src`` with ``attrs`` set as given (invalid values included), saved as a file."""
    from pydicom import config
    from pydicom.dataelem import DataElement
    from pydicom.datadict import tag_for_keyword

    ds = _read(src)
    old = config.settings.writing_validation_mode
    config.settings.writing_validation_mode = config.IGNORE
    try:
        for kw, value in attrs.items():
            if value is None:
                del ds[kw]
                continue
            tag = tag_for_keyword(kw)
            if isinstance(value, _Text):  # text where a number belongs: read back as the
                # dictionary VR (implicit VR files) or as LO (explicit VR), as a peer might send it
                ds[tag] = DataElement(tag, "LO", str(value))
            else:
                setattr(ds, kw, value)
        out = tmp_path / name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds.save_as(out, enforce_file_format=False)
    finally:
        config.settings.writing_validation_mode = old
    return out


def _mono16_file(tmp_path, **attrs):
    arr = np.arange(64, dtype=np.uint16).reshape(8, 8) * 60
    ds = _mono_ds(arr, "MONOCHROME2", 12, WindowCenter=2048, WindowWidth=4096)
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.6.1", "1.2.3.4"
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, "1.2.3.4"
    src = tmp_path / "mono16.dcm"
    ds.save_as(src, enforce_file_format=True)
    return _broken(tmp_path, src, **attrs)


def _decode_error(path, indices=None) -> str:
    with pytest.raises(FrameDecodeError) as ei:
        load_clip(path, indices)
    assert isinstance(ei.value, ValueError) and ei.value.reason
    return str(ei.value)


@pytest.mark.parametrize("attrs,named", [
    ({"WindowWidth": _Text("wide")}, "WindowWidth"),
    ({"WindowCenter": _Text("1e999")}, "WindowCenter"),
    ({"RescaleSlope": _Text("abc")}, "RescaleSlope"),
    ({"BitsStored": 40}, "BitsStored"),
    ({"HighBit": 99}, "HighBit"),
])
def test_malformed_monochrome_header(tmp_path, attrs, named):
    assert load_clip(_mono16_file(tmp_path)).frames.shape == (1, 8, 8, 3)  # the unbroken one decodes
    assert named in _decode_error(_mono16_file(tmp_path, **attrs))


@pytest.mark.parametrize("src,attrs,named", [
    (NATIVE_RGB, {"Rows": 480}, "NumberOfFrames 8 x Rows 480"),           # pixel data too short
    (NATIVE_RGB, {"Columns": 0}, "Columns"),
    (NATIVE_RGB, {"Rows": None}, "Rows is missing"),
    (NATIVE_RGB, {"NumberOfFrames": 1_000_000_000}, "NumberOfFrames 1000000000"),
    (NATIVE_RGB, {"NumberOfFrames": _Text("many")}, "NumberOfFrames"),
    (NATIVE_RGB, {"NumberOfFrames": _Text("-3")}, "NumberOfFrames"),
    (NATIVE_RGB, {"BitsAllocated": 7}, "BitsAllocated 7"),
    (NATIVE_RGB, {"BitsAllocated": 0}, "BitsAllocated 0"),
    (NATIVE_RGB, {"BitsAllocated": 64}, "BitsAllocated 64"),
    (NATIVE_RGB, {"SamplesPerPixel": 9}, "SamplesPerPixel 9"),
    (NATIVE_RGB, {"PixelRepresentation": 5}, "PixelRepresentation"),
    (NATIVE_RGB, {"PlanarConfiguration": 7}, "PlanarConfiguration"),
    (NATIVE_RGB, {"PhotometricInterpretation": "FOO"}, "Photometric Interpretation"),
    (JPEG_CLIP, {"NumberOfFrames": 1_000_000}, "NumberOfFrames 1000000 but the encapsulated"),
    (JPEG_CLIP, {"Rows": 65535, "Columns": 65535}, "bytes per frame"),
    (JPEG_CLIP, {"Rows": 480}, "could not be decoded"),                    # decoder disagrees
    (PALETTE, {"RedPaletteColorLookupTableDescriptor": 256}, "RedPaletteColorLookupTableDescriptor has 1 value"),
    (PALETTE, {"GreenPaletteColorLookupTableDescriptor": [256, 0, 12]}, "GreenPaletteColorLookupTableDescriptor"),
    (PALETTE, {"BluePaletteColorLookupTableData": b"\x01\x02"}, "palette"),
    (PALETTE, {"RedPaletteColorLookupTableDescriptor": None}, "RedPaletteColorLookupTableDescriptor"),
])
def test_malformed_pixel_header(tmp_path, src, attrs, named):
    assert load_clip(src, [0]).frames.shape[0] == 1        # the unbroken source decodes
    assert named in _decode_error(_broken(tmp_path, src, **attrs), [0])


def test_segmented_lut_that_expands_without_bound_is_refused(tmp_path):
    """A segmented LUT of a few hundred bytes whose linear segments expand to millions of entries
    (and an indirect segment pointing at itself) is refused before it is expanded."""
    first = [0, 1, 0]                                    # discrete segment: one entry, value 0
    linear = [1, 65535, 65535] * 100                     # 100 x 65535 entries from 600 words
    blob = np.array(first + linear, "<u2").tobytes()
    path = _broken(tmp_path, SEGMENTED, SegmentedRedPaletteColorLookupTableData=blob)
    assert "expands beyond 65536" in _decode_error(path)
    loop = np.array(first + [2, 65535, 0, 0], "<u2").tobytes()   # indirect: repeat from the start
    path = _broken(tmp_path, SEGMENTED, name="loop.dcm", SegmentedGreenPaletteColorLookupTableData=loop)
    assert "segmented palette LUT" in _decode_error(path)


def test_claimed_frames_allocate_nothing(tmp_path):
    """A native clip whose header claims 10^6 frames (and one claiming 65535 x 65535 frames of
    JPEG) fails in milliseconds with a small peak: nothing is sized from the claim."""
    import time
    import tracemalloc

    native = _broken(tmp_path, NATIVE_RGB, NumberOfFrames=1_000_000)
    jpeg = _broken(tmp_path, JPEG_CLIP, name="j.dcm", NumberOfFrames=1_000_000)
    for path in (native, jpeg):                              # callers size index lists from it
        with pytest.raises(FrameDecodeError, match="NumberOfFrames 1000000 cannot fit in a file"):
            count_frames(path)
    assert count_frames(_broken(tmp_path, NATIVE_RGB, name="n.dcm", NumberOfFrames=200_000)) == 200_000
    for path in (native, jpeg):
        tracemalloc.start()
        t0 = time.perf_counter()
        try:
            for indices in (None, [0]):
                _decode_error(path, indices)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 16 * 1024 * 1024, (path.name, peak)   # the file itself is ≤ 1.8 MB
        assert time.perf_counter() - t0 < 5


def test_truncated_deferred_native_pixel_data(tmp_path):
    """A native clip above the defer threshold, cut short inside its Pixel Data: the frames the
    header claims are checked against the bytes in the file, not against the element length."""
    src = _read(NATIVE_RGB)
    base = np.frombuffer(src.PixelData, np.uint8).reshape(8, 240, 320, 3)
    src.PixelData = np.concatenate([base] * 3).tobytes()     # 24 frames, 5.5 MB > 4 MB deferred
    src.NumberOfFrames = 24
    full = tmp_path / "full.dcm"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        src.save_as(full)
    assert load_clip(full, [23]).frames.shape == (1, 240, 320, 3)
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size - 240 * 320 * 3 * 2])
    assert "NumberOfFrames 24" in _decode_error(cut, [0])


def test_dataset_input_gets_the_same_checks(tmp_path):
    ds = _read(_broken(tmp_path, NATIVE_RGB, NumberOfFrames=50))
    with pytest.raises(FrameDecodeError, match="NumberOfFrames 50"):
        load_clip(ds, [0])


def test_jpegxl_frame_count_checked_before_the_decoder(tmp_path):
    """JPEG XL, which pydicom does not know as a transfer syntax, gets the fragment check too
    (whether or not a JPEG XL decoder is installed)."""
    blob = (MF / "dcm4che__will-jxl.dcm").read_bytes()   # pydicom will not write this syntax: patch
    at = blob.index(b"\x28\x00\x08\x00IS")                 # (0028,0008) IS, explicit VR little endian
    old_len = int.from_bytes(blob[at + 6:at + 8], "little")
    value = b"1000000 "
    path = tmp_path / "jxl.dcm"
    path.write_bytes(blob[:at + 6] + len(value).to_bytes(2, "little") + value + blob[at + 8 + old_len:])
    assert "NumberOfFrames 1000000 but the encapsulated" in _decode_error(path, [0])


def test_compressed_frames_cannot_claim_a_decompression_bomb(tmp_path):
    """30 JPEG frames of 220 KB claiming 4096 x 4096 RGB each (1.5 GB decoded): asking for all
    of them is refused before decoding; one frame is tried, and the decoder's disagreement is
    the error. The peak stays small either way."""
    import tracemalloc

    path = _broken(tmp_path, JPEG_CLIP, Rows=4096, Columns=4096)
    tracemalloc.start()
    try:
        assert "more than 1000:1" in _decode_error(path)
        _decode_error(path, [0])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024 * 1024 + 16 * 1024 * 1024, peak
