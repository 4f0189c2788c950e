"""Synthetic apical-4-chamber echo clips with known truth ("phantoms").

A phantom is a B-mode cine loop that looks and moves like an apical 4-chamber view:
an ultrasound sector with speckle, near-field haze and depth-dependent gain; four
chambers (LV on the screen's right, RV left, atria in the far field) with myocardium,
septa, pericardium and valves; an ECG trace with a time cursor; and a cardiac cycle at
the given heart rate in which the LV cavity volume falls by the given LVEF.

The truth labels drive what is seen:

* chamber dilation grades 0-3 (normal/mild/moderate/severe) per chamber scale the
  chamber; LVEF sets the systolic volume change (and, as in dilated cardiomyopathy,
  a low EF tends to come with a dilated LV);
* LV hypertrophy grade 0-3 thickens the LV walls and septum;
* pericardial effusion grade 0-3 opens an echo-free space between the myocardium
  and a bright pericardium; tamponade adds diastolic RV and RA wall collapse;
* devices: a pacer/ICD lead (a bright line through the RA and the tricuspid valve
  to the RV apex), MitraClip (a bright mass on the mitral leaflet tips that tethers
  them), an Impella catheter (a tube with a pigtail across the LV towards the
  outflow), a TAVR stent (a bright lattice at the crux);
* PASP is a latent variable: RV and RA size, RV wall thickness and RV function follow it.

Everything is numpy, vectorised per frame and deterministic from a seed: a 40-frame
256x256 clip renders in well under a second on one CPU core. Each clip comes with a
report in the Cedars template phrasing (phrases of ``template_vocab.txt`` and the
exact zero-shot prompt sentences), so both tokenizers see realistic text.

:func:`generate_dataset` writes the clips as real Ultrasound Multi-frame DICOM the way
echo carts write them (JPEG baseline, YBR_FULL_422, frame time, apical-4-chamber view
code) plus a ``manifest.csv`` with the report, patient, study date, split and truth.
Patients can have several studies months apart with a procedure in between (a device
appears, the EF changes), for longitudinal work.

This module never imports torch; pydicom and Pillow are imported only by the writer.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as _dt
import hashlib
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

__all__ = [
    "PhantomTruth", "PhantomClip", "TRUTH_COLUMNS", "MANIFEST_COLUMNS", "SEVERITY",
    "sample_truth", "render_clip", "make_report", "make_clip", "write_dicom",
    "generate_dataset", "A4C_VIEW_CODE",
]

SEVERITY = ("NORMAL", "MILD", "MODERATE", "SEVERE")
EFFUSION_WORDS = ("NONE", "SMALL", "MODERATE", "LARGE")
#: SNOMED CT "Apical four chamber" (CID 12226), research/dicom-anchors.md §5.
A4C_VIEW_CODE = ("399214001", "SCT", "Apical four chamber")
US_MULTIFRAME_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.3.1"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"


# --------------------------------------------------------------------------- truth

@dataclass
class PhantomTruth:
    """What a phantom clip shows. Grades are 0 normal/none, 1 mild/small, 2 moderate, 3 severe/large."""

    lvef: float = 60.0                 # percent
    heart_rate: float = 70.0           # beats per minute
    pasp: float = 28.0                 # PA systolic pressure, mmHg (latent)
    lv_dilation: int = 0
    rv_dilation: int = 0
    la_dilation: int = 0
    ra_dilation: int = 0
    lv_hypertrophy: int = 0
    pericardial_effusion: int = 0      # 0 none, 1 small, 2 moderate, 3 large
    tamponade: bool = False
    pacemaker: bool = False
    mitraclip: int = 0                 # number of clips (0, 1, 2)
    impella: bool = False
    tavr: bool = False

    def as_row(self) -> dict:
        d = dataclasses.asdict(self)
        d["lvef"] = round(float(self.lvef), 1)
        d["heart_rate"] = round(float(self.heart_rate), 1)
        d["pasp"] = round(float(self.pasp), 1)
        for k in ("tamponade", "pacemaker", "impella", "tavr"):
            d[k] = int(bool(d[k]))
        return d

    @classmethod
    def from_row(cls, row: dict) -> "PhantomTruth":
        kw = {}
        for f in dataclasses.fields(cls):
            if f.name not in row or row[f.name] in ("", None):
                continue
            v = row[f.name]
            if f.type in ("float", float):
                kw[f.name] = float(v)
            elif f.type in ("bool", bool):
                kw[f.name] = bool(int(float(v)))
            else:
                kw[f.name] = int(float(v))
        return cls(**kw)


TRUTH_COLUMNS = tuple(f.name for f in dataclasses.fields(PhantomTruth))
MANIFEST_COLUMNS = ("path", "report", "patient_id", "study_date", "split", "study_uid",
                    "series_uid", "sop_uid", "procedure") + TRUTH_COLUMNS


def _grade(x: float) -> int:
    return int(min(3, max(0, round(x))))


def sample_truth(rng: np.random.Generator, **overrides) -> PhantomTruth:
    """Draw a plausible patient: correlated the way echo findings are, with enough
    positives of every device and grade to measure AUCs on a few hundred clips."""
    impella = bool(rng.random() < 0.08)
    if impella:  # cardiogenic shock
        lvef = rng.uniform(12, 32)
    elif rng.random() < 0.55:
        lvef = float(np.clip(rng.normal(61, 6), 50, 78))
    else:
        lvef = rng.uniform(12, 50)
    heart_rate = float(np.clip(rng.normal(74, 14), 45, 125))
    # PASP latent: right-heart signs follow it
    pasp = float(np.clip(18 + rng.gamma(2.0, 9.0) + max(0.0, 45 - lvef) * 0.25, 15, 95))
    lv_dil = _grade((60 - lvef) / 13 + rng.normal(0, 0.7)) if rng.random() < 0.85 else int(rng.integers(0, 4))
    rv_dil = _grade((pasp - 32) / 13 + rng.normal(0, 0.5))
    ra_dil = _grade((pasp - 32) / 15 + rng.normal(0, 0.6))
    mitraclip = 0
    if rng.random() < 0.15:
        mitraclip = 2 if rng.random() < 0.6 else 1
    la_dil = _grade(0.8 * (mitraclip > 0) + (55 - lvef) / 25 + rng.normal(0.2, 0.7))
    tavr = bool(rng.random() < 0.15)
    lvh_p = [0.62, 0.16, 0.13, 0.09] if not tavr else [0.3, 0.25, 0.25, 0.2]
    lvh = int(rng.choice(4, p=lvh_p))
    eff = int(rng.choice(4, p=[0.6, 0.15, 0.13, 0.12]))
    tamponade = bool(eff >= 2 and rng.random() < 0.4)
    truth = PhantomTruth(
        lvef=round(float(lvef)), heart_rate=round(heart_rate), pasp=round(pasp),
        lv_dilation=lv_dil, rv_dilation=rv_dil, la_dilation=la_dil, ra_dilation=ra_dil,
        lv_hypertrophy=lvh, pericardial_effusion=eff, tamponade=tamponade,
        pacemaker=bool(rng.random() < 0.25), mitraclip=mitraclip, impella=impella, tavr=tavr)
    for k, v in overrides.items():
        if not hasattr(truth, k):
            raise ValueError(f"unknown phantom truth field {k!r}; known: {', '.join(TRUTH_COLUMNS)}")
        setattr(truth, k, v)
    return truth


# --------------------------------------------------------------------------- rendering

def _cycle(phase: np.ndarray) -> np.ndarray:
    """Ventricular contraction 0 (end-diastole) .. 1 (end-systole) over one beat."""
    p = np.mod(phase, 1.0)
    s = np.zeros_like(p)
    m = p < 0.35
    s[m] = np.sin(0.5 * np.pi * p[m] / 0.35) ** 2
    m = (p >= 0.35) & (p < 0.6)
    s[m] = np.cos(0.5 * np.pi * (p[m] - 0.35) / 0.25) ** 2
    m = p >= 0.88  # atrial kick: a small extra filling, seen as slight expansion
    s[m] = -0.06 * np.sin(np.pi * (p[m] - 0.88) / 0.12)
    return s


class _Canvas:
    """A frame's echogenicity map with cheap drawing primitives on bounding boxes."""

    def __init__(self, X: np.ndarray, Y: np.ndarray, E: np.ndarray, px: float):
        self.X, self.Y, self.E, self.px = X, Y, E, px  # px = normalised units per pixel
        self.H, self.W = E.shape

    def _box(self, x0, x1, y0, y1):
        W, H = self.W, self.H
        c0 = max(0, int((x0 / self.px) + W / 2) - 1)
        c1 = min(W, int((x1 / self.px) + W / 2) + 2)
        r0 = max(0, int(y0 / self.px) - 1)
        r1 = min(H, int(y1 / self.px) + 2)
        return slice(r0, r1), slice(c0, c1)

    def segment(self, p0, p1, width: float, value: float, mode: str = "max") -> None:
        (ax, ay), (bx, by) = p0, p1
        pad = width * 1.5
        rs, cs = self._box(min(ax, bx) - pad, max(ax, bx) + pad, min(ay, by) - pad, max(ay, by) + pad)
        if rs.start >= rs.stop or cs.start >= cs.stop:
            return
        X, Y = self.X[rs, cs], self.Y[rs, cs]
        dx, dy = bx - ax, by - ay
        L2 = dx * dx + dy * dy + 1e-12
        t = np.clip(((X - ax) * dx + (Y - ay) * dy) / L2, 0.0, 1.0)
        d = np.hypot(X - ax - t * dx, Y - ay - t * dy)
        a = np.clip(1.0 - d / width, 0.0, 1.0)  # soft profile
        sub = self.E[rs, cs]
        if mode == "max":
            np.maximum(sub, a * value, out=sub)
        else:  # "set": blend towards value
            sub[...] = sub * (1 - a) + a * value

    def polyline(self, pts, width, value, mode="max"):
        for p0, p1 in zip(pts[:-1], pts[1:]):
            self.segment(p0, p1, width, value, mode)

    def blob(self, cx, cy, ax, ay, value, mode="max"):
        rs, cs = self._box(cx - ax * 1.3, cx + ax * 1.3, cy - ay * 1.3, cy + ay * 1.3)
        X, Y = self.X[rs, cs], self.Y[rs, cs]
        f = ((X - cx) / ax) ** 2 + ((Y - cy) / ay) ** 2
        a = np.clip(1.6 * (1.0 - f), 0.0, 1.0)
        sub = self.E[rs, cs]
        if mode == "max":
            np.maximum(sub, a * value, out=sub)
        else:
            sub[...] = sub * (1 - a) + a * value


