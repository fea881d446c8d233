"""The DTL flow (`effkern dtl`): DTL and DTL+ on mini-VTAB-1k in LAST's harness (:func:`effkern.methods.last.flow.
run_tasks`: the same tasks, backbone, learning-rate pick on val, cost measurement and rows).

Per task and method, one DTL per learning rate of ``lrs`` trains end to end on the images (the backbone frozen,
blocks up to M without autograd state), the best on the 200 val images is kept: its test accuracy is reported and
its side weights written to ``models/<task>-<method>.safetensors`` (the backbone is not in them;
``DTL(vit, classes, ...).load(path)``). Rows: the standard row (method dtl / dtl_plus, dataset = the task, model =
the backbone, seed, trainable_params, peak_mem_bytes, step_time_s: step time with the backbone's forward, as LAST's),
then group, accuracy, val_accuracy, lr; plus ``dataset = "mean"`` rows and ``accuracy.png``.
"""

from __future__ import annotations

import torch
from torch import nn

from effkern.methods.backbone import load_backbone, normalize
from effkern.methods.dtl.config import DTLConfig
from effkern.methods.dtl.model import DTL
from effkern.methods.last.baselines import make_optimizer, train_step
from effkern.methods.last.costs import SideTuningShape
from effkern.methods.last.flow import fit_best, run_tasks


class ImageDTL(nn.Module):
    """A :class:`DTL` fed uint8 images ``[B, 1, 32, 32]`` (normalised here), as the harness's trainers feed them."""

    def __init__(self, dtl: DTL):
        super().__init__()
        self.dtl = dtl

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.dtl(normalize(images))


def make_dtl(method: str, vit: nn.Module, num_classes: int, options: dict) -> DTL:
    """``method`` "dtl" or "dtl_plus" over ``vit`` with ``options`` (rank, inject_after, beta, pool)."""
    return DTL(vit, num_classes, plus=method == "dtl_plus", **options)


def dtl_options(cfg: DTLConfig) -> dict:
    return dict(rank=cfg.rank, inject_after=cfg.inject_after, beta=cfg.beta, pool=cfg.pool)


def run(cfg: DTLConfig) -> list[dict]:
    cfg.check()
    vit = load_backbone(cfg.backbone)
    options = dtl_options(cfg)
    make_dtl(cfg.methods[0], vit, 2, options)  # a bad setting for this backbone fails now, not after the costs
    models = cfg.out + "/models"

    def solve(method: str, task) -> dict:
        model, result = fit_best(lambda: ImageDTL(make_dtl(method, vit, task.num_classes, options)), task, cfg.lrs,
                                 cfg, weight_decay=cfg.weight_decay)
        model.dtl.save(f"{models}/{task.name}-{method}.safetensors")
        return result

    shape = SideTuningShape(batch_size=cfg.batch_size, backbone=cfg.backbone, options=options)
    return run_tasks(cfg, cfg.methods, solve, shape, title="mini-VTAB-1k: DTL (frozen ViT backbone)")


def cost_step(method: str, shape: SideTuningShape, vit: nn.Module, images: torch.Tensor, labels: torch.Tensor):
    """The cost harness's step (:mod:`effkern.methods.last.costs`): forward, backward and AdamW step of a DTL."""
    model = ImageDTL(make_dtl(method, vit, shape.num_classes, shape.options))
    opt = make_optimizer(model, 1e-3, 0.05)
    return (lambda: train_step(model, opt, images, labels)), model.dtl.trainable_parameters()
