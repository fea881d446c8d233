"""The LAST flow's config (`effkern last`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from effkern.data.vision import MINI_VTAB_TASKS
from effkern.methods.common import MethodConfig, arg

METHODS = ("linear_probe", "last", "lora", "full")


@dataclass
class LastConfig(MethodConfig):
    """LAST side-tuning vs linear probe, LoRA and full fine-tuning on mini-VTAB-1k. Defaults: every task, the packaged
    backbone, the DTL recipe (AdamW, wd 0.05, batch 32, warm-up + cosine) shortened to ``epochs`` for 2 CPU cores."""

    name: ClassVar[str] = "last"
    QUICK: ClassVar[dict] = dict(tasks=("digits", "lfw_face", "rotation"), epochs=5)
    SMOKE: ClassVar[dict] = dict(tasks=("digits",), methods=("linear_probe", "last"), epochs=1, cost_steps=0)

    out: str = arg("runs/last", "output folder: config.json, results.json, accuracy.png")
    tasks: tuple[str, ...] = arg(tuple(MINI_VTAB_TASKS), "mini-VTAB tasks", choices=tuple(MINI_VTAB_TASKS))
    methods: tuple[str, ...] = arg(METHODS, "methods compared", choices=METHODS)
    backbone: str | None = arg(None, "backbone weights file (default: the packaged one)")
    group_size: int = arg(1, "backbone blocks per LSA block (m = depth / group_size)")
    rank: int = arg(16, "rank r of every LSA block")
    heads: int = arg(2, "attention heads inside the rank-r space")
    pool: str = arg("cls", "[RECON] pooled token(s): the cls token or the mean of the patch tokens",
                    choices=("cls", "mean"))
    bias_correction: bool = arg(True, "[RECON] subtract the earlier backbone features from the side stream")
    parallel_lrs: tuple[float, ...] = arg((1e-3, 3e-3, 1e-2, 3e-2),
                                          "learning rates trained at once (K side networks) for LAST and the probe")
    lora_lrs: tuple[float, ...] = arg((1e-3,), "learning rates of LoRA (one run each)")
    full_lrs: tuple[float, ...] = arg((1e-4,), "learning rates of full fine-tuning (one run each)")
    lora_rank: int = arg(8, "LoRA rank (peft)")
    epochs: int = arg(20, "training epochs of every method")
    batch_size: int = arg(32, "batch size")
    cost_steps: int = arg(10, "timed steps per method for step_time_s / peak_mem_bytes (0: not measured)")

    def validate(self) -> None:
        for name in ("tasks", "methods", "parallel_lrs"):
            if not getattr(self, name):
                raise ValueError(f"{name} must not be empty")
        for name in ("rank", "heads", "group_size", "lora_rank", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.rank % self.heads:
            raise ValueError(f"heads must divide rank {self.rank}, got {self.heads}")
        if min(self.parallel_lrs + self.lora_lrs + self.full_lrs, default=1) <= 0:
            raise ValueError("learning rates must be > 0")
