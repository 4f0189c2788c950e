"""The EchoCLIP model: a timm ConvNeXt image tower and a causal text transformer.

Module and parameter names are open_clip's (``TimmModel`` + ``CLIP``), so a published
``open_clip_pytorch_model.bin`` loads with ``strict=True`` (493 keys for convnext_base,
research/echoclip.md §2.4):

* ``visual.trunk.*``  timm ConvNeXt with its default head (avg-pool, LayerNorm2d, fc=Identity)
* ``visual.head.proj.weight``  Linear(trunk features → embed_dim, bias=False)
* ``token_embedding``, ``positional_embedding``, ``transformer.resblocks.N.{ln_1, attn
  (nn.MultiheadAttention), ln_2, mlp.c_fc, mlp.c_proj}``, ``ln_final``, ``text_projection``,
  ``logit_scale``; the causal mask is a non-persistent buffer.

``encode_image`` / ``encode_text`` return *unnormalised* float32 embeddings whatever the
model's precision; callers L2-normalise.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from pathlib import Path
from typing import Mapping

import timm
import torch
import torch.nn.functional as F
from timm.models.convnext import ConvNeXt
from torch import nn

from echonode.model.configs import (TINY_TIMM_NAME, TINY_TRUNK_DEPTHS, TINY_TRUNK_DIMS, ModelConfig,
                                    get_config)

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# --------------------------------------------------------------------------- tiny trunk

def _echonode_convnext_micro(pretrained: bool = False, **kwargs) -> ConvNeXt:
    """A ~0.27 M-parameter ConvNeXt (depths 1-1-2-1, dims 16-32-64-128) for tests and the demo."""
    if pretrained:
        raise ValueError(f"{TINY_TIMM_NAME} has no pretrained weights")
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # timm factory extras
        kwargs.pop(key, None)
    model = ConvNeXt(depths=TINY_TRUNK_DEPTHS, dims=TINY_TRUNK_DIMS, **kwargs)
    cfg = {"input_size": (3, 224, 224), "pool_size": (7, 7), "num_classes": kwargs.get("num_classes", 1000),
           "interpolation": "bicubic", "classifier": "head.fc", "first_conv": "stem.0"}
    model.pretrained_cfg = cfg
    model.default_cfg = cfg
    return model


_echonode_convnext_micro.__name__ = TINY_TIMM_NAME


def register_timm_models() -> None:
    """Register the tiny trunk with timm (idempotent), so open_clip configs can name it."""
    if not timm.is_model(TINY_TIMM_NAME):
        timm.models.register_model(_echonode_convnext_micro)


register_timm_models()


# --------------------------------------------------------------------------- towers

class TimmVisual(nn.Module):
    """open_clip's ``TimmModel`` layout: ``trunk`` (timm) + ``head`` (drop, proj)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        v = cfg.vision
        kwargs = {}
        if v.timm_drop_path:
            kwargs["drop_path_rate"] = v.timm_drop_path
        self.trunk = timm.create_model(v.timm_model_name, pretrained=False, **kwargs)
        # keep timm's default head (global avg pool + LayerNorm) and drop the classifier
        self.trunk.reset_classifier(0)
        self.head = nn.Sequential(OrderedDict([
            ("drop", nn.Dropout(v.timm_drop)),
            ("proj", nn.Linear(self.trunk.num_features, cfg.embed_dim, bias=v.timm_proj_bias)),
        ]))
        self.image_size = v.image_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


class MLP(nn.Sequential):
    def __init__(self, width: int, hidden: int):
        super().__init__(OrderedDict([
            ("c_fc", nn.Linear(width, hidden)),
            ("gelu", nn.GELU()),
            ("c_proj", nn.Linear(hidden, width)),
        ]))


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block (open_clip names: ln_1, attn, ln_2, mlp.c_fc, mlp.c_proj)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = MLP(width, int(width * mlp_ratio))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.width = width
        self.layers = layers
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads, mlp_ratio) for _ in range(layers)])

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, attn_mask)
        return x


def causal_mask(n: int, device=None) -> torch.Tensor:
    """Float mask, -inf above the diagonal (open_clip's ``build_causal_mask``)."""
    mask = torch.full((n, n), float("-inf"), device=device)
    return mask.triu_(1)


