"""PromptCAM: where in a frame the model sees a prompt (research/echoclip.md §6.1).

Grad-CAM with the prompt embedding as the gradient seed:

1. activations ``A`` (C, h, w) of the last ConvNeXt block
   (``model.visual.trunk.stages[-1].blocks[-1]``);
2. gradients ``G`` of ``image_embedding . prompt_embedding`` (the unnormalised image
   embedding, the L2-normalised prompt embedding -- as the reference seeds
   ``backward(target)``) with respect to ``A``;
3. channel weights ``alpha_c = mean_{h,w} G_c``; ``cam = ReLU(sum_c alpha_c A_c)``;
4. bicubic upsampling to the model input size, Gaussian smoothing with
   sigma = 0.02 * max(H, W), min-max normalisation to [0, 1].

Cost: the activations are captured during the ordinary gradient-free forward pass of
the interpreter (:class:`ActivationCapture`); the gradient then only flows through the
image tower's head (global pool, LayerNorm, projection), which is exact because the
head is the only computation after the hooked block. :func:`promptcam_from_activation`
does that; :func:`promptcam` is the self-contained version (one forward and backward of
the whole image tower on one frame) used when the head cannot be split off.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter


def target_layer(model) -> torch.nn.Module:
    """The last block of the last ConvNeXt stage of the image tower."""
    try:
        return model.visual.trunk.stages[-1].blocks[-1]
    except (AttributeError, IndexError, TypeError) as exc:
        raise ValueError("PromptCAM needs a timm ConvNeXt image trunk (model.visual.trunk.stages[-1].blocks[-1])") from exc


class ActivationCapture:
    """Context manager that records the target layer's output of every forward pass."""

    def __init__(self, model, enabled: bool = True):
        self.model = model
        self.enabled = enabled
        self.outputs: list[torch.Tensor] = []
        self._handle = None

    def __enter__(self) -> "ActivationCapture":
        if self.enabled:
            self._handle = target_layer(self.model).register_forward_hook(self._hook)
        return self

    def _hook(self, module, inputs, output) -> None:
        self.outputs.append(output.detach())

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def activations(self) -> Optional[torch.Tensor]:
        return torch.cat(self.outputs, dim=0) if self.outputs else None


def head_from_activation(model, act: torch.Tensor) -> torch.Tensor:
    """The image embedding computed from the target layer's output (N, C, h, w).

    ``visual(x) = head(trunk.forward_head(trunk.norm_pre(stages(x))))`` for open_clip's
    timm tower; the last stage's output *is* its last block's output.
    """
    trunk = model.visual.trunk
    x = act
    norm_pre = getattr(trunk, "norm_pre", None)
    if norm_pre is not None:
        x = norm_pre(x)
    x = trunk.forward_head(x)
    return model.visual.head(x)


def postprocess(cam: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """(h, w) raw map -> (H, W) float32 in [0, 1]: bicubic up, Gaussian blur, min-max."""
    up = F.interpolate(cam[None, None].float(), size=size, mode="bicubic", align_corners=False)[0, 0]
    arr = up.detach().cpu().numpy().astype(np.float64)
    arr = gaussian_filter(arr, sigma=0.02 * max(size))
    lo, hi = float(arr.min()), float(arr.max())
    if not np.isfinite(lo) or not np.isfinite(hi) or hi - lo <= 1e-12:
        return np.zeros(size, dtype=np.float32)
    return ((arr - lo) / (hi - lo)).astype(np.float32)


def _cam(act: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    alpha = grad.mean(dim=(-2, -1), keepdim=True)          # (C, 1, 1)
    return torch.relu((act * alpha).sum(dim=0))            # (h, w)


def promptcam_from_activation(model, act: torch.Tensor, target: torch.Tensor,
                              size: tuple[int, int]) -> tuple[np.ndarray, float]:
    """PromptCAM from a captured activation (1, C, h, w) or (C, h, w) of one frame.

    Returns (heat map (H, W) float32 in [0, 1], the dot product image_embedding . target).
    """
    with torch.inference_mode(False), torch.enable_grad():
        a = act.detach().clone().float()
        if a.ndim == 3:
            a = a[None]
        a.requires_grad_(True)
        emb = head_from_activation(model, a).float()
        t = target.detach().clone().float().to(emb.device).reshape(1, -1)
        score = (emb * t).sum()
        (grad,) = torch.autograd.grad(score, a)
    return postprocess(_cam(a[0].detach(), grad[0]), size), float(score.detach())


def promptcam(model, x: torch.Tensor, target: torch.Tensor) -> tuple[np.ndarray, float]:
    """PromptCAM of one preprocessed frame ``x`` (1, 3, S, S) for ``target`` (D,).

    One forward and backward of the whole image tower; no parameter gradients are kept.
    """
    store: dict[str, torch.Tensor] = {}

    def hook(module, inputs, output):
        store["act"] = output

    with torch.inference_mode(False), torch.enable_grad():
        handle = target_layer(model).register_forward_hook(hook)
        try:
            xx = x.detach().clone().float()
            xx.requires_grad_(True)         # makes the activation part of the graph
            emb = model.visual(xx.to(next(model.parameters()).dtype)).float()
        finally:
            handle.remove()
        t = target.detach().clone().float().to(emb.device).reshape(1, -1)
        score = (emb * t).sum()
        act = store["act"]
        (grad,) = torch.autograd.grad(score, act)
    return postprocess(_cam(act[0].detach().float(), grad[0].float()), tuple(x.shape[-2:])), float(score.detach())
