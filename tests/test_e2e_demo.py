"""``echonode demo``: phantom studies through the whole loop (temporary node, embedded
broker, its own worker, local Orthanc), and the DEMO MODEL banner everywhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from echonode.interpretation import DEMO_BANNER
from tests.fixtures.node import ROOT


@pytest.fixture(scope="module")
def demo_bundle(tmp_path_factory):
    """The shipped demo model when present, else a tiny random bundle flagged demo."""
    from echonode.pipeline.modelsel import DEMO_MODEL_DIR
    if (DEMO_MODEL_DIR / "echonode.json").is_file():
        return None
    torch = pytest.importorskip("torch")
    from echonode.model.bundle import write_bundle
    from echonode.model.clip import build_model

    torch.manual_seed(7)
    return write_bundle(tmp_path_factory.mktemp("demo") / "demo-tiny", build_model("tiny").state_dict(),
                        name="demo-tiny", architecture="tiny", tokenizer_kind="clip-bpe", demo=True).path


def test_demo_end_to_end(tmp_path, demo_bundle):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ECHONODE_")}
    env["ECHONODE_DATA_DIR"] = str(tmp_path / "user")       # the user's (empty) installation
    env["PYTHONPATH"] = str(ROOT)
    cmd = [sys.executable, "-m", "echonode", "demo", "--studies", "2", "--json", "--data-dir", str(tmp_path / "demo"),
           "--timeout", "240"]
    if demo_bundle is not None:
        cmd += ["--model", str(demo_bundle)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=str(ROOT))
    assert res.returncode == 0, res.stderr[-4000:]
    assert DEMO_BANNER in res.stderr                          # console
    report = json.loads(res.stdout)
    assert report["demo"] is True and report["pacs"] == "orthanc"
    assert len(report["studies"]) == 2
    for st in report["studies"]:
        assert st["state"] == "done"
        assert st["interpretation"]["banner"] == DEMO_BANNER
        kinds = {o["sop_class_uid"] for o in st["in_pacs"]}
        assert "1.2.840.10008.5.1.4.1.1.88.34" in kinds, st["in_pacs"]   # SR back in the same study
        assert any(k.startswith("1.2.840.10008.5.1.4.1.1.7") for k in kinds)  # overlay
        # the results, listed as keys of the node's store
        keys = st["result_keys"]
        assert keys and all(k.startswith(f"results/{st['study_instance_uid']}/") for k in keys), keys
        assert all((tmp_path / "demo" / "node" / k).is_file() for k in keys)   # the local store: data_dir/<key>
    # the second study is the same patient a year later
    assert report["studies"][0]["patient"] == report["studies"][1]["patient"]
    # SR and overlays say DEMO MODEL too
    import pydicom
    results = tmp_path / "demo" / "node" / "results"
    for f in results.rglob("*.dcm"):
        ds = pydicom.dcmread(f)
        text = str(ds)
        assert "DEMO MODEL" in text or "NOT FOR CLINICAL USE" in text, f"{f.name} does not say DEMO MODEL"


def test_demo_refuses_a_missing_model(tmp_path):
    """An explicit --model that is not there: a clear message and exit 1 (never a silent fallback)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ECHONODE_")}
    env["ECHONODE_DATA_DIR"] = str(tmp_path / "user")
    env["PYTHONPATH"] = str(ROOT)
    res = subprocess.run([sys.executable, "-m", "echonode", "demo", "--no-orthanc", "--model", str(tmp_path / "none"),
                          "--data-dir", str(tmp_path / "demo")], capture_output=True, text=True, env=env,
                         timeout=120, cwd=str(ROOT))
    assert res.returncode == 1 and "no model bundle there" in res.stderr and "echonode models import" in res.stderr
