"""Scoring rules against direct, obviously-correct implementations on fixed embeddings."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from echonode.interpret import scoring as sc


def unit(rows):
    a = np.asarray(rows, dtype=np.float64)
    return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)


def rng_unit(seed, n, d=8):
    return unit(np.random.default_rng(seed).normal(size=(n, d)))


# ---------------------------------------------------------------- direct implementations

def direct_binary(frames, prompts):
    total = 0.0
    for f in frames:
        total += sum(float(np.dot(f, p)) for p in prompts) / len(prompts)
    return total / len(frames)


def direct_regression(frames, cands, values, frac=0.2):
    C = len(cands)
    per_frame_ranked = []
    for f in frames:
        sims = [float(np.dot(f.astype(np.float32), c.astype(np.float32))) for c in cands]
        order = sorted(range(C), key=lambda i: (-sims[i], i))   # descending, ties by index
        per_frame_ranked.append([values[i] for i in order])
    avg = [sum(r[k] for r in per_frame_ranked) / len(frames) for k in range(C)]
    k = max(1, int(C * frac))
    top = sorted(avg[:k])
    return top[(k - 1) // 2]            # lower median


# ----------------------------------------------------------------------------- binary

def test_binary_matches_direct_and_equivalent_form():
    fr, pr = rng_unit(1, 7), rng_unit(2, 3)
    assert sc.binary_score(fr, pr) == pytest.approx(direct_binary(fr, pr), abs=1e-6)
    # §5.1: equivalent to the dot of the mean frame and mean prompt embeddings
    assert sc.binary_score(fr, pr) == pytest.approx(float(fr.mean(0) @ pr.mean(0)), abs=1e-6)
    # torch input gives the same
    assert sc.binary_score(torch.from_numpy(fr), torch.from_numpy(pr)) == pytest.approx(direct_binary(fr, pr), abs=1e-6)


def test_binary_known_value():
    fr = unit([[1, 0], [0, 1]])
    pr = unit([[1, 0], [1, 1]])
    # cosines: f0: 1, .7071 ; f1: 0, .7071 -> mean = (1 + .7071 + 0 + .7071)/4
    assert sc.binary_score(fr, pr) == pytest.approx((1 + 2 * math.sqrt(0.5)) / 4, abs=1e-6)
    assert list(sc.binary_frame_scores(fr, pr)) == pytest.approx([(1 + math.sqrt(.5)) / 2, math.sqrt(.5) / 2], abs=1e-6)


def test_binary_call_rule():
    assert sc.binary_call(0.30, 0.298) == "present"
    assert sc.binary_call(0.298, 0.298) == "absent"      # strictly greater, as the reference
    assert sc.binary_call(0.1, None) == "uncalibrated"
    assert sc.binary_call(float("nan"), 0.2) == "uncalibrated"


def test_shape_errors():
    with pytest.raises(ValueError):
        sc.binary_score(rng_unit(1, 3, 8), rng_unit(2, 3, 4))
    with pytest.raises(ValueError):
        sc.binary_score(np.zeros((0, 8), np.float32), rng_unit(2, 3))


# ------------------------------------------------------------------------- regression

def test_candidates_template_major():
    prompts, values = sc.regression_candidates(["A <#>%", "B <#>."], range(3))
    assert prompts == ["A 0%", "A 1%", "A 2%", "B 0.", "B 1.", "B 2."]
    assert values == [0, 1, 2, 0, 1, 2]
    p, v = sc.regression_candidates(["EF <#>"])
    assert len(p) == 101 and v[0] == 0 and v[-1] == 100
    with pytest.raises(ValueError):
        sc.regression_candidates(["NO PLACEHOLDER"])


def test_lower_median_is_torch_semantics():
    assert sc.lower_median([1, 2, 3, 4]) == 2           # numpy would say 2.5
    assert sc.lower_median([4, 1, 3, 2]) == 2
    assert sc.lower_median([5, 1, 3]) == 3
    assert sc.lower_median([7.5]) == 7.5
    with pytest.raises(ValueError):
        sc.lower_median([])


def test_top_k():
    assert sc.top_k(202) == 40 and sc.top_k(303) == 60 and sc.top_k(3) == 1 and sc.top_k(10) == 2


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_regression_matches_direct_random(seed):
    rng = np.random.default_rng(seed)
    fr = rng_unit(seed + 10, 5, 16)
    cands = rng_unit(seed + 20, 40, 16)
    values = list(rng.integers(0, 101, size=40))
    got = sc.regression_value(fr, cands, values)
    assert got == pytest.approx(direct_regression(fr, cands, values), abs=1e-9)


def test_regression_even_k_takes_lower_middle():
    # one frame, 10 candidates ranked by construction; k = int(0.2*10) = 2 (even)
    d = 10
    cands = np.eye(d, dtype=np.float32)
    frame = unit([np.linspace(1.0, 0.1, d)])          # ranks candidates 0,1,2,... in order
    values = [30, 10, 50, 60, 70, 80, 90, 95, 99, 100]
    # top-2 values = [30, 10] -> lower median = 10 (numpy would give 20)
    assert sc.regression_value(frame, cands, values) == 10
    assert direct_regression(frame, cands, values) == 10


def test_regression_values_averaged_over_frames_per_rank():
    cands = np.eye(5, dtype=np.float32)
    f1 = unit([[5, 4, 3, 2, 1]])[0]          # ranking 0,1,2,3,4
    f2 = unit([[1, 2, 3, 4, 5]])[0]          # ranking 4,3,2,1,0
    values = [0, 10, 20, 30, 40]
    avg = sc.ranked_values(np.stack([f1, f2]), cands, values).numpy()
    assert list(avg) == pytest.approx([20, 20, 20, 20, 20])
    # with k forced by fraction 0.4 -> k = 2: avg top-2 = [20, 20]
    assert sc.regression_value(np.stack([f1, f2]), cands, values, fraction=0.4) == 20


def test_regression_ties_broken_by_candidate_order():
    # identical candidate embeddings -> exact ties; stable order keeps template-major order
    cands = np.repeat(unit([[1, 0, 0]]), 6, axis=0)
    values = [3, 1, 4, 1, 5, 9]
    frame = unit([[1, 0, 0]])
    # top-3 in candidate order = [3, 1, 4] -> lower median 3
    assert sc.regression_value(frame, cands, values, fraction=0.5) == direct_regression(frame, cands, values, 0.5) == 3
    # ties within a real catalogue-shaped problem: two identical templates
    rng = np.random.default_rng(5)
    base = rng_unit(6, 101, 12)
    cands = np.concatenate([base, base])          # template 2 == template 1 -> every value tied
    values = list(range(101)) * 2
    fr = rng_unit(7, 4, 12)
    assert sc.regression_value(fr, cands, values) == pytest.approx(direct_regression(fr, cands, values))


def test_lvef_derived():
    d = sc.lvef_derived(35.0)
    assert d == {"lvef_lt_50": True, "lvef_lt_40": True, "lvef_lt_30": False, "hfref": True}
    assert sc.lvef_derived(40.0)["hfref"] is True and sc.lvef_derived(40.0)["lvef_lt_40"] is False
    assert sc.lvef_derived(55.0) == {"lvef_lt_50": False, "lvef_lt_40": False, "lvef_lt_30": False, "hfref": False}
    assert set(sc.lvef_derived(None).values()) == {None}
    assert set(sc.lvef_derived(float("nan")).values()) == {None}


# ------------------------------------------------------------------------ categorical

def test_categorical_level_scores_match_direct():
    fr = rng_unit(30, 6)
    pr = rng_unit(31, 5)
    values = [1, 2, 1, 3, 3]
    got = sc.categorical_level_scores(fr, pr, values)
    assert set(got) == {1, 2, 3}
    for lv in (1, 2, 3):
        sel = pr[[i for i, v in enumerate(values) if v == lv]]
        assert got[lv] == pytest.approx(direct_binary(fr, sel), abs=1e-6)


def test_categorical_call_rules():
    scores = {1: 0.20, 2: 0.25, 3: 0.10}
    # thresholds for every graded level: most severe level above its threshold
    assert sc.categorical_call(scores, {1: 0.1, 2: 0.3, 3: 0.05}, [0, 1, 2, 3]) == (3, sc.METHOD_CATEGORICAL_THRESHOLD)
    assert sc.categorical_call(scores, {1: 0.1, 2: 0.3, 3: 0.5}, [0, 1, 2, 3]) == (1, sc.METHOD_CATEGORICAL_THRESHOLD)
    assert sc.categorical_call(scores, {1: 0.9, 2: 0.9, 3: 0.9}, [0, 1, 2, 3]) == (0, sc.METHOD_CATEGORICAL_THRESHOLD)
    # no thresholds, level 0 has no prompt: no call (argmax would always report disease)
    assert sc.categorical_call(scores, {}, [0, 1, 2, 3]) == (None, sc.METHOD_CATEGORICAL_UNCALIBRATED)
    # no thresholds, every level has prompts: argmax
    full = {0: 0.3, 1: 0.31, 2: 0.1}
    assert sc.categorical_call(full, {}, [0, 1, 2]) == (1, sc.METHOD_CATEGORICAL_ARGMAX)