class CLIP(nn.Module):
    """Image tower + text tower with open_clip's state-dict layout."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        t = cfg.text
        self.visual = TimmVisual(cfg)
        self.context_length = t.context_length
        self.vocab_size = t.vocab_size
        self.transformer = Transformer(t.width, t.layers, t.heads, t.mlp_ratio)
        self.token_embedding = nn.Embedding(t.vocab_size, t.width)
        self.positional_embedding = nn.Parameter(torch.empty(t.context_length, t.width))
        self.ln_final = nn.LayerNorm(t.width)
        self.text_projection = nn.Parameter(torch.empty(t.width, cfg.embed_dim))
        self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))
        self.register_buffer("attn_mask", causal_mask(t.context_length), persistent=False)
        if self.positional_embedding.device.type != "meta":
            self.init_text_parameters()

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def dtype(self) -> torch.dtype:
        return self.text_projection.dtype

    def init_text_parameters(self) -> None:
        """CLIP's initialisation of the text tower (the image tower keeps timm's)."""
        t = self.config.text
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        proj_std = (t.width ** -0.5) * ((2 * t.layers) ** -0.5)
        attn_std = t.width ** -0.5
        fc_std = (2 * t.width) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=t.width ** -0.5)

    #: frames per image-tower forward: bounds activation memory (an echo-clip model stays
    #: under 1.5 GB RSS in fp32 on CPU); results do not depend on it (per-sample ops only)
    image_chunk: int = 8
    #: prompts per text-tower forward
    text_chunk: int = 64

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) normalised pixels → (N, embed_dim) float32, unnormalised."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"encode_image expects (N, 3, S, S), got {tuple(x.shape)}")
        dev = self.text_projection.device
        x = x.to(device=dev, dtype=self.dtype)
        if x.shape[0] <= self.image_chunk:
            return self.visual(x).float()
        return torch.cat([self.visual(c).float() for c in x.split(self.image_chunk)])

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        """(N, context) token ids → (N, embed_dim) float32, unnormalised (argmax pooling)."""
        if ids.ndim != 2 or ids.shape[1] != self.context_length:
            raise ValueError(f"encode_text expects (N, {self.context_length}) ids, got {tuple(ids.shape)}")
        ids = ids.to(device=self.token_embedding.weight.device, dtype=torch.long)
        if ids.numel() and (int(ids.max()) >= self.vocab_size or int(ids.min()) < 0):
            raise ValueError(f"token ids must lie in [0, {self.vocab_size})")
        if ids.shape[0] > self.text_chunk:
            return torch.cat([self._encode_text(c) for c in ids.split(self.text_chunk)])
        return self._encode_text(ids)

    def _encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(ids) + self.positional_embedding
        mask = self.attn_mask.to(x.dtype)
        x = self.transformer(x, mask)
        x = self.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), ids.argmax(dim=-1)]
        return (x @ self.text_projection).float()

    def forward(self, image: torch.Tensor, text: torch.Tensor):
        """Training form: (normalised image features, normalised text features, logit scale exp)."""
        img = F.normalize(self.encode_image(image), dim=-1)
        txt = F.normalize(self.encode_text(text), dim=-1)
        return img, txt, self.logit_scale.exp()


def build_model(cfg: ModelConfig | str) -> CLIP:
    """A CLIP of this architecture with fresh (random) weights, in train mode like any nn.Module."""
    if isinstance(cfg, str):
        cfg = get_config(cfg)
    return CLIP(cfg)


# --------------------------------------------------------------------------- weights

class WeightsError(ValueError):
    """A checkpoint cannot be read or does not match the architecture."""


def read_state_dict(path: str | os.PathLike, mmap: bool = True) -> dict[str, torch.Tensor]:
    """Read an open_clip checkpoint (``.bin``/``.pt``/``.pth`` via ``torch.load(weights_only=True)``
    or ``.safetensors``), unwrap ``{"state_dict": ...}`` and strip ``module.`` prefixes."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            sd = load_file(str(path), device="cpu")
        else:
            try:
                sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
            except RuntimeError as exc:  # legacy (non-zip) pickle cannot be mmapped
                if mmap and "mmap" in str(exc):
                    sd = torch.load(str(path), map_location="cpu", weights_only=True)
                else:
                    raise
    except FileNotFoundError:
        raise WeightsError(f"{path}: weights file not found") from None
    except Exception as exc:  # noqa: BLE001 - corrupted file, unpickling refused, bad header
        raise WeightsError(f"{path}: cannot read weights ({type(exc).__name__}: {exc})") from None
    if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping):
        raise WeightsError(f"{path}: expected a state dict, found {type(sd).__name__}")
    out = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise WeightsError(f"{path}: entry {k!r} is not a tensor")
        out[k[len("module."):] if k.startswith("module.") else k] = v
    return out


def load_weights(model: CLIP, state_dict: Mapping[str, torch.Tensor], source: str = "weights",
                 assign: bool = False) -> None:
    """``load_state_dict(strict=True)`` with a message naming missing/unexpected keys."""
    sd = dict(state_dict)
    ls = sd.get("logit_scale")
    if ls is not None and ls.shape != model.logit_scale.shape and ls.numel() == 1:
        sd["logit_scale"] = ls.reshape(model.logit_scale.shape)
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong = sorted(k for k in set(own) & set(sd) if tuple(own[k].shape) != tuple(sd[k].shape))
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) (e.g. {', '.join(unexpected[:3])})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} shape mismatch(es) (e.g. {k}: checkpoint {tuple(sd[k].shape)}, "
                         f"model {tuple(own[k].shape)})")
        raise WeightsError(f"{source}: does not match architecture {model.config.name!r} "
                           f"({len(own)} keys expected): " + "; ".join(parts))
    model.load_state_dict(sd, strict=True, assign=assign)


def model_from_state_dict(cfg: ModelConfig, state_dict: Mapping[str, torch.Tensor], *,
                          device: str = "cpu", precision: str = "fp32", source: str = "weights") -> CLIP:
    """Build on the meta device and adopt the checkpoint's tensors (no second copy in memory)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    with torch.device("meta"):
        model = CLIP(cfg)
    load_weights(model, state_dict, source=source, assign=True)
    model.attn_mask = causal_mask(cfg.text.context_length)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise WeightsError(f"{source}: tensors left uninitialised: {', '.join(leftover[:3])}")
    model = model.to(device=device, dtype=PRECISIONS[precision])
    model.attn_mask = model.attn_mask.float()
    return model.eval()
