"""The small ViT backbone every side-tuning flow shares (no ImageNet-pretrained vision model exists offline).

``effkern pretrain-backbone`` trains a timm ``VisionTransformer`` (32x32 single-channel images, 4x4 patches, so
64 patch tokens + cls) on a 20-way classification of the official TRAIN splits of MNIST (digits 0-9 -> classes
0-9) and Fashion-MNIST (garments -> 10-19), with a random affine augmentation that also shrinks and moves the
object (scale 0.35-1.1, shifts up to 8 px, rotations up to 180 degrees), so features cover the small, displaced and
rotated objects of the structured mini-VTAB tasks. No image of any mini-VTAB test set is seen (their test images
come from the official TEST splits, digits and LFW from other sources). Supervised pretraining is the stand-in
until the single-branch SSL method (PAPERS.md F) produces the backbone.

Checkpoints (model + optimiser + step) are written atomically after every epoch and a rerun resumes; the result is
the backbone's weights (safetensors, fp32) without the pretraining head.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer
from tqdm.auto import tqdm

from effkern.data.vision import fashion_mnist, mnist
from effkern.methods import save_atomic, write_safetensors

VIT_CONFIG = dict(img_size=32, patch_size=4, in_chans=1, embed_dim=128, depth=6, num_heads=4, mlp_ratio=4.0,
                  num_classes=0)
DEFAULT_PATH = Path("~/.cache/effkern/vit-mini-32.safetensors").expanduser()  # `effkern pretrain-backbone` output
# the committed backbone, made by `effkern pretrain-backbone --out effkern/weights/vit-mini-32.safetensors`
PACKAGED_PATH = Path(__file__).resolve().parent.parent / "weights" / "vit-mini-32.safetensors"
PRETRAIN_CLASSES = 20


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
        raise FileNotFoundError(f"no backbone at {path}: make one with `effkern pretrain-backbone --out {path}`")
    vit = make_backbone()
    vit.load_state_dict(load_file(path))
    return vit.eval()


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random scale / rotation / shift of a float batch [b, 1, 32, 32] (zero background)."""
    b = x.shape[0]
    scale = torch.empty(b).uniform_(0.35, 1.1, generator=g)
    angle = torch.empty(b).uniform_(-math.pi, math.pi, generator=g)
    shift = torch.empty(b, 2).uniform_(-0.5, 0.5, generator=g)  # up to 8 px of 32 (grid units span 2)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x + 1, grid, align_corners=False, padding_mode="zeros") - 1  # pad with the background


def _pretraining_set() -> tuple[torch.Tensor, torch.Tensor]:
    (xm, ym), (xf, yf) = mnist("train"), fashion_mnist("train")
    x = np.pad(np.concatenate([xm, xf]), ((0, 0), (2, 2), (2, 2)))[:, None]
    return torch.from_numpy(x), torch.from_numpy(np.concatenate([ym, yf + 10]))


def pretrain_backbone(out: str | os.PathLike | None = None, *, epochs: int = 4, batch_size: int = 256,
                      lr: float = 2e-3, weight_decay: float = 0.05, max_images: int | None = None, seed: int = 0,
                      progress: bool = True) -> Path:
    """Train the backbone (see module docstring) and write its weights to ``out``; resumes from
    ``out + ".ckpt"`` after an interruption. ``max_images`` subsamples the 120,000 images (tests)."""
    out = Path(out or DEFAULT_PATH).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    ckpt = out.with_name(out.name + ".ckpt")
    torch.manual_seed(seed)
    images, labels = _pretraining_set()
    if max_images is not None:
        keep = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:max_images]
        images, labels = images[keep], labels[keep]
    vit = make_backbone()
    head = torch.nn.Linear(vit.embed_dim, PRETRAIN_CLASSES)
    params = list(vit.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(labels) / batch_size)
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / steps_per_epoch) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))
    start_epoch = 0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True)
        vit.load_state_dict(state["vit"])
        head.load_state_dict(state["head"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        start_epoch = state["epoch"]
    for epoch in range(start_epoch, epochs):
        g = torch.Generator().manual_seed(seed * 1000 + epoch)
        vit.train()
        bar = tqdm(torch.randperm(len(labels), generator=g).split(batch_size), desc=f"pretrain epoch {epoch + 1}",
                   disable=not progress)
        for idx in bar:
            logits = head(vit(_augment(normalize(images[idx]), g)))
            loss = F.cross_entropy(logits, labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        save_atomic(ckpt, dict(vit=vit.state_dict(), head=head.state_dict(), opt=opt.state_dict(),
                               sched=sched.state_dict(), epoch=epoch + 1))
    write_safetensors(out, vit.state_dict())
    return out
