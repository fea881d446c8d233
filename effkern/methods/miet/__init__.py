"""MIET: minimal interaction edge tuning (PAPERS.md C). The cloud's feature server (:mod:`.server`, `effkern miet
serve`) runs the frozen backbone and sends per image only the sum of its intermediate features (:mod:`.protocol`);
the edge (:mod:`.client`: retries, a resumable feature cache) trains :class:`EdgeNetwork` on them (`effkern miet
train`, :mod:`.flow`)."""

from effkern.methods.miet.config import MIETConfig, ServeConfig
from effkern.methods.miet.model import EdgeNetwork, gather_features

__all__ = ["EdgeNetwork", "MIETConfig", "ServeConfig", "gather_features"]