def _radial_distance(X, Y, cx, cy, ax, ay, angle=0.0):
    """Signed distance (along the ray from the centre) from an ellipse whose ``ay`` axis
    is turned by ``angle`` radians from the depth direction towards +x."""
    u, v = X - cx, Y - cy
    if angle:
        c, s_ = math.cos(angle), math.sin(angle)
        u, v = u * c - v * s_, u * s_ + v * c
    r = np.hypot(u, v) + 1e-9
    f = np.sqrt((u / ax) ** 2 + (v / ay) ** 2) + 1e-9
    return r * (1.0 - 1.0 / f)


def render_clip(truth: PhantomTruth, *, n_frames: int = 40, rows: int = 256, cols: int = 256,
                frame_time_ms: float = 1000.0 / 30, seed: int = 0, ecg: bool = True,
                anatomy_seed: Optional[int] = None) -> np.ndarray:
    """Render a phantom A4C cine loop: uint8 RGB array (n_frames, rows, cols, 3).

    ``anatomy_seed`` fixes the patient's own anatomy (chamber proportions, septum
    position, sector set-up) across studies; ``seed`` drives speckle and cycle phase.
    """
    rng = np.random.default_rng(seed)
    arng = np.random.default_rng(anatomy_seed) if anatomy_seed is not None else rng
    H, W = int(rows), int(cols)
    px = 1.0 / H  # normalised units (depth 0..1) per pixel, isotropic
    xs = (np.arange(W) - W / 2 + 0.5) * px
    ys = (np.arange(H) + 0.5) * px
    X, Y = np.meshgrid(xs.astype(np.float32), ys.astype(np.float32))

    # --- sector geometry (apex at the top centre)
    apex_y = 0.03
    half_angle = math.radians(arng.uniform(36, 41))
    depth = arng.uniform(0.80, 0.84)
    R = np.hypot(X, Y - apex_y)
    TH = np.arctan2(X, Y - apex_y)
    sector = np.clip((half_angle - np.abs(TH)) / 0.012, 0, 1) * np.clip((depth - R) / 0.006, 0, 1)
    sector *= (Y > apex_y)

    # --- per-patient anatomy (normalised units), small random variation
    j = lambda s: arng.normal(0, s)
    tilt = j(0.015)
    lv_scale = 1.0 + 0.14 * truth.lv_dilation
    rv_scale = 1.0 + 0.16 * truth.rv_dilation
    la_scale = 1.0 + 0.16 * truth.la_dilation
    ra_scale = 1.0 + 0.16 * truth.ra_dilation
    lv_wall = 0.036 * (1.0 + 0.4 * truth.lv_hypertrophy) * (1 + j(0.05))
    rv_wall = 0.018 * (1.0 + 0.35 * max(0.0, (truth.pasp - 35) / 20)) * (1 + j(0.05))
    atrial_wall = 0.014
    eff_w = (0.0, 0.022, 0.038, 0.060)[truth.pericardial_effusion] * (1 + j(0.08)) if truth.pericardial_effusion else 0.0
    peri_w = 0.011
    ef = float(np.clip(truth.lvef, 5, 90)) / 100.0
    rv_ef = float(np.clip(0.52 - max(0.0, truth.pasp - 40) * 0.006 + j(0.03), 0.2, 0.65))
    av_y0 = 0.55 + j(0.01)                      # AV plane at end-diastole (depth)
    lv_apex = 0.13 + j(0.008)
    septum_x = 0.005 + j(0.006) + tilt
    lv_halfw_ed = 0.088 * lv_scale * (1 + j(0.04))
    rv_halfw_ed = 0.062 * rv_scale * (1 + j(0.04))
    la_half = (0.078 * la_scale, 0.080 * la_scale)
    ra_half = (0.066 * ra_scale, 0.074 * ra_scale)

    # --- timing
    hr = float(truth.heart_rate)
    t = np.arange(n_frames) * frame_time_ms / 1000.0
    phase0 = rng.random()
    phase = phase0 + t * hr / 60.0
    s_lv = _cycle(phase)
    s_rv = _cycle(phase - 0.02)
    p_mod = np.mod(phase, 1.0)

    # --- static speckle field (tissue texture) and per-frame decorrelating speckle
    def rayleigh(shape):
        g = rng.standard_normal((2,) + shape, dtype=np.float32)
        # lateral correlation: speckle grains are wider than tall
        g = (g + np.roll(g, 1, axis=-1) + np.roll(g, -1, axis=-1)) / 3.0
        return np.hypot(g[0], g[1]) * 1.7
    speck0 = rayleigh((H, W))
    backdrop = 0.16 + 0.10 * (np.sin(X * arng.uniform(15, 30) + arng.uniform(0, 6)) * np.sin(Y * arng.uniform(12, 24) + arng.uniform(0, 6)))
    backdrop = backdrop.astype(np.float32)
    gain = (1.05 - 0.45 * np.clip((R - 0.1) / 0.8, 0, 1)) * rng.uniform(0.9, 1.1)  # attenuation after TGC
    haze = 0.35 * np.exp(-(R / 0.07)) * (Y > apex_y)
    # per-frame decorrelating speckle: windows at random offsets into a small noise bank
    # (much cheaper than drawing T fresh fields)
    PAD = 24
    bank = rayleigh((4, H + PAD, W + PAD))
    noise_offs = rng.integers(0, PAD, size=(n_frames, 3))
    # chamber distance fields on a half-resolution grid (nearest upsampling), 4x cheaper
    Xh, Yh = X[::2, ::2], Y[::2, ::2]

    def up(a):
        return np.repeat(np.repeat(a, 2, axis=0), 2, axis=1)[:H, :W]

    frames = np.empty((n_frames, H, W, 3), dtype=np.uint8)
    sway = 0.006 * np.sin(2 * np.pi * phase + rng.uniform(0, 6))

    for k in range(n_frames):
        s = float(s_lv[k])
        sr = float(s_rv[k])
        dx = float(sway[k]) * 0.5
        dyy = float(sway[k])
        # LV volume fraction -> linear scale (prolate ellipsoid ~ L^3)
        v_lv = 1.0 - ef * s
        g_lv = max(v_lv, 0.05) ** (1.0 / 3.0)
        v_rv = 1.0 - rv_ef * sr
        g_rv = max(v_rv, 0.05) ** (1.0 / 3.0)
        # AV plane descends towards the apex in systole (longitudinal shortening)
        av_y = av_y0 - 0.5 * (1 - g_lv) * (av_y0 - lv_apex) * 0.8 + dyy
        lv_hw = lv_halfw_ed * (0.55 + 0.45 * g_lv) * (g_lv ** 0.5)
        lv_base_x = septum_x + lv_wall * 0.5 + lv_hw + dx
        lv_tip = (septum_x + lv_wall * 0.5 + 0.022 + dx, lv_apex + dyy * 0.3)
        lv_len = math.hypot(lv_base_x - lv_tip[0], av_y - lv_tip[1]) * lv_scale ** 0.15
        lv_ang = math.atan2(lv_base_x - lv_tip[0], av_y - lv_tip[1])
        lv_cx = lv_tip[0] + math.sin(lv_ang) * lv_len / 2
        lv_cy = lv_tip[1] + math.cos(lv_ang) * lv_len / 2
        rv_hw = rv_halfw_ed * g_rv
        # tamponade: RV free wall collapses in early diastole, RA in late diastole
        if truth.tamponade:
            if 0.38 < p_mod[k] < 0.7:
                rv_hw *= 1.0 - 0.45 * math.sin(math.pi * (p_mod[k] - 0.38) / 0.32)
        rv_base_x = septum_x - rv_wall * 0.5 - rv_hw + dx
        rv_tip = (septum_x - rv_wall * 0.5 - 0.018 + dx, lv_apex + 0.07 + dyy * 0.3)
        rv_len = math.hypot(rv_base_x - rv_tip[0], av_y + 0.01 - rv_tip[1]) * rv_scale ** 0.15
        rv_ang = math.atan2(rv_base_x - rv_tip[0], av_y + 0.01 - rv_tip[1])
        rv_cx = rv_tip[0] + math.sin(rv_ang) * rv_len / 2
        rv_cy = rv_tip[1] + math.cos(rv_ang) * rv_len / 2
        # atria fill while the ventricles contract
        a_fill = 1.0 + 0.12 * max(s, 0.0)
        la_hw, la_hh = la_half[0] * a_fill ** 0.5, la_half[1] * a_fill ** 0.5
        ra_hw, ra_hh = ra_half[0] * a_fill ** 0.5, ra_half[1] * a_fill ** 0.5
        if truth.tamponade and (p_mod[k] > 0.82 or p_mod[k] < 0.12):
            ra_hw *= 0.6
        la_cx = septum_x + atrial_wall * 0.5 + la_hw + dx
        la_cy = av_y + la_hh * 0.92
        ra_cx = septum_x - atrial_wall * 0.5 - ra_hw + dx
        ra_cy = av_y + ra_hh * 0.92 + 0.01

        chambers = (
            (lv_cx, lv_cy, lv_hw, lv_len / 2, lv_wall * (1 + 0.5 * ef * s), lv_ang),
            (rv_cx, rv_cy, rv_hw, rv_len / 2, rv_wall * (1 + 0.3 * sr), rv_ang),
            (la_cx, la_cy, la_hw, la_hh, atrial_wall, 0.0),
            (ra_cx, ra_cy, ra_hw, ra_hh, atrial_wall, 0.0),
        )
        d_blood = None
        d_shell = None
        for cx, cy, ax, ay, wall, an in chambers:
            d = _radial_distance(Xh, Yh, cx, cy, ax, ay, an)
            d_blood = d if d_blood is None else np.minimum(d_blood, d)
            sh = d - wall
            d_shell = sh if d_shell is None else np.minimum(d_shell, sh)

        d_blood, d_shell = up(d_blood), up(d_shell)
        E = backdrop.copy()
        tissue = d_shell < 0
        E[tissue] = 0.42
        if eff_w > 0:
            E[(d_shell >= 0) & (d_shell < eff_w)] = 0.015
        peri = (d_shell >= eff_w) & (d_shell < eff_w + peri_w)
        E[peri] = 0.9
        E[d_blood < 0] = 0.02
        cv = _Canvas(X, Y, E, px)
        # interventricular and interatrial septum: muscle between the cavities
        sw = (lv_wall * (1 + 0.5 * ef * s) + rv_wall) / 2
        cv.segment((septum_x + dx, lv_apex + 0.03), (septum_x + dx, av_y - 0.01), sw, 0.42, mode="set")
        cv.segment((septum_x + dx, av_y + 0.03), (septum_x + dx, av_y + 0.1), atrial_wall * 0.8, 0.42, mode="set")

        tip_l, tip_r, tv_l, tv_r = _draw_valves(cv, truth, s=s, sr=sr, p=float(p_mod[k]), x0=septum_x + dx, av_y=av_y,
                                                lv_hw=lv_hw, rv_hw=rv_hw, lv_scale=lv_scale)
        _draw_devices(cv, truth, tip_l=tip_l, tip_r=tip_r, tv_l=tv_l, tv_r=tv_r, rv_tip=rv_tip, lv_tip=lv_tip,
                      ra=(ra_cx, ra_cy, ra_hw, ra_hh), rv=(rv_cx, rv_cy, rv_hw), x0=septum_x + dx, av_y=av_y)

        # --- image formation: speckle, gain, haze, log compression, sector
        nb, oy, ox = noise_offs[k]
        nk = bank[nb % 4, oy:oy + H, ox:ox + W]
        sp = 0.7 * speck0 + 0.3 * nk
        I = (E * sp + haze) * gain + 0.015 * nk
        I = np.clip(I, 0.0, 1.2) / 1.2
        img = (255.0 * np.sqrt(I) * sector).astype(np.uint8)
        frames[k, :, :, 0] = img
        frames[k, :, :, 1] = img
        frames[k, :, :, 2] = img

    if ecg:
        _draw_ecg(frames, phase, depth, rng)
    return frames


