"""``echonode models`` and ``echonode embed`` end to end (in-process CLI)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from echonode.cli import main
from echonode.model.bundle import PINNED_WEIGHTS_SHA256


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("ECHONODE_CONFIG", raising=False)
    monkeypatch.setenv("ECHONODE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("ECHONODE_MODEL__ALLOW_DEMO_MODEL", "false")
    return tmp_path / "data"


def run_json(capsys, argv):
    rc = main(argv)
    out = capsys.readouterr()
    return rc, (json.loads(out.out) if out.out.strip() else None), out.err


def test_import_list_verify_corrupt(tiny_bundle, data_dir, capsys):
    rc, info, _ = run_json(capsys, ["models", "import", "--name", "mine", "--architecture", "tiny",
                                    "--weights", str(tiny_bundle.weights_path), "--json"])
    assert rc == 0 and info["weights_sha256"] == tiny_bundle.weights_sha256
    rc, listing, _ = run_json(capsys, ["models", "list", "--json"])
    assert rc == 0 and [b["name"] for b in listing["bundles"]] == ["mine"]
    assert listing["bundles"][0]["status"] == "ok"
    rc, ver, _ = run_json(capsys, ["models", "verify", "mine", "--json"])
    assert rc == 0 and ver["ok"]
    w = data_dir / "models" / "mine" / "open_clip_model.safetensors"
    raw = bytearray(w.read_bytes())
    raw[-10] ^= 1
    w.write_bytes(bytes(raw))
    rc = main(["models", "verify", str(data_dir / "models" / "mine")])
    out = capsys.readouterr().out
    assert rc == 1 and "FAIL" in out and tiny_bundle.weights_sha256 in out and str(w) in out
    assert main(["models", "list"]) == 1
    capsys.readouterr()


def test_import_pinned_name_with_other_weights_fails(tiny_bundle, data_dir, capsys):
    rc = main(["models", "import", "--name", "echo-clip-r", "--weights", str(tiny_bundle.weights_path)])
    err = capsys.readouterr().err
    assert rc == 1 and PINNED_WEIGHTS_SHA256["echo-clip-r"] in err
    assert not (data_dir / "models" / "echo-clip-r").exists()


def test_import_usage_errors(data_dir, capsys, tmp_path):
    assert main(["models", "import", "--name", "../evil", "--weights", str(tmp_path / "x")]) == 2
    assert main(["models", "import", "--name", "a", "--weights", str(tmp_path / "missing.bin")]) == 1
    assert main(["embed"]) == 2
    with pytest.raises(SystemExit) as exc:
        main(["models", "import", "--name", "a"])
    assert exc.value.code == 2
    capsys.readouterr()


def test_download_offline_fails_cleanly(data_dir, capsys, monkeypatch):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    rc = main(["models", "download", "echo-clip-r"])
    err = capsys.readouterr().err
    assert rc == 1 and "Hugging Face Hub" in err and "models import" in err
    assert not (data_dir / "models" / "echo-clip-r").exists()


def test_embed_texts_and_video(tiny_bundle, data_dir, echoclip_data, capsys):
    video = echoclip_data / "example_video.avi"
    texts = ["SEVERE DILATED LEFT VENTRICLE. ", "LV EJECTION FRACTION IS 55%. "]
    rc, out, _ = run_json(capsys, ["embed", "--model", str(tiny_bundle.path), "--text", texts[0], "--text", texts[1],
                                   str(video), "--json"])
    assert rc == 0
    assert [t["text"] for t in out["texts"]] == texts
    emb = np.array([t["embedding"] for t in out["texts"]])
    assert emb.shape == (2, 64) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    model = tiny_bundle.load_model()
    with torch.no_grad():
        ref = F.normalize(model.encode_text(tiny_bundle.tokenizer()(texts)), dim=-1).numpy()
    assert np.allclose(emb, ref, atol=1e-5)
    f = out["files"][0]
    frames = np.array(f["frames"])
    assert f["indices"] == list(range(0, 40, 2)) and frames.shape == (20, 64) and f["n_frames"] == 113
    assert np.allclose(np.linalg.norm(frames, axis=1), 1, atol=1e-5)
    assert np.allclose(frames.mean(0), f["mean"], atol=1e-6)
    # human-readable form prints the cosine table
    assert main(["embed", "--model", str(tiny_bundle.path), "--text", texts[0], str(video)]) == 0
    assert "cosine(mean" in capsys.readouterr().out


def test_embed_template_bundle_and_dicom(tiny_bundle_r, data_dir, realworld_dir, capsys):
    dcm = realworld_dir / "us_multiframe" / "pydicom__examples_ybr_color.dcm"
    rc, out, err = run_json(capsys, ["embed", "--model", str(tiny_bundle_r.path), "--text", "moderate effusion",
                                     str(dcm), "--json"])
    assert rc == 0 and "could not represent" in err
    assert out["model"]["tokenizer_kind"] == "template"
    assert len(out["files"][0]["frames"]) == 15 and out["files"][0]["n_frames"] == 30  # frames 0,2,…,28


def test_embed_bad_file_is_failure(tiny_bundle, data_dir, tmp_path, capsys):
    bad = tmp_path / "junk.dcm"
    bad.write_bytes(b"\0" * 200)
    rc = main(["embed", "--model", str(tiny_bundle.path), str(bad), "--json"])
    captured = capsys.readouterr()
    assert rc == 1 and "junk.dcm" in captured.err


def test_embed_all_frames(tiny_bundle_r, data_dir, realworld_dir, capsys):
    dcm = realworld_dir / "us_multiframe" / "pydicom__examples_ybr_color.dcm"
    rc, out, _ = run_json(capsys, ["embed", "--model", str(tiny_bundle_r.path), "--all-frames", str(dcm), "--json"])
    assert rc == 0 and out["files"][0]["indices"] == list(range(30)) and out["texts"] == []
