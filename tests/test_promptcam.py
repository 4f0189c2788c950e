"""PromptCAM against a direct Grad-CAM computation on the tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from echonode.interpret.engine import ClipInput, Interpreter
from echonode.interpret.promptcam import (
    ActivationCapture,
    head_from_activation,
    postprocess,
    promptcam,
    promptcam_from_activation,
    target_layer,
)
from echonode.interpretation import ClipRef
from echonode.model.preprocess import crop_and_scale


@pytest.fixture(scope="module")
def model(tiny_bundle):
    return tiny_bundle.load_model()


def frame_tensor(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 3, 224, 224, generator=g)


def direct_gradcam(model, x, target):
    """Textbook Grad-CAM: full forward with a hook, backward seeded by the prompt embedding."""
    store = {}
    layer = model.visual.trunk.stages[-1].blocks[-1]
    h = layer.register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        xx = x.clone().requires_grad_(True)
        emb = model.visual(xx)
        store["a"].retain_grad()
        emb.backward(target.reshape(1, -1))
    finally:
        h.remove()
        for p in model.parameters():
            p.requires_grad_(True)
    a, g = store["a"][0].detach(), store["a"].grad[0]
    alpha = g.mean(dim=(1, 2))
    cam = torch.relu(sum(alpha[c] * a[c] for c in range(a.shape[0])))
    up = F.interpolate(cam[None, None], size=(224, 224), mode="bicubic", align_corners=False)[0, 0].numpy()
    up = gaussian_filter(up.astype(np.float64), sigma=0.02 * 224)
    return ((up - up.min()) / (up.max() - up.min())).astype(np.float32)


def test_head_split_reproduces_embedding(model):
    x = frame_tensor()
    with torch.inference_mode(), ActivationCapture(model) as cap:
        emb = model.encode_image(x)
    act = cap.activations()
    with torch.no_grad():
        again = head_from_activation(model, act.clone())
    assert torch.allclose(again, emb, atol=1e-5)


def test_promptcam_matches_direct_gradcam(model):
    x = frame_tensor(1)
    target = F.normalize(torch.randn(64, generator=torch.Generator().manual_seed(2)), dim=0)
    want = direct_gradcam(model, x, target)
    full, s_full = promptcam(model, x, target)
    with torch.inference_mode(), ActivationCapture(model) as cap:
        emb = model.encode_image(x)
    fast, s_fast = promptcam_from_activation(model, cap.activations()[0], target, (224, 224))
    assert full.shape == fast.shape == (224, 224) and full.dtype == np.float32
    assert float(full.min()) == 0.0 and float(full.max()) == pytest.approx(1.0)
    assert np.abs(full - want).max() < 1e-4
    assert np.abs(fast - want).max() < 1e-4
    assert s_full == pytest.approx(float(emb[0] @ target), abs=1e-4) == pytest.approx(s_fast, abs=1e-4)
    assert all(p.grad is None for p in model.parameters())   # no parameter gradients kept
    assert full.std() > 0.01                                  # a real map, not a constant


def test_postprocess_localises_and_handles_flat_maps():
    cam = torch.zeros(7, 7)
    cam[1, 5] = 1.0
    heat = postprocess(cam, (224, 224))
    y, x = np.unravel_index(np.argmax(heat), heat.shape)
    assert 16 <= y <= 64 and 160 <= x <= 208     # cell (1, 5) of a 7x7 grid over 224 px
    assert np.all(postprocess(torch.zeros(7, 7), (224, 224)) == 0)


def test_target_layer_error():
    with pytest.raises(ValueError, match="ConvNeXt"):
        target_layer(torch.nn.Linear(2, 2))


def test_interpreter_promptcam_on_best_frame(tiny_bundle):
    it = Interpreter(tiny_bundle, promptcam_tasks=("pacemaker", "ejection_fraction", "not_a_task"))
    rng = np.random.default_rng(3)
    clips = [ClipInput(ClipRef(f"1.2.{i}", frames_used=tuple(range(10, 10 + 3 * n, 3))),
                       rng.integers(0, 255, (n, 100, 140, 3), dtype=np.uint8)) for i, n in enumerate((3, 4))]
    out = it.interpret("1.2.9", clips)
    cams = {c.task_id: c for c in out.promptcams}
    assert set(cams) == {"pacemaker"}
    assert any("regression task ejection_fraction" in w for w in out.warnings)
    cam = cams["pacemaker"]
    assert it._head_ok is True                    # the cheap head-only gradient path was used
    embs = [it.encode_frames(c.frames) for c in clips]
    P = it.prompt_embeddings("pacemaker").numpy()
    sims = np.concatenate(embs) @ P.T
    n, p = np.unravel_index(np.argmax(sims), sims.shape)
    ci, local = (0, n) if n < 3 else (1, n - 3)
    assert cam.sop_instance_uid == f"1.2.{ci}"
    assert cam.frame_index == clips[ci].ref.frames_used[local]
    assert cam.prompt == it.tasks["pacemaker"].prompts[p]
    assert cam.score == pytest.approx(float(sims[n, p]), abs=1e-5)
    # the frame is the RGB crop the model saw (model resolution), heat map on the same grid
    assert np.array_equal(cam.frame, crop_and_scale(clips[ci].frames[local], size=tiny_bundle.config.image_size))
    assert cam.heatmap.shape == cam.frame.shape[:2] and 0 <= cam.heatmap.min() <= cam.heatmap.max() <= 1