def _draw_valves(cv: "_Canvas", truth: PhantomTruth, *, s: float, sr: float, p: float, x0: float, av_y: float,
                 lv_hw: float, rv_hw: float, lv_scale: float):
    """Mitral (LV/LA) and tricuspid (RV/RA) leaflets hinged at the annulus, opening in diastole.
    ``x0``: the septum's x this frame. Returns the mitral tips and tricuspid hinges (devices sit there)."""
    open_mv = float(np.clip(1.0 - 2.2 * max(s, 0.0), 0.0, 1.0)) * (0.5 + 0.5 * math.sin(math.pi * min(1.0, p / 0.6)) if p > 0.35 else 0.2)
    open_mv = float(np.clip(open_mv, 0.0, 1.0))
    if truth.mitraclip:
        open_mv *= 0.35  # tethered leaflets
    mv_l = (x0 + 0.006, av_y)
    mv_r = (x0 + 0.006 + 2 * lv_hw * 0.8, av_y)
    mv_len = 0.055 * lv_scale ** 0.5
    ang = open_mv * 1.25  # radians towards the apex
    tip_l = (mv_l[0] + mv_len * math.cos(ang), mv_l[1] - mv_len * math.sin(ang))
    tip_r = (mv_r[0] - mv_len * math.cos(ang), mv_r[1] - mv_len * math.sin(ang))
    cv.segment(mv_l, tip_l, 0.0065, 0.8)
    cv.segment(mv_r, tip_r, 0.0065, 0.8)
    tv_r = (x0 - 0.004, av_y + 0.01)
    tv_l = (x0 - 0.004 - 2 * rv_hw * 0.8, av_y + 0.01)
    tv_len = 0.045
    open_tv = float(np.clip(1.0 - 2.2 * max(sr, 0.0), 0.0, 1.0))
    ang_t = open_tv * 1.2
    cv.segment(tv_r, (tv_r[0] - tv_len * math.cos(ang_t), tv_r[1] - tv_len * math.sin(ang_t)), 0.006, 0.75)
    cv.segment(tv_l, (tv_l[0] + tv_len * math.cos(ang_t), tv_l[1] - tv_len * math.sin(ang_t)), 0.006, 0.75)
    return tip_l, tip_r, tv_l, tv_r


