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
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from effkern.data.vision import fashion_mnist, mnist
from effkern.methods.backbone.config import BackboneConfig
from effkern.methods.backbone.model import WEIGHTS_NAME, make_backbone, normalize
from effkern.methods.common import (
    RunDir,
    load_state,
    main_only,
    row,
    save_state,
    warmup_cosine,
    write_safetensors,
)
from effkern.methods.common.distributed import accelerator, backward, is_main, local_batch, prepare, release

PRETRAIN_CLASSES = 20


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
