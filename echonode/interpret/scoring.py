"""EchoCLIP zero-shot scoring rules as pure functions (research/echoclip.md §5.1, §5.2).

Every function takes **L2-normalised** embeddings (use :func:`normalize`), as the
reference ``compute_binary_metric`` / ``compute_regression_metric`` do, and accepts
numpy arrays or torch tensors. Nothing here touches a model.

* Binary: the mean cosine over prompts and frames.
* Regression: candidates = every template x 0..100 (template-major order); per frame
  the candidates are ranked by cosine (descending); the candidate *values* at each rank
  are averaged over frames; the prediction is the **lower** median (``torch.median``
  semantics, not numpy's mean of the middle pair) of the first ``int(0.2 * C)`` averaged
  ranked values.
* Categorical (echonode's chosen reading (a) of §5.3.4): one binary mean-cosine score per
  severity level, over the prompts of that level; see :func:`categorical_level_scores`
  and :func:`categorical_call`.

Ties: the reference sorts with torch's default (unstable) ``argsort``, so the order of
exactly equal similarities is undefined there. echonode breaks ties deterministically by
candidate order (a stable descending sort); with fp32 embeddings exact ties are rare.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np
import torch

#: The reference's placeholder in regression templates.
VALUE_PLACEHOLDER = "<#>"
#: Fraction of ranked candidates whose lower median is the regression prediction.
TOP_FRACTION = 0.2

METHOD_BINARY = "binary-mean-cosine"
METHOD_REGRESSION = "regression-top20-lower-median"
METHOD_CATEGORICAL_THRESHOLD = "categorical-per-level-binary-threshold"
METHOD_CATEGORICAL_ARGMAX = "categorical-per-level-binary-argmax"
METHOD_CATEGORICAL_UNCALIBRATED = "categorical-per-level-binary-uncalibrated"

# HFrEF: LVEF <= 40 % (2022 AHA/ACC/HFSA universal definition of heart failure, "HF with
# reduced EF"). An echo estimate can only say the LVEF lies in that range: the clinical
# syndrome (symptoms, signs) is not assessed.
HFREF_MAX_LVEF = 40.0


def _as_tensor(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to(torch.float32).cpu()
    return torch.as_tensor(np.asarray(x, dtype=np.float32))


def normalize(x, dim: int = -1):
    """L2-normalise along ``dim`` (numpy in, numpy out; torch in, torch out)."""
    if isinstance(x, torch.Tensor):
        return torch.nn.functional.normalize(x.float(), dim=dim)
    a = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(a, axis=dim, keepdims=True)
    return a / np.maximum(n, 1e-12)


def similarities(frames, prompts) -> torch.Tensor:
    """Cosine matrix (F, P) of normalised frame (F, D) and prompt (P, D) embeddings."""
    f = _as_tensor(frames)
    p = _as_tensor(prompts)
    if f.ndim != 2 or p.ndim != 2 or f.shape[1] != p.shape[1]:
        raise ValueError(f"expected frames (F, D) and prompts (P, D), got {tuple(f.shape)} and {tuple(p.shape)}")
    if f.shape[0] == 0 or p.shape[0] == 0:
        raise ValueError("need at least one frame and one prompt")
    return f @ p.T


# ----------------------------------------------------------------------------- binary

def binary_score(frames, prompts) -> float:
    """Mean cosine over prompts and frames (reference ``compute_binary_metric``)."""
    return float(similarities(frames, prompts).mean(dim=1).mean(dim=0))


def binary_frame_scores(frames, prompts) -> np.ndarray:
    """Per-frame binary score (mean over prompts), shape (F,)."""
    return similarities(frames, prompts).mean(dim=1).numpy()


def binary_call(score: float, threshold: Optional[float]) -> str:
    """``present`` if score > threshold (the reference's ``score > 0.298``), ``absent``,
    or ``uncalibrated`` when there is no threshold."""
    if threshold is None or score is None or not math.isfinite(score):
        return "uncalibrated"
    return "present" if score > threshold else "absent"


# ------------------------------------------------------------------------- regression

def regression_candidates(templates: Sequence[str], values: Iterable[int] = range(101)) -> tuple[list[str], list[int]]:
    """Every template x every value, template-major: all values of template 0, then 1, ...

    Templates without the ``<#>`` placeholder are rejected (the reference skips them
    silently; a site template without it is a mistake worth reporting).
    """
    values = list(values)
    prompts: list[str] = []
    out_values: list[int] = []
    for t in templates:
        if VALUE_PLACEHOLDER not in t:
            raise ValueError(f"regression template has no {VALUE_PLACEHOLDER} placeholder: {t!r}")
        for v in values:
            prompts.append(t.replace(VALUE_PLACEHOLDER, str(v)))
            out_values.append(v)
    return prompts, out_values


def top_k(n_candidates: int, fraction: float = TOP_FRACTION) -> int:
    """``int(fraction * C)``, at least 1 (the reference would take the median of nothing)."""
    return max(1, int(n_candidates * fraction))


def lower_median(values) -> float:
    """The lower of the two middle elements for even length (``torch.median`` semantics)."""
    if isinstance(values, torch.Tensor):
        v = values.detach().cpu().to(torch.float64).flatten()
    else:
        v = torch.as_tensor(np.asarray(values, dtype=np.float64)).flatten()
    if v.numel() == 0:
        raise ValueError("median of an empty sequence")
    return float(v.median())


def ranked_values(frames, candidates, candidate_values) -> torch.Tensor:
    """Mean over frames of the candidate value at each rank position, shape (C,)."""
    s = similarities(frames, candidates)
    vals = torch.as_tensor(np.asarray(candidate_values, dtype=np.float64))
    if vals.ndim != 1 or vals.shape[0] != s.shape[1]:
        raise ValueError(f"{vals.shape[0] if vals.ndim == 1 else vals.shape} candidate values for {s.shape[1]} candidates")
    idx = torch.argsort(s, dim=1, descending=True, stable=True)
    return vals[idx].mean(dim=0)


def regression_value(frames, candidates, candidate_values, fraction: float = TOP_FRACTION) -> float:
    """Reference ``compute_regression_metric`` for one video (frames (F, D))."""
    avg = ranked_values(frames, candidates, candidate_values)
    return lower_median(avg[: top_k(avg.shape[0], fraction)])


def lvef_derived(value: Optional[float]) -> dict[str, Optional[bool]]:
    """Derived calls from an LVEF estimate in %: < 50, < 40, < 30 and HFrEF range (<= 40 %)."""
    ok = value is not None and math.isfinite(value)
    return {
        "lvef_lt_50": (value < 50.0) if ok else None,
        "lvef_lt_40": (value < 40.0) if ok else None,
        "lvef_lt_30": (value < 30.0) if ok else None,
        "hfref": (value <= HFREF_MAX_LVEF) if ok else None,
    }


# ------------------------------------------------------------------------ categorical

def categorical_level_scores(frames, prompts, prompt_values) -> dict[int, float]:
    """Reading (a) of §5.3.4: the binary mean-cosine score of each level's prompts.

    ``prompts`` (P, D) normalised; ``prompt_values`` (P,) the level of each prompt.
    Returns {level value: score} for every level that has prompts.
    """
    s = similarities(frames, prompts)
    pv = [int(v) for v in prompt_values]
    if len(pv) != s.shape[1]:
        raise ValueError(f"{len(pv)} prompt values for {s.shape[1]} prompts")
    out: dict[int, float] = {}
    for level in sorted(set(pv)):
        cols = [i for i, v in enumerate(pv) if v == level]
        out[level] = float(s[:, cols].mean(dim=1).mean(dim=0))
    return out


def categorical_call(level_scores: Mapping[int, float], thresholds: Mapping[int, Optional[float]],
                     all_levels: Sequence[int]) -> tuple[Optional[int], str]:
    """Choose a level from per-level scores. Returns (level or None, method).

    * Every level above the lowest has a threshold: the most severe level whose score
      exceeds its threshold; if none does, the lowest level of ``all_levels`` (e.g.
      "Normal", or 0 = none when the catalogue has no prompt for it).
    * Otherwise, if every level in ``all_levels`` has prompts: the level with the highest
      score (the prompts compete directly, as in CLIP zero-shot classification).
    * Otherwise no level is chosen (uncalibrated): a highest score among "mild",
      "moderate", "severe" alone would always report disease.
    """
    levels = sorted(set(int(v) for v in all_levels))
    graded = [lv for lv in levels if lv in level_scores and lv != levels[0]]
    if graded and all(thresholds.get(lv) is not None for lv in graded):
        for lv in sorted(graded, reverse=True):
            if level_scores[lv] > thresholds[lv]:
                return lv, METHOD_CATEGORICAL_THRESHOLD
        return levels[0], METHOD_CATEGORICAL_THRESHOLD
    if levels and all(lv in level_scores for lv in levels):
        best = max(levels, key=lambda lv: (level_scores[lv], -lv))
        return best, METHOD_CATEGORICAL_ARGMAX
    return None, METHOD_CATEGORICAL_UNCALIBRATED