def _draw_devices(cv: "_Canvas", truth: PhantomTruth, *, tip_l, tip_r, tv_l, tv_r, rv_tip, lv_tip, ra, rv,
                  x0: float, av_y: float) -> None:
    """MitraClip(s), pacemaker lead, Impella, TAVR: bright structures with their artefacts.
    ``ra`` = (cx, cy, half width, half height) of the RA, ``rv`` = (cx, cy, half width) of the RV."""
    ra_cx, ra_cy, ra_hw, ra_hh = ra
    rv_cx, rv_cy, rv_hw = rv
    if truth.mitraclip:
        mid = ((tip_l[0] + tip_r[0]) / 2, (tip_l[1] + tip_r[1]) / 2)
        offs = (0.0,) if truth.mitraclip == 1 else (-0.016, 0.016)
        for o in offs:
            # a bright metal body (a few pixels wide even after the 10 % trim and the
            # resize to 224) with a comet-tail reverberation deeper along the beam
            cv.blob(mid[0] + o, mid[1] - 0.004, 0.016, 0.026, 1.25)
            cv.segment((mid[0] + o, mid[1] + 0.02), (mid[0] + o * 1.2, mid[1] + 0.07), 0.006, 0.7)
    if truth.pacemaker:
        rv_apex = (rv_tip[0] - 0.005, rv_tip[1] + 0.03)
        pts = [(ra_cx - ra_hw * 0.5, ra_cy + ra_hh * 0.95), (ra_cx - ra_hw * 0.1, ra_cy),
               ((tv_l[0] + tv_r[0]) / 2, av_y + 0.005), (rv_cx + rv_hw * 0.05, rv_cy),
               rv_apex]
        cv.polyline(pts, 0.011, 1.0)
        # reverberation artefact: a fainter parallel echo deeper along the beam
        cv.polyline([(x + 0.004, y + 0.016) for x, y in pts], 0.007, 0.6)
    if truth.impella:
        a0 = (lv_tip[0] + 0.02, lv_tip[1] + 0.07)
        a1 = (x0 + 0.03, av_y - 0.015)
        ux, uy = a1[0] - a0[0], a1[1] - a0[1]
        n = math.hypot(ux, uy) + 1e-9
        nx, ny = -uy / n * 0.009, ux / n * 0.009
        cv.segment((a0[0] + nx, a0[1] + ny), (a1[0] + nx, a1[1] + ny), 0.005, 0.95)
        cv.segment((a0[0] - nx, a0[1] - ny), (a1[0] - nx, a1[1] - ny), 0.005, 0.95)
        # pigtail at the tip
        circ = [(a0[0] + 0.014 * math.cos(q), a0[1] - 0.014 + 0.014 * math.sin(q)) for q in np.linspace(0, 5.5, 9)]
        cv.polyline(circ, 0.0045, 0.9)
        # outflow: a second tube segment continuing towards the LVOT
        cv.segment(a1, (a1[0] - 0.02, a1[1] + 0.05), 0.008, 0.9)
    if truth.tavr:
        cx0, cy0 = x0 + 0.006, av_y + 0.02
        hw_, hh_ = 0.032, 0.045
        for q in np.linspace(-1, 1, 4):
            cv.segment((cx0 + q * hw_, cy0 - hh_), (cx0 - q * hw_, cy0 + hh_), 0.006, 1.0)
        cv.segment((cx0 - hw_, cy0 - hh_), (cx0 - hw_, cy0 + hh_), 0.008, 1.0)
        cv.segment((cx0 + hw_, cy0 - hh_), (cx0 + hw_, cy0 + hh_), 0.008, 1.0)


