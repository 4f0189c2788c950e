"""Architectures as data.

``echo-clip`` and ``echo-clip-r`` are open_clip's ``convnext_base`` CLIP, exactly as
published on the Hugging Face Hub (research/echoclip.md §2.1): a timm ConvNeXt-Base
trunk with its default avg-pool + LayerNorm head, a 1024→512 linear projection without
bias, a 12-layer causal text transformer (width 512, 8 heads, context 77, vocab 49,408,
GELU), embed dim 512.

``tiny`` is the same code with small widths (tests, the phantom-trained demo model).
Its vocabulary (49,408 rows) and context (77) are kept so both tokenizers work. Its input
is 128 px, not 224: the preprocessing path is the published one (crop, resize to the
configured size), and a short CPU training run then trains at the size the model is used
at (a pacer lead stays about 2 px wide at 128). Its text transformer is 64 wide (4 heads,
2 layers), wide enough not to limit what a short phantom run learns. The measurements
behind both choices are in the demo model's ``TRAINING.md``. Its trunk is a
small timm ConvNeXt that :mod:`echonode.model.clip` registers with timm under
``echonode_convnext_micro`` (so open_clip can build the same shape in tests).

This module imports neither torch nor timm.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

ARCHITECTURES = ("echo-clip", "echo-clip-r", "tiny")

#: The package's data folder (tokenizer vocabularies, the shipped demo model): defined once.
DATA_DIR = Path(__file__).resolve().parent.parent / "data"

#: The timm name under which :mod:`echonode.model.clip` registers the tiny trunk.
TINY_TIMM_NAME = "echonode_convnext_micro"
#: ConvNeXt layout of the tiny trunk (timm ``ConvNeXt(depths=..., dims=...)``).
TINY_TRUNK_DEPTHS = (1, 1, 2, 1)
TINY_TRUNK_DIMS = (16, 32, 64, 128)


@dataclass(frozen=True)
class VisionConfig:
    timm_model_name: str = "convnext_base"
    image_size: int = 224
    timm_pool: str = ""        # "" = keep timm's default head (avg-pool + LayerNorm)
    timm_proj: str = "linear"  # 1024→embed_dim Linear, no bias
    timm_proj_bias: bool = False
    timm_drop: float = 0.0
    timm_drop_path: float = 0.1  # inactive in eval; kept for fidelity of the config file


@dataclass(frozen=True)
class TextConfig:
    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0


@dataclass(frozen=True)
class ModelConfig:
    """One CLIP architecture plus its preprocessing constants."""

    name: str
    embed_dim: int = 512
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    tokenizer_kind: str = "clip-bpe"  # default tokenizer of this architecture

    @property
    def image_size(self) -> int:
        return self.vision.image_size

    @property
    def context_length(self) -> int:
        return self.text.context_length

    # ----------------------------------------------------------- open_clip json
    def to_open_clip_config(self) -> dict[str, Any]:
        """The ``open_clip_config.json`` content (``model_cfg`` + ``preprocess_cfg``)."""
        v = self.vision
        vision_cfg = {
            "timm_model_name": v.timm_model_name,
            "timm_model_pretrained": False,
            "timm_pool": v.timm_pool,
            "timm_proj": v.timm_proj,
            "timm_drop": v.timm_drop,
            "timm_drop_path": v.timm_drop_path,
            "image_size": v.image_size,
        }
        if v.timm_proj_bias:
            vision_cfg["timm_proj_bias"] = True
        t = self.text
        text_cfg = {"context_length": t.context_length, "vocab_size": t.vocab_size,
                    "width": t.width, "heads": t.heads, "layers": t.layers}
        if t.mlp_ratio != 4.0:
            text_cfg["mlp_ratio"] = t.mlp_ratio
        return {
            "model_cfg": {"embed_dim": self.embed_dim, "vision_cfg": vision_cfg, "text_cfg": text_cfg},
            "preprocess_cfg": {"mean": list(self.mean), "std": list(self.std)},
        }

    def open_clip_model_cfg(self) -> dict[str, Any]:
        """Only ``model_cfg`` (what ``open_clip.model.CLIP(**cfg)`` takes)."""
        return copy.deepcopy(self.to_open_clip_config()["model_cfg"])

    @classmethod
    def from_open_clip_config(cls, data: dict[str, Any], name: str = "custom",
                              tokenizer_kind: str = "clip-bpe") -> "ModelConfig":
        """Parse an ``open_clip_config.json`` dict; refuses what this code cannot build."""
        mc = data.get("model_cfg", data)
        if not isinstance(mc, dict) or "vision_cfg" not in mc or "text_cfg" not in mc:
            raise ValueError("open_clip config: expected model_cfg with vision_cfg and text_cfg")
        vc, tc = dict(mc["vision_cfg"]), dict(mc["text_cfg"])
        if not vc.get("timm_model_name"):
            raise ValueError("open_clip config: only timm image towers are supported "
                             "(vision_cfg.timm_model_name missing)")
        if mc.get("quick_gelu"):
            raise ValueError("open_clip config: quick_gelu=true is not supported (EchoCLIP uses nn.GELU)")
        for key in ("hf_model_name", "hf_tokenizer_name"):
            if tc.get(key):
                raise ValueError(f"open_clip config: text_cfg.{key} is not supported")
        if vc.get("timm_proj", "linear") != "linear":
            raise ValueError(f"open_clip config: timm_proj={vc.get('timm_proj')!r} is not supported (expected 'linear')")
        if vc.get("timm_pool", "") not in ("",):
            raise ValueError(f"open_clip config: timm_pool={vc.get('timm_pool')!r} is not supported (expected '')")
        if vc.get("timm_model_pretrained"):
            raise ValueError("open_clip config: timm_model_pretrained=true would download weights; set it false")
        image_size = vc.get("image_size", 224)
        if isinstance(image_size, (list, tuple)):
            if len(set(image_size)) != 1:
                raise ValueError(f"open_clip config: non-square image_size {image_size} is not supported")
            image_size = image_size[0]
        vision = VisionConfig(
            timm_model_name=str(vc["timm_model_name"]), image_size=int(image_size),
            timm_pool=str(vc.get("timm_pool", "")), timm_proj="linear",
            timm_proj_bias=bool(vc.get("timm_proj_bias", False)),
            timm_drop=float(vc.get("timm_drop", 0.0) or 0.0),
            timm_drop_path=float(vc.get("timm_drop_path", 0.0) or 0.0))
        text = TextConfig(
            context_length=int(tc.get("context_length", 77)), vocab_size=int(tc.get("vocab_size", 49408)),
            width=int(tc.get("width", 512)), heads=int(tc.get("heads", 8)), layers=int(tc.get("layers", 12)),
            mlp_ratio=float(tc.get("mlp_ratio", 4.0)))
        pc = data.get("preprocess_cfg", {}) or {}
        mean = tuple(float(x) for x in pc.get("mean", OPENAI_MEAN))
        std = tuple(float(x) for x in pc.get("std", OPENAI_STD))
        return cls(name=name, embed_dim=int(mc.get("embed_dim", 512)), vision=vision, text=text,
                   mean=mean, std=std, tokenizer_kind=tokenizer_kind)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _convnext_base(name: str, tokenizer_kind: str) -> ModelConfig:
    return ModelConfig(name=name, embed_dim=512, vision=VisionConfig(), text=TextConfig(),
                       tokenizer_kind=tokenizer_kind)


def get_config(name: str) -> ModelConfig:
    """The architecture called ``name``: ``echo-clip``, ``echo-clip-r`` or ``tiny``."""
    if name == "echo-clip":
        return _convnext_base("echo-clip", "clip-bpe")
    if name == "echo-clip-r":
        return _convnext_base("echo-clip-r", "template")
    if name == "tiny":
        return ModelConfig(
            name="tiny", embed_dim=64,
            vision=VisionConfig(timm_model_name=TINY_TIMM_NAME, image_size=128, timm_drop_path=0.0),
            text=TextConfig(context_length=77, vocab_size=49408, width=64, heads=4, layers=2),
            tokenizer_kind="clip-bpe")
    raise KeyError(f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}")
