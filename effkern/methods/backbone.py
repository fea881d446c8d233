"""The small ViT backbone every side-tuning flow shares (no ImageNet-pretrained vision model exists offline).

``effkern backbone`` trains a timm ``VisionTransformer`` (32x32 single-channel images, 4x4 patches, so
64 patch tokens + cls) on a 20-way classification of the official TRAIN splits of MNIST (digits 0-9 -> classes
0-9) and Fashion-MNIST (garments -> 10-19), with a random affine augmentation that also shrinks and moves the
object (scale 0.35-1.1, shifts up to 8 px, rotations up to 180 degrees), so features cover the small, displaced and
rotated objects of the structured mini-VTAB tasks. No image of any mini-VTAB test set is seen (their test images
come from the official TEST splits, digits and LFW from other sources). Supervised pretraining is the stand-in
until the single-branch SSL method (PAPERS.md F) produces the backbone.

Writes ``<out>/vit-mini-32.safetensors`` (the backbone's weights, fp32, without the pretraining head) and the
standard rows (one per epoch: train_loss, train_accuracy) to ``results.json``, plus ``loss.png``; the training state
is checkpointed after every epoch and a rerun of the same config resumes.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from tqdm.auto import tqdm

from effkern.data.vision import fashion_mnist, mnist
from effkern.methods.common import (
    MethodConfig,
    RunDir,
    arg,
    load_state,
    main_only,
    read_safetensors,
    row,
    save_state,
    warmup_cosine,
    write_safetensors,
)
from effkern.methods.common.distributed import accelerator, backward, is_main, local_batch, prepare, release

VIT_CONFIG = dict(img_size=32, patch_size=4, in_chans=1, embed_dim=128, depth=6, num_heads=4, mlp_ratio=4.0,
                  num_classes=0)
WEIGHTS_NAME = "vit-mini-32.safetensors"
# the committed backbone: `effkern backbone --out runs/backbone`, then runs/backbone/vit-mini-32.safetensors copied
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
        raise FileNotFoundError(f"no backbone at {path}: make one with `effkern backbone --out FOLDER` (it writes "
                                f"FOLDER/{WEIGHTS_NAME})")
    vit = make_backbone()
    vit.load_state_dict(read_safetensors(path))
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


@dataclass
class BackboneConfig(MethodConfig):
    """Supervised pretraining of the shared ViT backbone (the stand-in until the single-branch SSL method)."""

    name: ClassVar[str] = "backbone"
    QUICK: ClassVar[dict] = dict(epochs=1, max_images=20000)
    SMOKE: ClassVar[dict] = dict(epochs=1, batch_size=64, max_images=256)

    out: str = arg("runs/backbone", f"output folder: {WEIGHTS_NAME}, config.json, results.json, loss.png")
    epochs: int = arg(4, "training epochs")
    batch_size: int = arg(256, "batch size")
    lr: float = arg(2e-3, "peak learning rate (AdamW, warm-up over the first epoch, then cosine)")
    weight_decay: float = arg(0.05, "AdamW weight decay")
    max_images: int | None = arg(None, "subsample the 120,000 pretraining images (None: all)")

    def validate(self) -> None:
        if min(self.epochs, self.batch_size, self.max_images or 1) < 1 or self.lr <= 0 or self.weight_decay < 0:
            raise ValueError("epochs, batch_size and max_images must be >= 1, lr > 0 and weight_decay >= 0")


def run(cfg: BackboneConfig) -> list[dict]:
    """Train the backbone (see the module docstring); returns the rows, one per epoch."""
    cfg.check()
    run_dir = RunDir(cfg)
    ckpt = run_dir.checkpoint("pretrain")
    torch.manual_seed(cfg.seed)
    images, labels = _pretraining_set()
    if cfg.max_images is not None:
        keep = torch.randperm(len(labels), generator=torch.Generator().manual_seed(cfg.seed))[:cfg.max_images]
        images, labels = images[keep], labels[keep]
    vit = make_backbone()
    head = torch.nn.Linear(vit.embed_dim, PRETRAIN_CLASSES)
    params = list(vit.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(labels) / cfg.batch_size)
    sched = warmup_cosine(opt, cfg.epochs * steps_per_epoch, steps_per_epoch)
    start_epoch = 0
    if ckpt.exists():
        state = load_state(ckpt)
        vit.load_state_dict(state["vit"])
        head.load_state_dict(state["head"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        start_epoch = state["epoch"]
    model, opt = prepare(torch.nn.Sequential(vit, head), opt)  # data-parallel under `accelerate launch`
    dev = accelerator().device
    for epoch in range(start_epoch, cfg.epochs):
        g = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        vit.train()
        bar = tqdm(torch.randperm(len(labels), generator=g).split(cfg.batch_size),
                   desc=f"pretrain epoch {epoch + 1}", disable=not cfg.progress or not is_main())
        total, correct, seen = 0.0, 0, 0
        for idx in bar:
            augmented = _augment(normalize(images[idx]), g)  # every process draws the whole batch: same generator
            part = local_batch(torch.arange(len(idx)))
            if part is None:
                continue
            local = idx[part]
            logits = model(augmented[part].to(dev))
            loss = F.cross_entropy(logits, labels[local].to(dev))
            opt.zero_grad(set_to_none=True)
            backward(loss)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            total += loss.item() * len(local)
            correct += int((logits.argmax(-1).cpu() == labels[local]).sum())
            seen += len(local)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        run_dir.add([row("supervised", dataset="mnist+fashion_mnist", model="vit-mini-32", seed=cfg.seed,
                         epoch=epoch + 1, train_loss=total / seen, train_accuracy=correct / seen)])
        save_state(ckpt, dict(vit=vit.state_dict(), head=head.state_dict(), opt=opt.state_dict(),
                              sched=sched.state_dict(), epoch=epoch + 1))
    release()
    write_safetensors(run_dir.path / WEIGHTS_NAME, vit.state_dict())
    _plot(run_dir.rows, run_dir.path / "loss.png")
    return run_dir.rows


@main_only
def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r["epoch"] for r in rows], [r["train_loss"] for r in rows], marker="o")
    ax.set_xlabel("epoch")
    ax.set_ylabel("train loss (augmented, 20 classes)")
    ax.set_title("backbone pretraining")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