def _draw_ecg(frames: np.ndarray, phase: np.ndarray, depth: float, rng: np.random.Generator) -> None:
    """A green ECG trace under the sector with a white cursor at the current time."""
    T, H, W, _ = frames.shape
    y_base = int(H * (depth + 0.045))
    amp = max(2, int(H * 0.03))
    if y_base + 2 >= H:
        return
    c0, c1 = int(W * 0.15), int(W * 0.85)
    cols = np.arange(c0, c1)
    # the trace shows the beats of the whole loop, mapped to the screen width
    ph = phase[0] + (cols - c0) / max(1, (c1 - c0)) * (phase[-1] - phase[0])
    p = np.mod(ph, 1.0)
    wave = (np.exp(-((p - 0.0) / 0.012) ** 2) + np.exp(-((p - 1.0) / 0.012) ** 2)) * 1.0 \
        - 0.25 * np.exp(-((p - 0.03) / 0.01) ** 2) + 0.25 * np.exp(-((p - 0.3) / 0.05) ** 2) \
        + 0.12 * np.exp(-((p - 0.85) / 0.03) ** 2)
    rows_ = np.clip(y_base - (wave * amp).astype(int), 0, H - 1)
    for k in range(T):
        frames[k, rows_, cols] = (40, 200, 60)
        frames[k, np.clip(rows_ + 1, 0, H - 1), cols] = (30, 160, 50)
        ck = c0 + int((k / max(1, T - 1)) * (c1 - c0 - 1))
        frames[k, max(0, y_base - amp - 2):min(H, y_base + 3), ck] = (230, 230, 230)


# --------------------------------------------------------------------------- reports

