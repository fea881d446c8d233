"""The backbone pretraining's config (`effkern backbone`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from effkern.methods.backbone.model import WEIGHTS_NAME
from effkern.methods.common import MethodConfig, arg


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
