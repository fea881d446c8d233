"""Drop-in modules built on ``effkern.ops``."""

from effkern.nn.gqa_decode_attention import GQADecodeAttention

__all__ = ["GQADecodeAttention"]
