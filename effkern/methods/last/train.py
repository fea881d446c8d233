"""Training K LAST side networks at once over cached backbone features, one learning rate each.

All trainable parameters of :class:`~effkern.methods.last.model.LASTSide` are stacked along dim 0 (one slice per
side network), so K configurations train in one forward/backward. :class:`StackedAdamW` is AdamW with a
learning rate per slice (Adam's update does not scale with the gradient, so per-network rates cannot come from
gradient scaling); network k then follows exactly the trajectory it would follow alone with ``lrs[k]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from effkern.methods.common import accuracy as top1
from effkern.methods.common import warmup_cosine
from effkern.methods.common.distributed import accelerator, backward, is_main, local_batch, prepare, release


class StackedAdamW(torch.optim.Optimizer):
    """AdamW for parameters stacked along dim 0 (K models): slice k uses ``lrs[k] * group["lr"]``.

    ``group["lr"]`` (default 1.0) is the multiplier torch's LR schedulers adjust; ``weight_decay`` is decoupled
    (AdamW) and scaled by the same learning rate.
    """

    def __init__(self, params, lrs: Sequence[float], betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        if not lrs or min(lrs) <= 0:
            raise ValueError(f"lrs must be a non-empty list of positive learning rates, got {list(lrs)}")
        super().__init__(params, dict(lr=1.0, betas=betas, eps=eps, weight_decay=weight_decay))
        self.lrs = torch.tensor(lrs, dtype=torch.float64)
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() == 0 or p.shape[0] != len(lrs):
                    raise ValueError(f"every parameter must be stacked over the {len(lrs)} models in dim 0, got a "
                                     f"parameter of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                state["step"] += 1
                t = state["step"]
                lr = (self.lrs * group["lr"]).to(p).view(-1, *[1] * (p.dim() - 1))
                m, v = state["exp_avg"], state["exp_avg_sq"]
                p.mul_(1 - lr * group["weight_decay"])
                m.lerp_(p.grad, 1 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                denom = (v / (1 - beta2**t)).sqrt_().add_(group["eps"])
                p.addcdiv_(m * (-lr / (1 - beta1**t)), denom)
        return loss


def side_optimizer(side: torch.nn.Module, lrs: Sequence[float], weight_decay: float = 0.05) -> StackedAdamW:
    """StackedAdamW over the side networks' trainable parameters (no weight decay on biases)."""
    decay = [p for name, p in side.named_parameters() if p.requires_grad and "bias" not in name]
    no_decay = [p for name, p in side.named_parameters() if p.requires_grad and "bias" in name]
    return StackedAdamW([dict(params=decay), dict(params=no_decay, weight_decay=0.0)], lrs, weight_decay=weight_decay)


def side_step(side: torch.nn.Module, opt: torch.optim.Optimizer, feats: Sequence[torch.Tensor],
              labels: torch.Tensor) -> float:
    """One step on a batch of features; the loss is cross-entropy summed over the K networks (each network's
    gradient is its own). Returns it (summed over networks, mean over the batch)."""
    logits = side(feats)  # [K, b, C]
    loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.repeat(logits.shape[0]),
                           reduction="sum") / labels.shape[0]
    opt.zero_grad(set_to_none=True)
    backward(loss)
    opt.step()
    return loss.item()


def fit(opt: torch.optim.Optimizer, n: int, step: Callable[[torch.Tensor], float], *, epochs: int,
        batch_size: int = 32, warmup_epochs: int = 1, seed: int = 0, desc: str = "train",
        progress: bool = True) -> list[float]:
    """Run ``epochs`` shuffled passes over ``n`` examples, calling ``step(batch_indices) -> loss`` per batch (this
    process's share of it under ``accelerate launch``), with a linear warm-up + cosine decay of ``opt``'s learning
    rate per step. Returns the mean loss per epoch (of this process's examples)."""
    steps_per_epoch = math.ceil(n / batch_size)
    sched = warmup_cosine(opt, epochs * steps_per_epoch, warmup_epochs * steps_per_epoch)
    g = torch.Generator().manual_seed(seed)
    history = []
    for _ in tqdm(range(epochs), desc=desc, disable=not progress or not is_main()):
        total, seen = 0.0, 0
        for idx in torch.randperm(n, generator=g).split(batch_size):
            local = local_batch(idx)
            if local is None:
                continue
            total += step(local) * local.numel()
            seen += local.numel()
            sched.step()
        history.append(total / max(seen, 1))
    return history


def train_side(side: torch.nn.Module, feats: Sequence[torch.Tensor], labels: torch.Tensor, *, lrs: Sequence[float],
               epochs: int, batch_size: int = 32, weight_decay: float = 0.05, warmup_epochs: int = 1, seed: int = 0,
               progress: bool = True) -> list[float]:
    """Train ``side`` (K networks, K = len(lrs)) on cached features ``feats`` (``[z_0..z_m]``, each ``[n, N, d]``)
    and ``labels [n]`` (:func:`side_step`). Returns the mean training loss per epoch (averaged over networks)."""
    n = labels.shape[0]
    if any(f.shape[0] != n for f in feats):
        raise ValueError(f"every feature tensor must have the {n} examples of labels in dim 0")
    model, opt = prepare(side, side_optimizer(side, lrs, weight_decay))
    dev = accelerator().device
    side.train()
    history = fit(opt, n, lambda idx: side_step(model, opt, [f[idx].to(dev) for f in feats], labels[idx].to(dev)),
                  epochs=epochs, batch_size=batch_size, warmup_epochs=warmup_epochs, seed=seed, desc="LAST",
                  progress=progress)
    release()
    side.eval()
    return [loss / len(lrs) for loss in history]


@torch.no_grad()
def accuracy(side: torch.nn.Module, feats: Sequence[torch.Tensor], labels: torch.Tensor,
             batch_size: int = 256) -> torch.Tensor:
    """Top-1 accuracy of each of the K networks, ``[K]``."""
    was_training = side.training
    side.eval()
    dev = next(side.parameters()).device
    logits = torch.cat([side([f[idx].to(dev) for f in feats]).cpu()
                        for idx in torch.arange(labels.shape[0]).split(batch_size)], dim=-2)
    side.train(was_training)
    return top1(logits, labels)
