"""The paper's evaluation metrics as pure numpy functions.

* :func:`auc` — ROC AUC by the Mann-Whitney U statistic (ties count 1/2).
* :func:`bootstrap_ci` — percentile 95 % confidence interval by resampling cases.
* :func:`youden` — the threshold maximising sensitivity + specificity - 1, with both.
* :func:`mae` — mean absolute error.
* :func:`roc_curve` — (fpr, tpr, thresholds) for plotting.
* Retrieval ranks come from :func:`echonode.interpret.compare.retrieval_ranks` (a tie with
  the true match counts against it); :func:`mcmrr` averages both directions.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np


def _clean(y, s):
    y = np.asarray(y, dtype=float).ravel()
    s = np.asarray(s, dtype=float).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels {y.shape} and scores {s.shape} differ in length")
    ok = np.isfinite(y) & np.isfinite(s)
    return y[ok].astype(bool), s[ok]


def auc(labels, scores) -> float:
    """ROC AUC (probability a random positive scores above a random negative; ties 1/2).
    NaN when a class is missing."""
    y, s = _clean(labels, scores)
    n_pos = int(y.sum())
    n_neg = int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=float)
    ss = s[order]
    # average ranks for ties
    i = 0
    r = np.arange(1, len(s) + 1, dtype=float)
    while i < len(ss):
        j = i
        while j + 1 < len(ss) and ss[j + 1] == ss[i]:
            j += 1
        r[i:j + 1] = (i + j + 2) / 2.0
        i = j + 1
    ranks[order] = r
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def bootstrap_ci(labels, scores, stat: Callable = auc, n_boot: int = 1000, alpha: float = 0.05,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile (1-alpha) CI of ``stat(labels, scores)`` over case resamples."""
    y = np.asarray(labels, dtype=float).ravel()
    s = np.asarray(scores, dtype=float).ravel()
    n = len(y)
    if n == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(int(n_boot)):
        idx = rng.integers(0, n, n)
        v = stat(y[idx], s[idx])
        if v is not None and math.isfinite(v):
            vals.append(v)
    if len(vals) < max(10, n_boot // 10):
        return float("nan"), float("nan")
    lo, hi = np.percentile(vals, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi)


def roc_curve(labels, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds), thresholds descending; a case is positive when score >= threshold."""
    y, s = _clean(labels, scores)
    thr = np.unique(s)[::-1]
    P = max(1, int(y.sum()))
    N = max(1, int((~y).sum()))
    tpr = np.array([((s >= t) & y).sum() / P for t in thr])
    fpr = np.array([((s >= t) & ~y).sum() / N for t in thr])
    return np.r_[0.0, fpr, 1.0], np.r_[0.0, tpr, 1.0], np.r_[np.inf, thr, -np.inf]


def youden(labels, scores) -> dict:
    """Threshold at Youden's J (score > threshold = positive) with sensitivity and specificity.

    The threshold is the midpoint between the cut score and the next lower distinct
    score, so ``score > threshold`` reproduces the chosen operating point on new data.
    """
    y, s = _clean(labels, scores)
    if y.sum() == 0 or (~y).sum() == 0:
        return {"threshold": float("nan"), "sensitivity": float("nan"), "specificity": float("nan"), "j": float("nan")}
    u = np.unique(s)  # ascending
    best = (-1.0, 0.0, 0.0, float(u[0]))
    P, N = y.sum(), (~y).sum()
    for k, t in enumerate(u):
        pred = s >= t
        sens = (pred & y).sum() / P
        spec = (~pred & ~y).sum() / N
        j = sens + spec - 1
        if j > best[0] + 1e-12:
            lower = u[k - 1] if k > 0 else t - 1e-6
            best = (j, sens, spec, float((t + lower) / 2.0))
    return {"threshold": best[3], "sensitivity": float(best[1]), "specificity": float(best[2]), "j": float(best[0])}


def sens_spec(labels, scores, threshold: float) -> tuple[float, float]:
    y, s = _clean(labels, scores)
    pred = s > threshold
    P, N = y.sum(), (~y).sum()
    return (float((pred & y).sum() / P) if P else float("nan"),
            float((~pred & ~y).sum() / N) if N else float("nan"))


def mae(truth, pred) -> float:
    t = np.asarray(truth, dtype=float).ravel()
    p = np.asarray(pred, dtype=float).ravel()
    ok = np.isfinite(t) & np.isfinite(p)
    return float(np.mean(np.abs(t[ok] - p[ok]))) if ok.any() else float("nan")


def mae_ci(truth, pred, n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
    t = np.asarray(truth, dtype=float).ravel()
    p = np.asarray(pred, dtype=float).ravel()
    return bootstrap_ci(t, p, stat=mae, n_boot=n_boot, seed=seed)


def mcmrr(i2t_ranks, t2i_ranks) -> float:
    """Mean cross-modal retrieval rank: the mean of the image→report and report→image mean ranks."""
    return float((np.mean(i2t_ranks) + np.mean(t2i_ranks)) / 2.0)


def chance_rank(n: int) -> float:
    """Expected rank of the match under random scores among n candidates."""
    return (n + 1) / 2.0


def retrieval(image_emb: np.ndarray, text_emb: np.ndarray) -> dict:
    """Paired retrieval metrics (image i <-> report i)."""
    from echonode.interpret.compare import retrieval_ranks

    i2t, t2i = retrieval_ranks(image_emb, text_emb)
    n = len(i2t)
    return {"n": n, "image_to_report_mean_rank": float(np.mean(i2t)),
            "report_to_image_mean_rank": float(np.mean(t2i)), "mcmrr": mcmrr(i2t, t2i),
            "chance_rank": chance_rank(n), "mcmrr_over_chance": mcmrr(i2t, t2i) / chance_rank(n)}


def same_patient_pairs(embeddings: np.ndarray, patient_ids, dates=None, max_pairs: Optional[int] = 20000,
                       seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Cosine similarity of study pairs and whether both belong to the same patient.

    All same-patient pairs are used; different-patient pairs are subsampled to at most
    ``max_pairs``. Returns (labels, similarities).
    """
    e = np.asarray(embeddings, dtype=np.float64)
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    pid = np.asarray([str(p) for p in patient_ids])
    n = len(pid)
    if n < 2:
        return np.zeros(0, bool), np.zeros(0)
    iu, ju = np.triu_indices(n, 1)
    same = pid[iu] == pid[ju]
    sims = np.einsum("ij,ij->i", e[iu], e[ju])
    pos = np.where(same)[0]
    neg = np.where(~same)[0]
    if max_pairs is not None and len(neg) > max_pairs:
        neg = np.random.default_rng(seed).choice(neg, max_pairs, replace=False)
    idx = np.r_[pos, neg]
    return same[idx], sims[idx]