def make_report(truth: PhantomTruth, rng: np.random.Generator) -> str:
    """A Cedars-template report for the truth; every sentence is a template_vocab phrase
    (with its ``<#>`` filled) or an exact zero-shot prompt sentence."""
    S: list[str] = []
    sev = SEVERITY
    if truth.tavr:
        S.append("A BIOPROSTHETIC STENT-VALVE IS PRESENT IN THE AORTIC POSITION. ")
        if rng.random() < 0.5:
            S.append("THE AORTIC VALVE PROSTHESIS APPEARS WELL SEATED. ")
    else:
        S.append("NORMAL APPEARANCE AND FUNCTION OF THE AORTIC VALVE. ")
    if truth.la_dilation:
        S.append(f"{sev[truth.la_dilation]} DILATED LEFT ATRIUM. ")
    else:
        S.append(rng.choice(["NORMAL LEFT ATRIAL SIZE AND MORPHOLOGY. ", "THE LEFT ATRIUM IS NORMAL IN SIZE. "]))
    if truth.lv_dilation:
        S.append(f"{sev[truth.lv_dilation]} DILATED LEFT VENTRICLE" +
                 rng.choice([". ", " BY VOLUME. ", " BY LINEAR CAVITY DIMENSION. "]))
    else:
        S.append(rng.choice(["NORMAL LEFT VENTRICULAR SIZE. ", "NORMAL LEFT VENTRICULAR SIZE BY VOLUME. "]))
    ef = int(round(truth.lvef))
    if ef >= 72:
        S.append("THERE IS HYPERDYNAMIC LEFT VENTRICULAR SYSTOLIC FUNCTION. ")
    elif ef >= 52:
        S.append("NORMAL LEFT VENTRICULAR SYSTOLIC FUNCTION. ")
    else:
        g = 1 if ef >= 40 else (2 if ef >= 30 else 3)
        S.append(f"{sev[g]} DEPRESSED LEFT VENTRICULAR SYSTOLIC FUNCTION. ")
    S.append(f"LV EJECTION FRACTION IS {ef}%. " if rng.random() < 0.6
             else f"THE LEFT VENTRICULAR EJECTION FRACTION IS ESTIMATED TO BE {ef}% ")
    if truth.lv_hypertrophy:
        S.append(f"{sev[truth.lv_hypertrophy]} LEFT VENTRICULAR HYPERTROPHY. ")
    else:
        S.append("NORMAL LEFT VENTRICULAR WALL THICKNESS. ")
    if truth.mitraclip == 2:
        S.append(rng.choice(["TWO MITRACLIPS ARE SEEN ON THE ANTERIOR AND POSTERIOR LEAFLETS OF THE MITRAL VALVE. ",
                             "TWO MITRACLIPS ARE NOW PRESENT ON THE ANTERIOR AND POSTERIOR MITRAL VALVE LEAFLETS. "]))
        S.append("THERE IS MILD MITRAL VALVE REGURGITATION. ")
    elif truth.mitraclip == 1:
        S.append("ONE MITRACLIP IS SEEN ON THE ANTERIOR AND POSTERIOR LEAFLETS OF THE MITRAL VALVE. ")
        S.append("THERE IS MILD MITRAL VALVE REGURGITATION. ")
    eff = truth.pericardial_effusion
    if eff == 0:
        S.append("NORMAL PERICARDIUM WITH NO PERICARDIAL EFFUSION. ")
    else:
        S.append(f"{EFFUSION_WORDS[eff]} PERICARDIAL EFFUSION. ")
        if truth.tamponade:
            S.append(rng.choice(["CARDIAC TAMPONADE IS PRESENT. ", "THERE IS EVIDENCE OF EARLY TAMPONADE. "]))
            S.append("THERE IS EARLY RIGHT VENTRICULAR DIASTOLIC COLLAPSE. ")
            S.append("THERE IS LATE RIGHT ATRIAL DIASTOLIC INVERSION. ")
        else:
            S.append("NO ECHOCARDIOGRAPHIC EVIDENCE TO SUGGEST CARDIAC TAMPONADE. ")
    p = int(round(truth.pasp))
    S.append(rng.choice([f"ESTIMATED PA SYSTOLIC PRESSURE IS {p}MMHG. ", f"ESTIMATED PA PRESSURE IS {p}MMHG. ",
                         f"ESTIMATED PEAK RVSP IS {p}MMHG. "]))
    if p < 36:
        S.append("PA SYSTOLIC PRESSURE IS NORMAL. ")
    else:
        g = 1 if p < 50 else (2 if p < 60 else 3)
        S.append(f"PA SYSTOLIC PRESSURE IS CONSISTENT WITH {sev[g]} PULMONARY HYPERTENSION. ")
    if truth.tamponade or p >= 60:
        S.append("THE INFERIOR VENA CAVA DEMONSTRATES NO INSPIRATORY COLLAPSE, CONSISTENT WITH SIGNIFICANTLY "
                 "ELEVATED RIGHT ATRIAL PRESSURE (>15MMHG). ")
    elif p >= 40:
        S.append("THE INFERIOR VENA CAVA DEMONSTRATES LESS THAN 50% COLLAPSE CONSISTENT WITH ELEVATED RIGHT "
                 "ATRIAL PRESSURE (8MMHG). ")
    else:
        S.append("THE INFERIOR VENA CAVA SHOWS A NORMAL RESPIRATORY COLLAPSE CONSISTENT WITH NORMAL RIGHT "
                 "ATRIAL PRESSURE (3MMHG). ")
    if truth.ra_dilation:
        S.append(f"{sev[truth.ra_dilation]} DILATED RIGHT ATRIUM. ")
    else:
        S.append(rng.choice(["THE RIGHT ATRIUM IS NORMAL IN SIZE. ", "NORMAL RIGHT ATRIAL SIZE AND MORPHOLOGY. "]))
    if truth.rv_dilation:
        S.append(f"{sev[truth.rv_dilation]} DILATED RIGHT VENTRICLE. ")
    else:
        S.append("NORMAL RIGHT VENTRICULAR SIZE. ")
    if p >= 60:
        S.append("MODERATE DEPRESSED RIGHT VENTRICULAR SYSTOLIC FUNCTION. ")
    elif p >= 50:
        S.append("MILD DEPRESSED RIGHT VENTRICULAR SYSTOLIC FUNCTION. ")
    else:
        S.append("NORMAL RIGHT VENTRICULAR SYSTOLIC FUNCTION. ")
    if truth.pacemaker:
        S.append(rng.choice(["ECHO DENSITY IN RIGHT VENTRICLE SUGGESTIVE OF CATHETER, PACER LEAD, OR ICD LEAD. ",
                             "ECHO DENSITY IN RIGHT ATRIUM SUGGESTIVE OF CATHETER, PACER LEAD, OR ICD LEAD. "]))
    if truth.impella:
        d = rng.uniform(3.0, 5.0)
        S.append(rng.choice([
            f"AN IMPELLA CATHETER IS SEEN AND THE INLET AREA IS {d:.1f}CM FROM THE AORTIC VALVE AND DOES NOT INTERFERE "
            "WITH NEIGHBORING STRUCTURES, CONSISTENT WITH CORRECT IMPELLA POSITIONING. THERE IS DENSE TURBULENT COLOR "
            "FLOW ABOVE THE AORTIC VALVE, CONSISTENT WITH CORRECT OUTFLOW AREA POSITION ",
            "AN IMPELLA CATHETER IS SEEN ACROSS THE AORTIC VALVE AND EXTENDS TOO FAR INTO THE LEFT VENTRICLE; "
            "REPOSITIONING RECOMMENDED "]))
    hr = truth.heart_rate
    S.append("THE PATIENT IS IN SINUS BRADYCARDIA DURING THE STUDY. " if hr < 60 else
             "THE PATIENT IS IN SINUS TACHYCARDIA DURING THE STUDY. " if hr > 100 else
             "THE PATIENT IS IN NORMAL SINUS RHYTHM DURING THE STUDY. ")
    S.append(rng.choice(["THE STUDY IMAGES ARE OF TECHNICALLY ADEQUATE QUALITY. ",
                         "THE STUDY IMAGES ARE OF TECHNICALLY GOOD QUALITY. "]))
    return "".join(S).rstrip()


