"""DTL: disentangled transfer learning, a compact side network over a frozen timm ViT (PAPERS.md B).

:class:`DTL` wraps any timm ``VisionTransformer`` (saves / loads only its own weights); the mini-VTAB flow
(`effkern dtl`) is :func:`effkern.methods.dtl.flow.run` with a :class:`DTLConfig`.
"""

from effkern.methods.dtl.config import DTLConfig
from effkern.methods.dtl.model import DTL

__all__ = ["DTL", "DTLConfig"]
