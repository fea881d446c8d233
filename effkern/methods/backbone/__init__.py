"""The small ViT backbone every side-tuning flow shares: the model (:mod:`~effkern.methods.backbone.model`, what
a flow or the MIET server loads) apart from its pretraining (`effkern backbone`,
:mod:`~effkern.methods.backbone.flow`)."""

from effkern.methods.backbone.model import (
    PACKAGED_PATH,
    VIT_CONFIG,
    WEIGHTS_NAME,
    load_backbone,
    make_backbone,
    normalize,
)

__all__ = ["PACKAGED_PATH", "VIT_CONFIG", "WEIGHTS_NAME", "load_backbone", "make_backbone", "normalize"]