# --------------------------------------------------------------------------- one clip

@dataclass
class PhantomClip:
    frames: np.ndarray           # (T, H, W, 3) uint8 RGB
    truth: PhantomTruth
    report: str
    frame_time_ms: float


def make_clip(seed: int, truth: Optional[PhantomTruth] = None, *, n_frames: int = 40, rows: int = 256,
              cols: int = 256, frame_time_ms: Optional[float] = None,
              anatomy_seed: Optional[int] = None) -> PhantomClip:
    """Truth (drawn from ``seed`` unless given), frames and report for one clip."""
    rng = np.random.default_rng([int(seed), 1])
    if truth is None:
        truth = sample_truth(rng)
    if frame_time_ms is None:
        frame_time_ms = float(rng.choice([1000 / 30, 1000 / 40, 1000 / 50]))
    frames = render_clip(truth, n_frames=n_frames, rows=rows, cols=cols, frame_time_ms=frame_time_ms,
                         seed=int(np.random.default_rng([int(seed), 2]).integers(2**31)),
                         anatomy_seed=anatomy_seed)
    report = make_report(truth, np.random.default_rng([int(seed), 3]))
    return PhantomClip(frames, truth, report, float(frame_time_ms))


# --------------------------------------------------------------------------- DICOM

def _uid(*parts: object) -> str:
    from echonode.dicom.uids import derived_uid

    return derived_uid("echonode-phantom", *parts)


def _encode_jpeg_frames(frames: np.ndarray, quality: int) -> list[bytes]:
    """JPEG baseline (ISO 10918-1 process 1), YCbCr with 4:2:2 chroma subsampling = YBR_FULL_422."""
    from PIL import Image

    out = []
    for fr in frames:
        buf = io.BytesIO()
        # subsampling=1 is 4:2:2 in Pillow; RGB input is written as YCbCr (JFIF)
        Image.fromarray(np.ascontiguousarray(fr), "RGB").save(buf, format="JPEG", quality=int(quality),
                                                             subsampling=1, optimize=False)
        out.append(buf.getvalue())
    return out


