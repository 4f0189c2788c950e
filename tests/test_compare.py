"""Longitudinal comparison and retrieval helpers against direct computations."""

from __future__ import annotations

import numpy as np
import pytest

from echonode.interpret.compare import (
    PriorEmbedding,
    compare_with_priors,
    cosine,
    rank_reports,
    rank_studies,
    retrieval_ranks,
    study_embedding,
)
from echonode.interpretation import ModelInfo

SHA = "a" * 64
MODEL = ModelInfo(name="r", architecture="tiny", weights_sha256=SHA, tokenizer="template", echonode_version="0")


def test_study_embedding_pools_normalised_frames():
    a = np.array([[3.0, 0.0], [0.0, 2.0]])
    b = np.array([[1.0, 1.0]])
    got = study_embedding([a, b])
    want = (np.array([1, 0]) + np.array([0, 1]) + np.array([1, 1]) / np.sqrt(2)) / 3
    assert got == pytest.approx(want, abs=1e-6)
    assert np.linalg.norm(got) < 1.0        # not re-normalised (reference behaviour)
    with pytest.raises(ValueError):
        study_embedding([])


def prior(uid, date, vec, sha=SHA):
    return PriorEmbedding(uid, date, np.asarray(vec, dtype=np.float32), sha)


def test_compare_flags_recent_and_similar():
    cur = np.array([1.0, 0.0, 0.0])
    priors = [prior("1.1", "20240101", [1, 0.1, 0]), prior("1.2", "20250101", [0.2, 1, 0]),
              prior("1.3", "", [1, 0, 0]), prior("1.4", "20250101", [1, 1, 1], sha="b" * 64)]
    cal = {"longitudinal": {"same_patient_threshold": 0.5, "change_threshold": 0.9}}
    lon, skipped = compare_with_priors(cur, priors, MODEL, cal)
    assert skipped == ["1.4"]
    by = {p.study_instance_uid: p for p in lon.priors}
    assert by["1.2"].most_recent and not by["1.1"].most_recent
    assert by["1.3"].most_similar and by["1.3"].similarity == pytest.approx(1.0)
    assert by["1.1"].similarity == pytest.approx(cosine(cur, [1, 0.1, 0]), abs=1e-6)
    ref = cosine(cur, [0.2, 1, 0])          # 0.196: below both thresholds
    assert lon.reference.similarity == pytest.approx(ref, abs=1e-6)
    assert lon.possible_patient_mismatch is True and lon.marked_change is True
    assert lon.threshold_source == "calibrated"
    assert "review" in lon.note


def test_compare_uncalibrated_and_no_priors():
    lon, _ = compare_with_priors(np.ones(3), [prior("1", "20200101", [1, 1, 1.1])], MODEL, None)
    assert lon.possible_patient_mismatch is None and lon.marked_change is None
    assert lon.threshold_source == "uncalibrated"
    lon, _ = compare_with_priors(np.ones(3), [], MODEL, {"longitudinal": {"same_patient_threshold": 0.5}})
    assert lon.priors == () and lon.possible_patient_mismatch is None


def test_retrieval_ranks_direct():
    rng = np.random.default_rng(0)
    studies = rng.normal(size=(6, 5))
    reports = studies + rng.normal(scale=0.8, size=(6, 5))
    i2t, t2i = retrieval_ranks(studies, reports)

    def cos(a, b):
        return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    for i in range(6):
        s = [cos(studies[i], reports[j]) for j in range(6)]
        assert i2t[i] == 1 + sum(1 for j in range(6) if j != i and s[j] >= s[i])
        assert list(rank_reports(studies[i], reports)) == sorted(range(6), key=lambda j: -s[j])
        r = [cos(studies[j], reports[i]) for j in range(6)]
        assert t2i[i] == 1 + sum(1 for j in range(6) if j != i and r[j] >= r[i])
        assert list(rank_studies(reports[i], studies)) == sorted(range(6), key=lambda j: -r[j])
    perfect_i2t, perfect_t2i = retrieval_ranks(studies, studies)
    assert set(perfect_i2t) == {1} and set(perfect_t2i) == {1}
