"""Baselines in LAST's harness: full fine-tuning and LoRA (HF peft) of the timm ViT, trained end to end on images.

The linear probe needs no code of its own: it is a :class:`~effkern.methods.last.model.LASTSide` without LSA
blocks reading only the final feature (``probe=True``), trained with the same stacked trainer, K learning rates at
once.

Both baselines put one linear head on the cls token of the backbone's final (normed) feature, like LAST's default,
and train with AdamW (weight decay on weights only), warm-up + cosine, batch 32: the DTL recipe (PAPERS.md B)
that LAST's runs use too. Images are normalised with :func:`effkern.methods.backbone.normalize`; no augmentation
(LAST trains on cached features, so none of the methods sees augmented images).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn

from effkern.methods.backbone import normalize
from effkern.methods.common import accuracy as top1
from effkern.methods.common.distributed import accelerator, backward, prepare, release
from effkern.methods.last.train import fit

# every Linear of the timm blocks: attention qkv / proj and MLP fc1 / fc2 (not the patch embedding's conv "proj")
LORA_TARGETS = r".*blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))"


class ViTClassifier(nn.Module):
    """A timm ViT and a linear head on the cls token of ``forward_features``; images uint8 ``[B, C, H, W]``."""

    def __init__(self, vit: nn.Module, num_classes: int):
        super().__init__()
        self.vit = vit
        self.head = nn.Linear(vit.embed_dim, num_classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.vit.forward_features(normalize(images))[:, 0])


def make_baseline(method: str, vit: nn.Module, num_classes: int, *, lora_rank: int = 8) -> ViTClassifier:
    """``method`` "full" (every backbone parameter trains) or "lora" (rank-``lora_rank`` adapters on
    :data:`LORA_TARGETS`, alpha = 2 rank; the backbone's own weights frozen). ``vit`` is copied, never changed."""
    vit = copy.deepcopy(vit).requires_grad_(method == "full")
    if method == "lora":
        vit = get_peft_model(vit, LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, target_modules=LORA_TARGETS))
    elif method != "full":
        raise ValueError(f"method must be 'full' or 'lora', got {method!r}")
    return ViTClassifier(vit, num_classes)


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; no weight decay on biases and 1-d parameters (norms, tokens)."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    decay = [p for name, p in trainable if p.dim() > 1 and not name.endswith("_token")]
    no_decay = [p for name, p in trainable if not (p.dim() > 1 and not name.endswith("_token"))]
    return torch.optim.AdamW([dict(params=decay), dict(params=no_decay, weight_decay=0.0)], lr=lr,
                             weight_decay=weight_decay)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor) -> float:
    loss = F.cross_entropy(model(images), labels)
    opt.zero_grad(set_to_none=True)
    backward(loss)
    opt.step()
    return loss.item()


def train_model(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, lr: float, epochs: int,
                batch_size: int = 32, weight_decay: float = 0.05, warmup_epochs: int = 1, seed: int = 0,
                progress: bool = True) -> list[float]:
    """Train ``model`` on uint8 ``images [n, C, H, W]`` / ``labels [n]``; returns the mean loss per epoch."""
    wrapped, opt = prepare(model, make_optimizer(model, lr, weight_decay))
    dev = accelerator().device
    model.train()
    history = fit(opt, labels.shape[0], lambda idx: train_step(wrapped, opt, images[idx].to(dev), labels[idx].to(dev)),
                  epochs=epochs, batch_size=batch_size, warmup_epochs=warmup_epochs, seed=seed, desc="fine-tune",
                  progress=progress)
    release()
    model.eval()
    return history


@torch.no_grad()
def model_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> float:
    model.eval()
    dev = next(model.parameters()).device
    logits = torch.cat([model(images[i : i + batch_size].to(dev)).cpu() for i in range(0, labels.shape[0], batch_size)])
    return float(top1(logits, labels))