def write_dicom(path: str | os.PathLike, clip: PhantomClip, *, patient_id: str, patient_name: str,
                birth_date: str, sex: str, study_uid: str, series_uid: str, sop_uid: str,
                study_date: str, study_time: str = "101500", accession: str = "", study_id: str = "1",
                series_number: int = 1, instance_number: int = 1, quality: int = 85) -> Path:
    """Write ``clip`` as an Ultrasound Multi-frame Image (JPEG baseline, YBR_FULL_422)."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.sequence import Sequence
    from pydicom.uid import UID

    T, H, W, _ = clip.frames.shape
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(US_MULTIFRAME_SOP_CLASS)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = UID(JPEG_BASELINE)
    meta.ImplementationClassUID = UID("1.2.826.0.1.3680043.8.498.1")  # pydicom's root
    meta.ImplementationVersionName = "ECHONODE_PH"
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = US_MULTIFRAME_SOP_CLASS
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = study_date
    ds.SeriesDate = study_date
    ds.ContentDate = study_date
    ds.AcquisitionDateTime = study_date + study_time
    ds.StudyTime = study_time
    ds.SeriesTime = study_time
    ds.ContentTime = study_time
    ds.AccessionNumber = accession
    ds.Modality = "US"
    ds.Manufacturer = "echonode phantom"
    ds.ManufacturerModelName = "A4C phantom"
    ds.InstitutionName = "PHANTOM HOSPITAL"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "ECHO TTE PHANTOM"
    ds.SeriesDescription = "A4C"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = birth_date
    ds.PatientSex = sex
    ds.BodyPartExamined = "HEART"
    ds.DeviceSerialNumber = "PH0001"
    ds.SoftwareVersions = "echonode-phantom-1"
    ds.FrameTime = f"{clip.frame_time_ms:.2f}"
    ds.HeartRate = str(int(round(clip.truth.heart_rate)))
    ds.CineRate = str(int(round(1000.0 / clip.frame_time_ms)))
    ds.EffectiveDuration = f"{T * clip.frame_time_ms / 1000.0:.3f}"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = study_id
    ds.SeriesNumber = str(series_number)
    ds.InstanceNumber = str(instance_number)
    ds.PatientOrientation = ""
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionMethod = "ISO_10918_1"
    ds.BurnedInAnnotation = "NO"
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.PlanarConfiguration = 0
    ds.NumberOfFrames = str(T)
    ds.FrameIncrementPointer = pydicom.tag.Tag(0x0018, 0x1063)  # Frame Time
    ds.Rows = H
    ds.Columns = W
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    view = Dataset()
    view.CodeValue, view.CodingSchemeDesignator, view.CodeMeaning = A4C_VIEW_CODE
    ds.ViewCodeSequence = Sequence([view])
    # US region calibration: the whole image is one 2D tissue region, depth 16 cm
    reg = Dataset()
    reg.RegionSpatialFormat = 1
    reg.RegionDataType = 1
    reg.RegionFlags = 0
    reg.RegionLocationMinX0 = 0
    reg.RegionLocationMinY0 = 0
    reg.RegionLocationMaxX1 = W - 1
    reg.RegionLocationMaxY1 = H - 1
    reg.PhysicalUnitsXDirection = 3  # cm
    reg.PhysicalUnitsYDirection = 3
    reg.PhysicalDeltaX = 16.0 / H
    reg.PhysicalDeltaY = 16.0 / H
    reg.ReferencePixelX0 = W // 2
    reg.ReferencePixelY0 = 0
    ds.SequenceOfUltrasoundRegions = Sequence([reg])
    ds.PixelData = encapsulate(_encode_jpeg_frames(clip.frames, quality), has_bot=True)
    ds["PixelData"].VR = "OB"
    from echonode.files import atomic_write

    return atomic_write(path, lambda fh: ds.save_as(fh, enforce_file_format=True))


# --------------------------------------------------------------------------- datasets

_PROCEDURES = ("pacemaker", "mitraclip", "tavr")
_FIRST = ("ALEX", "SAM", "JO", "ROBIN", "KIM", "LEE", "PAT", "CHRIS", "DREW", "JAMIE")


def _plan_patients(n_studies: int, rng: np.random.Generator, longitudinal: float):
    """Split n_studies into patients (1-4 studies each) with dates months apart and
    procedures between some of them. Returns a list of lists of (truth, date, procedure)."""
    patients = []
    remaining = n_studies
    while remaining > 0:
        if rng.random() < longitudinal:
            k = int(min(remaining, rng.integers(2, 5)))
        else:
            k = 1
        base = sample_truth(rng)
        d0 = _dt.date(2021, 1, 4) + _dt.timedelta(days=int(rng.integers(0, 1100)))
        studies = []
        truth = base
        date = d0
        for i in range(k):
            proc = ""
            if i > 0:
                date = date + _dt.timedelta(days=int(rng.integers(45, 300)))
                truth = dataclasses.replace(truth)
                # natural drift between visits
                truth.heart_rate = float(np.clip(round(truth.heart_rate + rng.normal(0, 7)), 45, 125))
                truth.lvef = float(np.clip(round(truth.lvef + rng.normal(0, 3)), 10, 80))
                truth.impella = False  # temporary support is gone at follow-up
                truth.tamponade = False
                truth.pericardial_effusion = int(max(0, truth.pericardial_effusion - int(rng.integers(0, 2))))
                if rng.random() < 0.45:
                    options = [p for p in _PROCEDURES if not (getattr(truth, p))]
                    if options:
                        proc = str(rng.choice(options))
                        if proc == "pacemaker":
                            truth.pacemaker = True
                            truth.lvef = float(np.clip(truth.lvef + rng.normal(6, 3), 10, 75))  # CRT response
                        elif proc == "mitraclip":
                            truth.mitraclip = 2 if rng.random() < 0.6 else 1
                            truth.lvef = float(np.clip(truth.lvef + rng.normal(3, 3), 10, 75))
                        elif proc == "tavr":
                            truth.tavr = True
                            truth.lvef = float(np.clip(truth.lvef + rng.normal(5, 3), 10, 75))
                            truth.lv_hypertrophy = max(0, truth.lv_hypertrophy - 1)
                truth.lv_dilation = _grade(truth.lv_dilation + (0 if rng.random() < 0.8 else rng.choice([-1, 1])))
            studies.append((truth, date, proc))
        patients.append(studies)
        remaining -= k
    return patients


def _split_for(patient_key: str, split: str) -> str:
    if split != "auto":
        return split
    h = int(hashlib.sha256(patient_key.encode()).hexdigest()[:8], 16) % 100
    return "train" if h < 80 else ("val" if h < 90 else "test")


def generate_dataset(out: str | os.PathLike, n_studies: int, seed: int = 0, *, split: str = "auto",
                     n_frames: int = 40, rows: int = 256, cols: int = 256, longitudinal: float = 0.3,
                     quality: int = 85, progress: Optional[Callable[[int, int], None]] = None,
                     prefix: str = "PH") -> Path:
    """Write ``n_studies`` phantom studies (one A4C clip each) under ``out`` as DICOM,
    plus ``out/manifest.csv``. ``split`` is "auto" (80/10/10 by patient), or "train",
    "val", "test" for every row. Returns the manifest path."""
    if split not in ("auto", "train", "val", "test"):
        raise ValueError(f"split must be auto, train, val or test, not {split!r}")
    if n_studies < 1:
        raise ValueError("n_studies must be at least 1")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([int(seed), 0xEC0])
    plan = _plan_patients(int(n_studies), rng, longitudinal)
    rows_out = []
    done = 0
    for pi, studies in enumerate(plan):
        pid = f"{prefix}{int(seed)}-{pi + 1:05d}"
        pkey = f"{seed}:{pid}"
        psplit = _split_for(pkey, split)
        sex = "F" if rng.random() < 0.5 else "M"
        birth = _dt.date(1930, 1, 1) + _dt.timedelta(days=int(rng.integers(0, 25000)))
        name = f"PHANTOM^{_FIRST[pi % len(_FIRST)]}{pi + 1}"
        for si, (truth, date, proc) in enumerate(studies):
            cseed = int(np.random.default_rng([int(seed), pi, si]).integers(2**31))
            clip = make_clip(cseed, truth, n_frames=n_frames, rows=rows, cols=cols,
                             anatomy_seed=int(np.random.default_rng([int(seed), pi, 0xA7]).integers(2**31)))
            study_uid = _uid(seed, pid, si, "study")
            series_uid = _uid(seed, pid, si, "series")
            sop_uid = _uid(seed, pid, si, "sop")
            rel = Path(pid) / f"study{si + 1}" / "a4c.dcm"
            write_dicom(out / rel, clip, patient_id=pid, patient_name=name, birth_date=birth.strftime("%Y%m%d"),
                        sex=sex, study_uid=study_uid, series_uid=series_uid, sop_uid=sop_uid,
                        study_date=date.strftime("%Y%m%d"), accession=f"A{seed % 1000:03d}{pi:05d}{si}",
                        study_id=str(si + 1), quality=quality)
            row = {"path": rel.as_posix(), "report": clip.report, "patient_id": pid,
                   "study_date": date.isoformat(), "split": psplit, "study_uid": study_uid,
                   "series_uid": series_uid, "sop_uid": sop_uid, "procedure": proc}
            row.update(clip.truth.as_row())
            rows_out.append(row)
            done += 1
            if progress:
                progress(done, n_studies)
    manifest = out / "manifest.csv"
    with manifest.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(MANIFEST_COLUMNS))
        w.writeheader()
        for r in rows_out:
            w.writerow(r)
    return manifest
