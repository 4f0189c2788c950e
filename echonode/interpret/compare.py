"""Longitudinal comparison and report retrieval with EchoCLIP-R embeddings (pure functions).

* Study embedding: the mean of the L2-normalised frame embeddings of every analysed frame
  of every A4C clip of the study (frames pooled, so a longer clip weighs more), **not**
  re-normalised -- as the reference ``embedding_example.py`` does for one video.
* Similarity between studies (and between a study and a report) is the cosine of the two
  vectors (both normalised here, since the mean is not unit length).
* Flags, against the most recent prior: ``possible_patient_mismatch`` when the similarity
  is below the calibrated same-patient threshold, ``marked_change`` when it is below the
  calibrated change threshold. Without calibration both stay ``None`` ("uncalibrated").
  They prompt review; they do not establish identity or clinical change.

Embeddings from other weights (a different checksum) are not comparable and are skipped;
the caller gets their UIDs back to warn about.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from echonode.interpretation import (
    THRESHOLD_CALIBRATED,
    THRESHOLD_NONE,
    Longitudinal,
    ModelInfo,
    PriorComparison,
)


@dataclass(frozen=True)
class PriorEmbedding:
    """A prior study's stored EchoCLIP-R embedding (loaded from SQL by the caller)."""

    study_instance_uid: str
    study_date: str                  # DICOM DA YYYYMMDD, or "" when unknown
    embedding: np.ndarray            # (D,)
    weights_sha256: str


def l2n(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def study_embedding(frame_embeddings: Sequence[np.ndarray]) -> np.ndarray:
    """Mean of L2-normalised frame embeddings over all frames of all clips, shape (D,).

    ``frame_embeddings``: one (F_i, D) array per clip (raw or normalised).
    """
    arrs = [np.asarray(f, dtype=np.float32) for f in frame_embeddings if len(f)]
    if not arrs:
        raise ValueError("no frame embeddings")
    frames = np.concatenate(arrs, axis=0)
    return l2n(frames).mean(axis=0).astype(np.float32)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(l2n(a) @ l2n(b))


def longitudinal_thresholds(calibration: Optional[dict]) -> tuple[Optional[float], Optional[float], str]:
    """(same_patient_threshold, change_threshold, source) from a bundle's calibration."""
    lon = (calibration or {}).get("longitudinal") or {}
    sp = lon.get("same_patient_threshold")
    ch = lon.get("change_threshold")
    sp = float(sp) if isinstance(sp, (int, float)) and not isinstance(sp, bool) else None
    ch = float(ch) if isinstance(ch, (int, float)) and not isinstance(ch, bool) else None
    return sp, ch, (THRESHOLD_CALIBRATED if (sp is not None or ch is not None) else THRESHOLD_NONE)


def compare_with_priors(embedding: np.ndarray, priors: Sequence[PriorEmbedding], model: ModelInfo,
                        calibration: Optional[dict] = None) -> tuple[Longitudinal, list[str]]:
    """Cosine to each comparable prior; most recent / most similar flagged; review flags.

    Returns (Longitudinal, skipped prior UIDs whose weights differ from ``model``).
    The most recent prior is the one with the latest study date (priors without a date
    count as oldest; equal dates keep the caller's order).
    """
    sp, ch, source = longitudinal_thresholds(calibration)
    usable = [p for p in priors if p.weights_sha256 == model.weights_sha256]
    skipped = [p.study_instance_uid for p in priors if p.weights_sha256 != model.weights_sha256]
    if not usable:
        return Longitudinal(model=model, same_patient_threshold=sp, change_threshold=ch,
                            threshold_source=source), skipped
    sims = [cosine(embedding, p.embedding) for p in usable]
    recent = max(range(len(usable)), key=lambda i: (usable[i].study_date or "", -i))
    similar = max(range(len(usable)), key=lambda i: (sims[i], -i))
    comps = tuple(
        PriorComparison(study_instance_uid=p.study_instance_uid, study_date=p.study_date or "",
                        similarity=round(sims[i], 6), most_recent=(i == recent), most_similar=(i == similar))
        for i, p in enumerate(usable))
    ref = sims[recent]
    return Longitudinal(
        model=model, priors=comps, same_patient_threshold=sp, change_threshold=ch, threshold_source=source,
        possible_patient_mismatch=(ref < sp) if sp is not None else None,
        marked_change=(ref < ch) if ch is not None else None,
    ), skipped


# ------------------------------------------------------------------------- retrieval

def similarity_matrix(study_embeddings: np.ndarray, report_embeddings: np.ndarray) -> np.ndarray:
    """Cosine (N studies, M reports)."""
    return l2n(np.atleast_2d(study_embeddings)) @ l2n(np.atleast_2d(report_embeddings)).T


def rank_reports(study_emb: np.ndarray, report_embeddings: np.ndarray) -> np.ndarray:
    """Indices of reports, most similar first (ties: lower index first)."""
    s = similarity_matrix(study_emb, report_embeddings)[0]
    return np.argsort(-s, kind="stable")


def rank_studies(report_emb: np.ndarray, study_embeddings: np.ndarray) -> np.ndarray:
    """Indices of studies, most similar to the report first."""
    s = similarity_matrix(study_embeddings, report_emb)[:, 0]
    return np.argsort(-s, kind="stable")


def retrieval_ranks(study_embeddings: np.ndarray, report_embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """1-based rank of the matching item for paired data (study i <-> report i).

    Returns (image-to-report ranks, report-to-image ranks). A tie with the true match
    counts against it (pessimistic rank: 1 + number of items scoring >= the match, other
    than the match itself).
    """
    s = similarity_matrix(study_embeddings, report_embeddings)
    if s.shape[0] != s.shape[1]:
        raise ValueError(f"paired retrieval needs as many reports as studies, got {s.shape}")
    d = np.diag(s)
    n = s.shape[0]
    eye = np.eye(n, dtype=bool)
    i2t = 1 + ((s >= d[:, None]) & ~eye).sum(axis=1)
    t2i = 1 + ((s >= d[None, :]) & ~eye).sum(axis=0)
    return i2t, t2i

