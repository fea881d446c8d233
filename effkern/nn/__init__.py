"""Drop-in modules built on ``effkern.ops``."""

from effkern.nn.gqa_decode_attention import GQADecodeAttention
from effkern.nn.low_rank import LowRankEmbedding, LowRankLinear
from effkern.nn.low_rank_attention import LowRankAttention, LowRankAttentionBlock

__all__ = ["GQADecodeAttention", "LowRankAttention", "LowRankAttentionBlock", "LowRankEmbedding",
           "LowRankLinear"]
