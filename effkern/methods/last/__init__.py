"""LAST: low-rank attention side-tuning over a frozen timm ViT (PAPERS.md A).

On any timm ``VisionTransformer``: :func:`group_features` (the frozen backbone's features, once), :class:`LASTSide`
(K side networks over them), :func:`train_side` / :func:`accuracy` (K learning rates at once, with
:class:`StackedAdamW`). The mini-VTAB flow (`effkern last`): :func:`run` with a :class:`LastConfig`.
"""

from __future__ import annotations

from effkern.methods.last.config import LastConfig
from effkern.methods.last.model import LASTSide, group_features
from effkern.methods.last.train import StackedAdamW, accuracy, train_side

__all__ = ["LASTSide", "LastConfig", "StackedAdamW", "accuracy", "group_features", "run", "train_side"]


def __getattr__(name: str):
    # the flow pulls in the data sets and the LoRA baseline (peft, transformers: seconds to import), which the
    # side network alone does not need
    if name == "run":
        from effkern.methods.last.flow import run

        return run
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
