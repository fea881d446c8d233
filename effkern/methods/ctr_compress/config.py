"""The CTR compression flow's config (`effkern ctr_compress`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from effkern.data.ctr import DATASETS
from effkern.methods.common import MethodConfig, arg
from effkern.methods.ctr_compress.models import DEFAULT_MODELS, MODELS

VARIANTS = ("exact", "act")


@dataclass
class CTRCompressConfig(MethodConfig):
    """Low-rank compression of CTR models (PAPERS.md E). Defaults: the paper's Criteo model (embedding 16, a
    400-400-400 DNN) with ranks chosen on MovieLens and KDD-04 val AUC (DeepFM): embedding 16 -> 8, every DNN layer at
    rank 32, DCN-v2's cross layers at 16; a few CPU minutes per data set and model."""

    name: ClassVar[str] = "ctr_compress"
    QUICK: ClassVar[dict] = dict(datasets=("movielens",), models=("deepfm",), variants=("exact",), epochs=2,
                                 finetune_epochs=1)
    SMOKE: ClassVar[dict] = dict(datasets=("movielens",), models=("deepfm",), variants=("exact",), dim=8,
                                 hidden=(32, 32), emb_rank=4, mlp_ranks=(8, 8), epochs=1, finetune_epochs=1,
                                 throughput_batch=512)

    out: str = arg("runs/ctr_compress", "output folder: config.json, results.json, auc.png, models/, checkpoints/")
    datasets: tuple[str, ...] = arg(DATASETS, "data sets", choices=DATASETS)
    models: tuple[str, ...] = arg(DEFAULT_MODELS, "CTR models (fibinet is slow on KDD-04's 74 fields)",
                                  choices=MODELS)
    dim: int = arg(16, "embedding width of the originals")
    hidden: tuple[int, ...] = arg((400, 400, 400), "DNN hidden widths")
    emb_rank: int = arg(8, "compressed embedding width k (0: keep the tables)")
    mlp_ranks: tuple[int, ...] = arg((32, 32, 32), "rank per DNN hidden layer (0: keep the layer)")
    cross_rank: int = arg(16, "rank of DCN-v2's cross layers (0: keep them)")
    variants: tuple[str, ...] = arg(VARIANTS, "exact: L2(L1(x)); act: the layer's ReLU between", choices=VARIANTS)
    epochs: int = arg(10, "training epochs of the originals (early stopping on val AUC)")
    lr: float = arg(1e-3, "learning rate of the originals (Adam)")
    batch_size: int = arg(1024, "training batch size")
    patience: int = arg(2, "epochs without a better val AUC before stopping")
    finetune_epochs: int = arg(3, "fine-tuning epochs of the compressed models (and of the original, as a control)")
    finetune_lr: float = arg(1e-4, "fine-tuning learning rate")
    throughput_batch: int = arg(4096, "batch of the CPU inference throughput")

    def validate(self) -> None:
        for name in ("datasets", "models", "variants", "hidden"):
            if not getattr(self, name):
                raise ValueError(f"{name} must not be empty")
        if len(self.mlp_ranks) != len(self.hidden):
            raise ValueError(f"mlp_ranks needs one rank per hidden layer {self.hidden}, got {self.mlp_ranks}")
        for name in ("dim", "epochs", "batch_size", "patience", "finetune_epochs", "throughput_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if min((self.emb_rank, self.cross_rank, *self.mlp_ranks)) < 0:
            raise ValueError("emb_rank, mlp_ranks and cross_rank must be >= 0")
        if self.emb_rank > self.dim:
            raise ValueError(f"emb_rank must be <= dim {self.dim}, got {self.emb_rank}")
        for rank, width in zip(self.mlp_ranks, self.hidden, strict=True):
            if rank > width:
                raise ValueError(f"mlp_ranks must not exceed their layer's width {self.hidden}, got {self.mlp_ranks}")
        if self.lr <= 0 or self.finetune_lr <= 0:
            raise ValueError("lr and finetune_lr must be > 0")
