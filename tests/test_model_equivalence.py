"""echonode's CLIP against open_clip on shared random weights (fp32, CPU).

The echo-clip-size part builds open_clip's ``convnext_base`` (the published architecture),
writes its state dict as a published-layout bundle, loads it through echonode and compares
embeddings on real frames (example_video.avi) and on every prompt of the paper.
"""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch

from echonode.model.clip import build_model
from echonode.model.configs import get_config
from echonode.model.preprocess import preprocess_frames, sample_indices
from echonode.model.tokenize import ClipBPETokenizer, TemplateTokenizer

open_clip = pytest.importorskip("open_clip")

ATOL = 1e-5


def video_rgb(path, indices):
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, f = cap.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(f, cv2.COLOR_BGR2RGB))
    cap.release()
    return np.stack([frames[i] for i in indices])


def paper_prompts(catalog: dict, values=(0, 37, 100)) -> list[str]:
    """Every label source / tester of the paper, templates filled with a few values."""
    out = []
    for task in catalog.values():
        for key in ("label_sources", "testers"):
            for p in task.get(key, []):
                out.extend([p.replace("<#>", str(v)) for v in values] if "<#>" in p else [p])
    return list(dict.fromkeys(out))


@pytest.fixture(scope="module")
def frames(echoclip_data):
    idx = sample_indices(113)[:3]
    return preprocess_frames(video_rgb(echoclip_data / "example_video.avi", idx))


def max_abs(a, b):
    return float((a - b).abs().max())


def test_tiny_matches_open_clip_config_of_same_shape(tiny_bundle, frames, prompt_texts):
    cfg = get_config("tiny")
    oc = open_clip.model.CLIP(**cfg.open_clip_model_cfg()).eval()
    ours = tiny_bundle.load_model()
    from safetensors.torch import load_file

    assert tiny_bundle.weights_path.suffix == ".safetensors"
    oc.load_state_dict(load_file(str(tiny_bundle.weights_path)))
    tok = ClipBPETokenizer()
    ids = tok(prompt_texts)
    with torch.no_grad():
        assert max_abs(ours.encode_image(frames), oc.encode_image(frames)) <= ATOL
        assert max_abs(ours.encode_text(ids), oc.encode_text(ids)) <= ATOL
        # template ids (EchoCLIP-R style) pool at EOS 908 in both
        tids = TemplateTokenizer()(prompt_texts[:50])
        assert max_abs(ours.encode_text(tids), oc.encode_text(tids)) <= ATOL
        # the forward used for training agrees with open_clip's normalised features
        img, txt, scale = ours(frames, ids[:3])
        oimg, otxt, oscale = oc(frames, ids[:3])
        assert max_abs(img, oimg) <= ATOL and max_abs(txt, otxt) <= ATOL and abs(float(scale - oscale)) < 1e-6


def test_tiny_keys_and_sizes(tiny_bundle):
    sd = build_model("tiny").state_dict()
    oc = open_clip.model.CLIP(**get_config("tiny").open_clip_model_cfg()).state_dict()
    assert set(sd) == set(oc) and all(sd[k].shape == oc[k].shape for k in sd)
    assert sum(v.numel() for v in sd.values()) < 4_000_000  # ≤ 8 MB in fp16 (shipped demo model)


def test_bf16_precision_runs(tiny_bundle, frames):
    m32 = tiny_bundle.load_model(precision="fp32")
    m16 = tiny_bundle.load_model(precision="bf16")
    assert m16.dtype == torch.bfloat16 and not m16.training
    with torch.no_grad():
        a, b = m32.encode_image(frames), m16.encode_image(frames)
    assert b.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    assert float(cos.min()) > 0.98


def test_echo_clip_matches_open_clip_convnext_base(openclip_convnext_base, echoclip_bundle_random, frames,
                                                   echoclip_data):
    oc = openclip_convnext_base
    bundle = echoclip_bundle_random
    assert bundle.weights_path.name == "open_clip_pytorch_model.bin"
    sd = torch.load(bundle.weights_path, weights_only=True, mmap=True)
    assert len(sd) == 493
    assert sum(v.numel() for v in sd.values()) == 151_518_849
    del sd
    ours = bundle.load_model()
    assert not ours.training
    catalog = json.loads((echoclip_data / "prompts_used.json").read_text())
    prompts = paper_prompts(catalog)
    ids = ClipBPETokenizer()(prompts)
    assert torch.equal(ids, open_clip.tokenize(prompts))
    with torch.no_grad():
        assert max_abs(ours.encode_image(frames), oc.encode_image(frames)) <= ATOL
        for i in range(0, len(prompts), 32):
            batch = ids[i:i + 32]
            assert max_abs(ours.encode_text(batch), oc.encode_text(batch)) <= ATOL, prompts[i:i + 32]


def test_chunked_encoding_equals_single_batch(tiny_bundle):
    m = tiny_bundle.load_model()
    x = torch.randn(11, 3, 224, 224)
    ids = ClipBPETokenizer()([f"LV EJECTION FRACTION IS {i}%. " for i in range(70)])
    with torch.no_grad():
        m.image_chunk, m.text_chunk = 4, 16
        a_img, a_txt = m.encode_image(x), m.encode_text(ids)
        m.image_chunk, m.text_chunk = 64, 128
        b_img, b_txt = m.encode_image(x), m.encode_text(ids)
    assert max_abs(a_img, b_img) <= 1e-5 and max_abs(a_txt, b_txt) <= 1e-5
