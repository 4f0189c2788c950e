"""The Interpreter on the tiny random-weight bundles: contract, aggregation, cache, thresholds."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from echonode.interpret import scoring
from echonode.interpret.compare import PriorEmbedding
from echonode.interpret.engine import ClipInput, Interpreter
from echonode.interpret.prompts import load_catalog
from echonode.interpretation import DEMO_BANNER, ClipRef, Interpretation


def make_clips(seed=0, sizes=(5, 3)):
    rng = np.random.default_rng(seed)
    clips = []
    for i, n in enumerate(sizes):
        frames = rng.integers(0, 255, (n, 96, 128, 3), dtype=np.uint8)
        frames[:, 30:60, 40:80] = 255 - 40 * i      # some structure
        clips.append(ClipInput(ClipRef(f"1.2.826.0.1.{i + 1}", series_instance_uid="1.2.826.0.9",
                                       n_frames=2 * n, frames_used=tuple(range(0, 2 * n, 2))), frames))
    return clips


@pytest.fixture(scope="module")
def interp_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def interpreter(tiny_bundle, tiny_bundle_r, interp_cache):
    return Interpreter(tiny_bundle, tiny_bundle_r, cache_dir=interp_cache)


@pytest.fixture(scope="module")
def result(interpreter):
    return interpreter.interpret_with_embedding("1.2.826.0.1.99", make_clips())


def test_interpretation_contract(result, interpreter, tiny_bundle):
    interp, emb = result
    catalog = load_catalog()
    assert set(interp.tasks) == set(catalog)
    assert interp.model.weights_sha256 == tiny_bundle.weights_sha256
    assert interp.model.tokenizer == "clip-bpe" and interp.model.architecture == "tiny"
    assert [c.sop_instance_uid for c in interp.clips] == ["1.2.826.0.1.1", "1.2.826.0.1.2"]
    assert interp.clips[0].frames_used == (0, 2, 4, 6, 8)
    for key in ("preprocess", "encode_image", "scoring", "promptcam", "study_embedding", "total"):
        assert key in interp.timings and interp.timings[key] >= 0
    for r in interp.tasks.values():
        assert len(r.per_clip) == 2 and r.aggregation and r.method
        if r.mode == "binary":
            assert -1 <= r.score <= 1 and r.call == "uncalibrated" and r.threshold is None
        elif r.mode == "regression":
            assert 0 <= r.value <= 100 and r.unit in ("%", "mm[Hg]")
        else:
            assert set(r.scores) <= {lv.name for lv in catalog[r.task_id].levels}
    ef = interp.tasks["ejection_fraction"]
    assert set(ef.derived) == {"lvef_lt_50", "lvef_lt_40", "lvef_lt_30", "hfref"}
    assert ef.derived["lvef_lt_50"] == (ef.value < 50)
    assert any("uncalibrated thresholds" in w for w in interp.warnings)
    # EchoCLIP-R side
    assert emb is not None and emb.shape == (64,)
    assert interp.longitudinal is not None and interp.longitudinal.model.tokenizer == "template"
    # JSON round trip (the SQL / CLI form)
    back = Interpretation.from_json(interp.to_json())
    assert back.tasks == interp.tasks and back.clips == interp.clips


def test_aggregation_matches_direct_computation(result, interpreter):
    interp, _ = result
    clips = make_clips()
    embs = [interpreter.encode_frames(c.frames) for c in clips]
    pooled = np.concatenate(embs)
    for tid in ("pacemaker", "severe_left_atrium_size"):
        P = interpreter.prompt_embeddings(tid).numpy()
        want = float((pooled @ P.T).mean())
        r = interp.tasks[tid]
        assert r.score == pytest.approx(want, abs=1e-5)
        per = [float((e @ P.T).mean()) for e in embs]
        assert [c.score for c in r.per_clip] == pytest.approx(per, abs=1e-5)
        # frame-weighted mean of per-clip scores
        assert r.score == pytest.approx((per[0] * 5 + per[1] * 3) / 8, abs=1e-5)
    ef = interp.tasks["ejection_fraction"]
    cands = interpreter.prompt_embeddings("ejection_fraction").numpy()
    values = [v for _ in range(2) for v in range(101)]
    assert cands.shape[0] == 202
    assert ef.value == pytest.approx(scoring.regression_value(pooled, cands, values), abs=1e-9)
    assert ef.per_clip[1].value == pytest.approx(scoring.regression_value(embs[1], cands, values), abs=1e-9)


def test_batching_does_not_change_embeddings(tiny_bundle, interp_cache, interpreter):
    small = Interpreter(tiny_bundle, cache_dir=interp_cache, batch_size=2, promptcam_tasks=())
    frames = make_clips()[0].frames
    assert np.allclose(small.encode_frames(frames), interpreter.encode_frames(frames), atol=1e-5)


def test_prompt_cache_hit_costs_no_text_encoder_call(tiny_bundle, tmp_path, monkeypatch):
    from echonode.model.clip import CLIP

    calls = {"n": 0}
    orig = CLIP.encode_text

    def counting(self, ids):
        calls["n"] += 1
        return orig(self, ids)

    monkeypatch.setattr(CLIP, "encode_text", counting)
    first = Interpreter(tiny_bundle, cache_dir=tmp_path, promptcam_tasks=())
    assert calls["n"] > 0 and first.text_encoder_calls == calls["n"]
    assert list((tmp_path / "prompt-embeddings").glob("*.npz"))
    calls["n"] = 0
    second = Interpreter(tiny_bundle, cache_dir=tmp_path, promptcam_tasks=())
    assert calls["n"] == 0 and second.text_encoder_calls == 0
    for tid in ("pacemaker", "ejection_fraction"):
        assert torch.equal(first.prompt_embeddings(tid), second.prompt_embeddings(tid))
    # a site prompt not in the cache costs exactly the new text
    cat = load_catalog()
    cat["pacemaker"] = dataclasses.replace(cat["pacemaker"], prompts=cat["pacemaker"].prompts + ("PACER WIRE. ",))
    third = Interpreter(tiny_bundle, cache_dir=tmp_path, promptcam_tasks=(), tasks=cat)
    assert calls["n"] == 1 and third.clip.texts_encoded == 1
    # other weights never reuse these entries
    other = dataclasses.replace(tiny_bundle, weights_sha256="0" * 64)
    calls["n"] = 0
    Interpreter(other, cache_dir=tmp_path, promptcam_tasks=())
    assert calls["n"] > 0


def with_calibration(bundle, tmp_path, tasks, longitudinal=None):
    d = tmp_path / "calibrated"
    shutil.copytree(bundle.path, d)
    cal = {"provenance": {"dataset": "unit-test", "date": "2026-01-01", "n": 10, "tool": "echonode calibrate test"},
           "tasks": {k: {"threshold": v, "auc": 0.9, "n": 10, "sensitivity": 0.8, "specificity": 0.8}
                     for k, v in tasks.items()}}
    if longitudinal:
        cal["longitudinal"] = longitudinal
    (d / "calibration.json").write_text(json.dumps(cal))
    from echonode.model.bundle import Bundle
    return Bundle.open(d)


def test_thresholds_calibrated_published_none(tiny_bundle, tmp_path, interp_cache, result):
    interp, _ = result
    pm = interp.tasks["pacemaker"].score
    b = with_calibration(tiny_bundle, tmp_path, {"pacemaker": pm - 0.01, "impella": 0.99,
                                                 "severe_left_ventricle_dilation": -1.0,
                                                 "moderate_left_ventricle_dilation": 1.0,
                                                 "mild_left_ventricle_dilation": 1.0})
    it = Interpreter(b, cache_dir=interp_cache, promptcam_tasks=())
    out = it.interpret("1.2.3", make_clips())
    assert out.tasks["pacemaker"].threshold_source == "calibrated"
    assert out.tasks["pacemaker"].call == "present"
    assert out.tasks["impella"].call == "absent" and out.tasks["impella"].threshold == 0.99
    assert out.tasks["tavr"].call == "uncalibrated"
    assert out.model.calibration and "unit-test" in out.model.calibration
    lv = out.tasks["left_ventricle_size"]            # graded by the calibrated split tasks
    assert lv.method == scoring.METHOD_CATEGORICAL_THRESHOLD
    assert lv.category == "Severe" and lv.value == 3.0 and lv.threshold_source == "calibrated"
    assert out.longitudinal is None and any("EchoCLIP-R" in w for w in out.warnings)
    # published threshold: only for the published architecture, never for a demo model
    pub = Interpreter(dataclasses.replace(tiny_bundle, architecture="echo-clip"), cache_dir=interp_cache,
                      promptcam_tasks=())
    assert pub.threshold(pub.tasks["pacemaker"]) == (0.298, "published")
    assert pub.threshold(pub.tasks["impella"]) == (None, "uncalibrated")
    tiny = Interpreter(tiny_bundle, cache_dir=interp_cache, promptcam_tasks=())
    assert tiny.threshold(tiny.tasks["pacemaker"]) == (None, "uncalibrated")


def test_regression_candidates_follow_the_models_trained_range(tiny_bundle, interp_cache):
    """A bundle that records the LVEF values its training reports stated ranks only those
    candidates; without a record (published weights) every value 0-100 is a candidate."""
    full = Interpreter(tiny_bundle, cache_dir=interp_cache, promptcam_tasks=())
    assert sorted(set(full._task_texts["ejection_fraction"][1])) == list(range(101))
    narrowed = dataclasses.replace(tiny_bundle, manifest=dict(tiny_bundle.manifest,
                                                              value_ranges={"ejection_fraction": [35, 45]}))
    it = Interpreter(narrowed, cache_dir=interp_cache, promptcam_tasks=())
    prompts, values = it._task_texts["ejection_fraction"]
    assert sorted(set(values)) == list(range(35, 46)) and len(prompts) == 2 * 11
    assert it._task_texts["pulmonary_artery_pressure"] == full._task_texts["pulmonary_artery_pressure"]
    ef = it.interpret("1.2.3", make_clips()).tasks["ejection_fraction"].value
    assert 35 <= ef <= 45


def test_demo_banner_and_priors(tiny_bundle, tiny_bundle_r, interp_cache, result):
    interp, emb = result
    demo = dataclasses.replace(tiny_bundle, demo=True)
    it = Interpreter(demo, tiny_bundle_r, cache_dir=interp_cache, promptcam_tasks=())
    priors = [PriorEmbedding("1.2.1", "20240101", emb, tiny_bundle_r.weights_sha256),
              PriorEmbedding("1.2.2", "20250101", -emb, tiny_bundle_r.weights_sha256),
              PriorEmbedding("1.2.3", "20250601", emb, "f" * 64)]
    out = it.interpret("1.2.826.0.1.99", make_clips(), priors)
    assert out.warnings[0] == DEMO_BANNER and out.demo and out.to_dict()["banner"] == DEMO_BANNER
    lon = out.longitudinal
    sims = {p.study_instance_uid: p for p in lon.priors}
    assert set(sims) == {"1.2.1", "1.2.2"}
    assert sims["1.2.1"].similarity == pytest.approx(1.0, abs=1e-5) and sims["1.2.1"].most_similar
    assert sims["1.2.2"].most_recent and sims["1.2.2"].similarity == pytest.approx(-1.0, abs=1e-5)
    assert lon.possible_patient_mismatch is None          # uncalibrated
    assert any("other EchoCLIP-R weights" in w for w in out.warnings)


def test_rejects_bad_input(interpreter, tiny_bundle):
    bad = ClipInput(ClipRef("1.2.3"), np.zeros((2, 10, 10, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="uint8"):
        interpreter.interpret("1.2", [bad])
    with pytest.raises(ValueError):
        interpreter.interpret("1.2", [])
    with pytest.raises(ValueError, match="template tokenizer"):
        Interpreter(tiny_bundle, tiny_bundle, promptcam_tasks=())


def test_one_clip_failing_preprocessing_is_left_out(interpreter):
    """One bad clip is one bad clip: the study is interpreted from the others, with a warning."""
    good = make_clips(sizes=(4,))[0]
    bad = ClipInput(ClipRef("1.2.826.0.1.99"), np.zeros((2, 10, 10, 3), dtype=np.float32))
    out = interpreter.interpret("1.2", [bad, good])
    assert [c.sop_instance_uid for c in out.clips] == [good.ref.sop_instance_uid]
    assert any(w.startswith("clip 1.2.826.0.1.99 not analysed: preprocessing failed") for w in out.warnings)


# ------------------------------------------------------------------ echonode analyze

YBR_CLIP = "us_multiframe/pydicom__examples_ybr_color.dcm"


def test_analyze_cli_json_and_outputs(tiny_bundle, tiny_bundle_r, realworld_dir, echoclip_data, tmp_path,
                                      monkeypatch, capsys):
    import pydicom

    from echonode.cli import main

    monkeypatch.setenv("ECHONODE_DATA_DIR", str(tmp_path / "data"))
    dcm = realworld_dir / YBR_CLIP
    avi = echoclip_data / "example_video.avi"
    out = tmp_path / "out"
    rc = main(["analyze", str(dcm), str(avi), "--model", str(tiny_bundle.path), "--r-model",
               str(tiny_bundle_r.path), "--json", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    objs = [json.loads(line) for line in captured.out.splitlines() if line.strip()]
    assert len(objs) == 2
    src = pydicom.dcmread(dcm, stop_before_pixels=True)
    by_study = {o["study_instance_uid"]: o for o in objs}
    d = by_study[str(src.StudyInstanceUID)]
    assert d["model"]["weights_sha256"] == tiny_bundle.weights_sha256
    assert set(d["tasks"]) == set(load_catalog())
    pm = d["tasks"]["pacemaker"]
    assert pm["mode"] == "binary" and isinstance(pm["score"], float)
    assert pm["call"] == "uncalibrated" and pm["threshold"] is None and pm["threshold_source"] == "uncalibrated"
    ef = d["tasks"]["ejection_fraction"]
    assert ef["mode"] == "regression" and 0 <= ef["value"] <= 100 and "score" not in ef
    assert d["clips"][0]["sop_instance_uid"] == str(src.SOPInstanceUID)
    n = int(src.NumberOfFrames)
    assert d["clips"][0]["frames_used"] == list(range(0, min(40, n), 2))
    # DICOM study: SR + key-results page + one SC per PromptCAM task, all in the source study
    files = sorted(Path(p).name for p in d["outputs"])
    assert "interpretation.json" in files and sum(f.startswith("SR_") for f in files) == 1
    assert sum(f.startswith("PAGE_") for f in files) == 1
    assert sum(f.startswith("SC_") for f in files) == len(d["promptcams"]) == 4
    assert len(files) == 1 + 1 + 1 + 4   # nothing else (no cine nor PDF unless configured)
    for p in d["outputs"]:
        if p.endswith(".dcm"):
            ds = pydicom.dcmread(p)
            assert ds.StudyInstanceUID == src.StudyInstanceUID
    # video study: pseudo-study, no DICOM outputs, said so on stderr
    v = next(o for o in objs if o is not d)
    assert v["study_instance_uid"].startswith("2.25.")
    assert [Path(p).name for p in v["outputs"]] == ["interpretation.json"]
    assert v["clips"][0]["n_frames"] == 113 and len(v["clips"][0]["frames_used"]) == 20
    assert "no DICOM source" in captured.err


def test_analyze_cli_errors(tiny_bundle, realworld_dir, tmp_path, monkeypatch, capsys):
    from echonode.cli import main

    monkeypatch.setenv("ECHONODE_DATA_DIR", str(tmp_path / "data"))
    dcm = str(realworld_dir / YBR_CLIP)
    assert main(["analyze", str(tmp_path / "missing.dcm"), "--model", str(tiny_bundle.path)]) == 2
    assert main(["analyze", dcm, "--model", str(tmp_path)]) == 3              # not a bundle
    bad = tmp_path / "tasks.toml"
    bad.write_text("[tasks.pacemaker]\nmode = 'ternary'\n")
    monkeypatch.setenv("ECHONODE_MODEL__TASKS_FILE", str(bad))
    assert main(["analyze", dcm, "--model", str(tiny_bundle.path)]) == 3
    assert "tasks.toml:2" in capsys.readouterr().err
    monkeypatch.delenv("ECHONODE_MODEL__TASKS_FILE")
    # the readable table
    assert main(["analyze", dcm, "--model", str(tiny_bundle.path), "--no-promptcam"]) == 0
    out = capsys.readouterr().out
    assert "Pacemaker or ICD lead" in out and "uncalibrated" in out and "not a diagnosis" in out
    # a damaged file (struct.error inside pydicom) is reported, not a traceback
    broken = tmp_path / "broken.dcm"
    broken.write_bytes((realworld_dir / YBR_CLIP).read_bytes()[:154])
    assert main(["analyze", str(broken), "--model", str(tiny_bundle.path)]) == 1
    assert "broken.dcm: not a readable DICOM file" in capsys.readouterr().err


def test_bf16_autocast_path(tiny_bundle, tmp_path):
    """precision="bf16" (meant for CUDA) runs end to end; on CPU it uses CPU autocast."""
    cat = load_catalog()
    few = {k: cat[k] for k in ("pacemaker", "right_atrial_pressure")}
    it = Interpreter(tiny_bundle, precision="bf16", cache_dir=tmp_path, promptcam_tasks=("pacemaker",), tasks=few)
    out = it.interpret("1.2.3", make_clips(sizes=(3,)))
    size = tiny_bundle.config.image_size
    assert len(out.promptcams) == 1 and out.promptcams[0].heatmap.shape == (size, size)
    fp32 = Interpreter(tiny_bundle, cache_dir=tmp_path, promptcam_tasks=(), tasks=few)
    ref = fp32.interpret("1.2.3", make_clips(sizes=(3,)))
    assert out.tasks["pacemaker"].score == pytest.approx(ref.tasks["pacemaker"].score, abs=0.05)
    # bf16 and fp32 prompt embeddings are cached separately
    assert len(list((tmp_path / "prompt-embeddings").glob("*.npz"))) == 2
    with pytest.raises(ValueError, match="precision"):
        Interpreter(tiny_bundle, precision="fp16", promptcam_tasks=())
