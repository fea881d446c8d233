"""The DTL flow's config (`effkern dtl`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from effkern.data.vision import MINI_VTAB_TASKS
from effkern.methods.common import MethodConfig, arg

METHODS = ("dtl", "dtl_plus")


@dataclass
class DTLConfig(MethodConfig):
    """DTL and DTL+ (compact side network, disentangled from a frozen ViT) on mini-VTAB-1k, in LAST's harness (same
    tasks, backbone, cost measurement and rows). Defaults: DTL's recipe (rank 2, injection after the second half's
    blocks, swish beta 100, AdamW wd 0.05, batch 32, warm-up + cosine), shortened to ``epochs`` for 2 CPU cores."""

    name: ClassVar[str] = "dtl"
    QUICK: ClassVar[dict] = dict(tasks=("digits", "lfw_face", "rotation"), epochs=5)
    SMOKE: ClassVar[dict] = dict(tasks=("digits",), methods=("dtl",), epochs=1, cost_steps=0)

    out: str = arg("runs/dtl", "output folder: config.json, results.json, accuracy.png, models/")
    tasks: tuple[str, ...] = arg(tuple(MINI_VTAB_TASKS), "mini-VTAB tasks", choices=tuple(MINI_VTAB_TASKS))
    methods: tuple[str, ...] = arg(METHODS, "dtl and / or dtl_plus (+ the shared depthwise convolution)",
                                   choices=METHODS)
    backbone: str | None = arg(None, "backbone weights file (default: the packaged one)")
    rank: int = arg(2, "rank of every low-rank map of the compact side network")
    inject_after: int | None = arg(None, "M: the first block whose output receives the side feature (none: depth // 2)")
    beta: float = arg(100.0, "beta of the swish applied to the side feature")
    pool: str = arg("mean", "pooled token(s): the mean of the patch tokens (DTL) or the cls token",
                    choices=("mean", "cls"))
    lrs: tuple[float, ...] = arg((1e-2,), "learning rates (one run each; the best on val is reported)")
    epochs: int = arg(20, "training epochs")
    batch_size: int = arg(32, "batch size")
    weight_decay: float = arg(0.05, "AdamW weight decay (not on biases)")
    cost_steps: int = arg(10, "timed steps per method for step_time_s / peak_mem_bytes (0: not measured)")

    def validate(self) -> None:
        for name in ("tasks", "methods", "lrs"):
            if not getattr(self, name):
                raise ValueError(f"{name} must not be empty")
        for name in ("rank", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if min(self.lrs) <= 0 or self.beta <= 0:
            raise ValueError(f"lrs and beta must be > 0, got lrs={self.lrs}, beta={self.beta}")
        if self.weight_decay < 0 or self.cost_steps < 0:
            raise ValueError(f"weight_decay and cost_steps must be >= 0, got {self.weight_decay}, {self.cost_steps}")
        if self.inject_after is not None and self.inject_after < 0:
            raise ValueError(f"inject_after must be a block index >= 0, got {self.inject_after}")
