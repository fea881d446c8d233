"""The shared backbone's model: the timm ``VisionTransformer`` every side-tuning flow wraps, its input
normalisation and the packaged weights (training: :mod:`effkern.methods.backbone.flow`)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from timm.models.vision_transformer import VisionTransformer

from effkern.methods.common import read_safetensors

VIT_CONFIG = dict(img_size=32, patch_size=4, in_chans=1, embed_dim=128, depth=6, num_heads=4, mlp_ratio=4.0,
                  num_classes=0)
WEIGHTS_NAME = "vit-mini-32.safetensors"
# the committed backbone: `effkern backbone --out runs/backbone`, then runs/backbone/vit-mini-32.safetensors copied
PACKAGED_PATH = Path(__file__).resolve().parents[2] / "weights" / "vit-mini-32.safetensors"


def make_backbone(**overrides) -> VisionTransformer:
    """A randomly initialised backbone with :data:`VIT_CONFIG` (``num_classes=0``: features only)."""
    return VisionTransformer(**{**VIT_CONFIG, **overrides})


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[n, 1, 32, 32]`` -> float in [-1, 1] (mean = std = 0.5, as in DTL's recipe)."""
    return images.float() / 127.5 - 1.0


def load_backbone(path: str | os.PathLike | None = None) -> VisionTransformer:
    """The pretrained backbone (eval mode) from ``path`` (default: the packaged one, :data:`PACKAGED_PATH`)."""
    path = Path(path or PACKAGED_PATH).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"no backbone at {path}: make one with `effkern backbone --out FOLDER` (it writes "
                                f"FOLDER/{WEIGHTS_NAME})")
    vit = make_backbone()
    vit.load_state_dict(read_safetensors(path))
    return vit.eval()
