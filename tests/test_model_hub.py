"""``models download`` logic against a local stand-in for the Hub (no network is touched)."""

from __future__ import annotations

import hashlib
import shutil
import types

import pytest

from echonode.model import hub
from echonode.model.bundle import PINNED_WEIGHTS_SHA256, BundleError

FULL = "2c66a65" + "0" * 33


def fake_hub(src_dir, lfs_override=None):
    files = {p.name: p for p in src_dir.iterdir() if p.is_file()}
    calls = []

    class Api:
        def list_repo_commits(self, repo_id):
            calls.append(("commits", repo_id))
            return [types.SimpleNamespace(commit_id="f" * 40), types.SimpleNamespace(commit_id=FULL)]

        def model_info(self, repo_id, revision=None, files_metadata=False):
            calls.append(("info", repo_id, revision))
            sib = []
            for name, p in files.items():
                sha = (lfs_override or {}).get(name, hashlib.sha256(p.read_bytes()).hexdigest())
                sib.append(types.SimpleNamespace(rfilename=name, lfs=types.SimpleNamespace(sha256=sha)
                                                 if name.endswith(".bin") else None))
            return types.SimpleNamespace(siblings=sib)

    def hf_hub_download(repo_id, filename, revision=None, local_dir=None):
        calls.append(("download", filename, revision))
        dest = f"{local_dir}/{filename}"
        shutil.copyfile(files[filename], dest)
        return dest

    return types.SimpleNamespace(HfApi=Api, hf_hub_download=hf_hub_download), calls


@pytest.fixture
def published_dir(tiny_bundle, tmp_path, tiny_state_dict):
    import torch

    d = tmp_path / "hub"
    d.mkdir()
    shutil.copy(tiny_bundle.path / "open_clip_config.json", d)
    torch.save(tiny_state_dict, d / "open_clip_pytorch_model.bin")
    return d


def test_download_resolves_short_revision_and_verifies(published_dir, tmp_path, monkeypatch):
    fake, calls = fake_hub(published_dir)
    monkeypatch.setattr(hub, "_hub", lambda: fake)
    monkeypatch.setitem(hub.PUBLISHED, "tiny-pub", hub.Published("tiny-pub", "someone/tiny", "2c66a65", "tiny",
                                                                 "clip-bpe"))
    b = hub.download("tiny-pub", tmp_path / "models" / "tiny-pub")
    assert ("info", "someone/tiny", FULL) in calls
    assert b.manifest["revision"] == FULL and b.source == f"hf-hub:someone/tiny@{FULL}"
    assert b.weights_sha256 == hashlib.sha256((published_dir / "open_clip_pytorch_model.bin").read_bytes()).hexdigest()
    assert not any(p.name.startswith(".tiny-pub") for p in (tmp_path / "models").iterdir())
    with pytest.raises(BundleError, match="already exists"):
        hub.download("tiny-pub", tmp_path / "models" / "tiny-pub")


def test_download_checksum_mismatch_leaves_nothing(published_dir, tmp_path, monkeypatch):
    fake, _ = fake_hub(published_dir, lfs_override={"open_clip_pytorch_model.bin": "ab" * 32})
    monkeypatch.setattr(hub, "_hub", lambda: fake)
    monkeypatch.setitem(hub.PUBLISHED, "tiny-pub", hub.Published("tiny-pub", "someone/tiny", "e" * 40, "tiny",
                                                                 "clip-bpe"))
    with pytest.raises(BundleError, match="ab" * 32):
        hub.download("tiny-pub", tmp_path / "models" / "tiny-pub")
    assert list((tmp_path / "models").iterdir()) == []


def test_download_echo_clip_r_enforces_pinned_checksum(published_dir, tmp_path, monkeypatch):
    fake, calls = fake_hub(published_dir)
    monkeypatch.setattr(hub, "_hub", lambda: fake)
    with pytest.raises(BundleError, match=PINNED_WEIGHTS_SHA256["echo-clip-r"]):
        hub.download("echo-clip-r", tmp_path / "models" / "echo-clip-r")
    assert ("info", "mkaichristensen/echo-clip-r", "271e00685543ed609f67b2b97c3f81228af1452b") in calls
    assert list((tmp_path / "models").iterdir()) == []


def test_unknown_name():
    with pytest.raises(BundleError, match="unknown published model"):
        hub.download("nope", "/tmp/x")
