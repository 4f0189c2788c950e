"""Model bundles: layout, checksums, pinning, strict loading, calibration, lookup."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from echonode.config import load_settings
from echonode.model import bundle as bmod
from echonode.model.bundle import (PINNED_WEIGHTS_SHA256, Bundle, BundleError, import_bundle, resolve_model,
                                   write_bundle, write_calibration)
from echonode.model.configs import get_config

CALIBRATION = {
    "provenance": {"dataset": "phantom-test", "date": "2026-11-28T00:00:00Z", "n": 40, "tool": "echonode calibrate 0.1.0"},
    "tasks": {"pacemaker": {"threshold": 0.31, "auc": 0.9, "n": 40, "sensitivity": 0.8, "specificity": 0.85}},
    "longitudinal": {"same_patient_threshold": 0.7, "change_threshold": 0.5, "auc": 0.8, "n": 20},
}


def copy_bundle(b: Bundle, dest):
    shutil.copytree(b.path, dest)
    (dest / bmod.VERIFY_CACHE).unlink(missing_ok=True)
    return dest


def test_tiny_bundle_layout(tiny_bundle):
    names = {p.name for p in tiny_bundle.path.iterdir()}
    assert {"open_clip_config.json", "open_clip_model.safetensors", "echonode.json"} <= names
    man = json.loads((tiny_bundle.path / "echonode.json").read_text())
    assert man["architecture"] == "tiny" and man["tokenizer_kind"] == "clip-bpe" and man["demo"] is False
    assert set(man["files"]) == {"open_clip_config.json", "open_clip_model.safetensors"}
    cfg = json.loads((tiny_bundle.path / "open_clip_config.json").read_text())
    assert cfg["model_cfg"] == get_config("tiny").open_clip_model_cfg()
    assert cfg["preprocess_cfg"]["mean"] == [0.48145466, 0.4578275, 0.40821073]
    assert tiny_bundle.weights_sha256 == man["files"]["open_clip_model.safetensors"]["sha256"]
    assert len(tiny_bundle.weights_sha256) == 64 and tiny_bundle.calibration is None


def test_open_is_cheap_and_cached(tiny_bundle, monkeypatch):
    calls = []
    real = bmod.sha256_file
    monkeypatch.setattr(bmod, "sha256_file", lambda p, *a, **k: calls.append(p) or real(p, *a, **k))
    Bundle.open(tiny_bundle.path)
    assert calls == []  # hashes cached by size + mtime from the first open
    Bundle.open(tiny_bundle.path).verify(full=True)
    assert len(calls) == 2


def test_corrupted_weights_name_file_and_expected(tiny_bundle, tmp_path):
    d = copy_bundle(tiny_bundle, tmp_path / "b")
    w = d / "open_clip_model.safetensors"
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(BundleError) as exc:
        Bundle.open(d)
    msg = str(exc.value)
    assert str(w) in msg and tiny_bundle.weights_sha256 in msg


def test_truncated_and_missing_files(tiny_bundle, tmp_path):
    d = copy_bundle(tiny_bundle, tmp_path / "b")
    w = d / "open_clip_model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    with pytest.raises(BundleError, match="size 1000 bytes"):
        Bundle.open(d)
    w.unlink()
    with pytest.raises(BundleError, match="file missing"):
        Bundle.open(d)
    with pytest.raises(BundleError, match="not found"):
        Bundle.open(tmp_path / "nowhere")


def test_modified_config_is_detected(tiny_bundle, tmp_path):
    d = copy_bundle(tiny_bundle, tmp_path / "b")
    (d / "open_clip_config.json").write_text((d / "open_clip_config.json").read_text().replace("64", "65"))
    with pytest.raises(BundleError, match="open_clip_config.json"):
        Bundle.open(d)


def test_pinned_name_requires_published_weights(tiny_state_dict, tmp_path):
    with pytest.raises(BundleError) as exc:
        write_bundle(tmp_path / "r", tiny_state_dict, name="echo-clip-r", architecture="tiny",
                     tokenizer_kind="template")
    assert PINNED_WEIGHTS_SHA256["echo-clip-r"] in str(exc.value)


def test_strict_keys(tiny_state_dict, tmp_path):
    extra = dict(tiny_state_dict, **{"visual.extra.weight": torch.zeros(1)})
    with pytest.raises(BundleError, match="unexpected key.*visual.extra.weight"):
        write_bundle(tmp_path / "x", extra, name="x", architecture="tiny", tokenizer_kind="clip-bpe")
    missing = {k: v for k, v in tiny_state_dict.items() if k != "ln_final.weight"}
    with pytest.raises(BundleError, match="missing key.*ln_final.weight"):
        write_bundle(tmp_path / "y", missing, name="y", architecture="tiny", tokenizer_kind="clip-bpe")
    with pytest.raises(BundleError, match="shape mismatch|missing key"):
        write_bundle(tmp_path / "z", tiny_state_dict, name="z", architecture="echo-clip", tokenizer_kind="clip-bpe")
    assert not (tmp_path / "x").exists()


def test_config_must_match_architecture(tiny_bundle, tmp_path):
    d = copy_bundle(tiny_bundle, tmp_path / "b")
    man = json.loads((d / "echonode.json").read_text())
    man["architecture"] = "echo-clip"
    (d / "echonode.json").write_text(json.dumps(man))
    with pytest.raises(BundleError, match="does not describe architecture 'echo-clip'"):
        Bundle.open(d)


def test_import_bin_with_wrappers_loads_same_model(tiny_bundle, tiny_state_dict, tmp_path):
    wrapped = {"state_dict": {"module." + k: v for k, v in tiny_state_dict.items()}}
    src = tmp_path / "ckpt.pt"
    torch.save(wrapped, src)
    b = import_bundle(tmp_path / "models" / "mine", src, name="mine", architecture="tiny")
    assert b.weights_path.name == "open_clip_pytorch_model.bin" and b.tokenizer_kind == "clip-bpe"
    x = torch.randn(2, 3, 224, 224)
    ids = b.tokenizer()(["severe dilated left ventricle. ", "normal"])
    m1, m2 = b.load_model(), tiny_bundle.load_model()
    with torch.no_grad():
        assert torch.equal(m1.encode_image(x), m2.encode_image(x))
        assert torch.equal(m1.encode_text(ids), m2.encode_text(ids))


def test_import_refuses_garbage_and_cleans_up(tmp_path):
    src = tmp_path / "bad.bin"
    src.write_bytes(b"not a checkpoint")
    with pytest.raises(BundleError, match="cannot read weights"):
        import_bundle(tmp_path / "m" / "bad", src, name="bad", architecture="tiny")
    assert not (tmp_path / "m" / "bad").exists()


def test_template_bundle_reads_vocab_from_bundle(tiny_state_dict, tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("<#> DILATED LEFT VENTRICLE. \nNORMAL LEFT VENTRICULAR SIZE. ")
    b = write_bundle(tmp_path / "r", tiny_state_dict, name="tiny-r", architecture="tiny", tokenizer_kind="template",
                     template_vocab=vocab)
    tok = b.tokenizer()
    # 2 phrases → ids 5, 6; variables start at 7; BOS = 7 + 132
    assert [i for i in tok.encode("SEVERE DILATED LEFT VENTRICLE. ").ids if i] == [139, 5, 7 + 109, 140]
    assert b.template_vocab_path == b.path / "template_vocab.txt"


def test_plain_directory_without_manifest(tiny_bundle, tmp_path):
    d = tmp_path / "hub-download"
    d.mkdir()
    shutil.copy(tiny_bundle.path / "open_clip_config.json", d)
    shutil.copy(tiny_bundle.weights_path, d)
    b = Bundle.open(d)
    assert b.tokenizer_kind == "clip-bpe" and b.architecture == "custom" and b.weights_sha256 == tiny_bundle.weights_sha256
    assert b.load_model().config.text.width == 64


def test_calibration_roundtrip_and_validation(tiny_bundle, tmp_path):
    d = copy_bundle(tiny_bundle, tmp_path / "b")
    write_calibration(d, CALIBRATION)
    b = Bundle.open(d)
    assert b.calibration["tasks"]["pacemaker"]["threshold"] == 0.31
    assert "calibration.json" in b.manifest["files"]
    (d / "calibration.json").write_text(json.dumps({"tasks": {}}))
    with pytest.raises(BundleError, match="calibration.json"):
        Bundle.open(d)
    with pytest.raises(BundleError, match="threshold must be a number"):
        write_calibration(d, dict(CALIBRATION, tasks={"x": {"threshold": "high"}}))


def test_value_ranges_recorded_and_validated(tiny_state_dict, tmp_path):
    b = write_bundle(tmp_path / "v", tiny_state_dict, name="v", architecture="tiny", tokenizer_kind="clip-bpe",
                     value_ranges={"ejection_fraction": [12, 78]})
    assert b.value_range("ejection_fraction") == (12, 78)
    assert b.value_range("pulmonary_artery_pressure") is None          # not recorded: the task's own range
    assert b.info()["value_ranges"] == {"ejection_fraction": [12, 78]}
    assert Bundle.open(b.path).value_range("ejection_fraction") == (12, 78)
    man = json.loads((b.path / "echonode.json").read_text())
    man["value_ranges"] = {"ejection_fraction": [80, 20]}
    (b.path / "echonode.json").write_text(json.dumps(man))
    with pytest.raises(BundleError, match="lo <= hi"):
        Bundle.open(b.path)
    with pytest.raises(BundleError, match="integers"):
        write_bundle(tmp_path / "w", tiny_state_dict, name="w", architecture="tiny", tokenizer_kind="clip-bpe",
                     value_ranges={"ejection_fraction": ["low", 50]})
    plain = write_bundle(tmp_path / "p", tiny_state_dict, name="p", architecture="tiny", tokenizer_kind="clip-bpe")
    assert "value_ranges" not in plain.manifest and plain.value_range("ejection_fraction") is None


def test_fp16_storage_loads_in_fp32(tiny_state_dict, tmp_path):
    b = write_bundle(tmp_path / "h", tiny_state_dict, name="h", architecture="tiny", tokenizer_kind="clip-bpe",
                     dtype="fp16", demo=True)
    n_float = sum(v.numel() for v in tiny_state_dict.values() if v.is_floating_point())
    assert b.demo and b.weights_path.stat().st_size < 2 * n_float + 100_000   # 2 bytes a weight (+ header)
    m = b.load_model()
    assert m.dtype == torch.float32 and m.attn_mask.dtype == torch.float32


def test_resolve_model(tiny_bundle, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(tiny_bundle.path, models / "echo-clip")
    s = load_settings(env={}, overrides={"data_dir": str(tmp_path), "model": {"allow_demo_model": False}})
    b = resolve_model(s, "clip")
    assert b is not None and b.path == (models / "echo-clip").resolve()
    assert resolve_model(s, "r") is None
    s2 = load_settings(env={}, overrides={"data_dir": str(tmp_path / "other"),
                                          "model": {"r_model": str(models / "echo-clip"), "allow_demo_model": False}})
    assert resolve_model(s2, "clip") is None
    assert resolve_model(s2, "r").name == "tiny"
    with pytest.raises(ValueError):
        resolve_model(s, "x")


def test_import_from_published_folder(tiny_bundle, tmp_path):
    folder = tmp_path / "download"
    folder.mkdir()
    shutil.copy(tiny_bundle.path / "open_clip_config.json", folder)
    shutil.copy(tiny_bundle.weights_path, folder)
    (folder / "tokenizer.json").write_text("{}")
    b = import_bundle(tmp_path / "m" / "tiny2", folder, name="tiny2", architecture="tiny")
    assert b.weights_sha256 == tiny_bundle.weights_sha256 and b.config == tiny_bundle.config


def test_overwrite_replaces_old_files(tiny_bundle, tiny_state_dict, tmp_path):
    d = copy_bundle(tiny_bundle, tmp_path / "b")
    write_calibration(d, CALIBRATION)
    with pytest.raises(BundleError, match="not empty"):
        write_bundle(d, tiny_state_dict, name="b", architecture="tiny", tokenizer_kind="clip-bpe", weights_format="bin")
    b = write_bundle(d, tiny_state_dict, name="b", architecture="tiny", tokenizer_kind="clip-bpe", weights_format="bin",
                     overwrite=True)
    assert set(b.manifest["files"]) == {"open_clip_config.json", "open_clip_pytorch_model.bin"}
    assert b.calibration is None and not (d / "open_clip_model.safetensors").exists()
