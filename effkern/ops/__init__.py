"""One public function per op, each declared once as a ``torch.library`` custom op (namespace ``effkern``)."""

from effkern.ops._device_errors import check_device_errors
from effkern.ops.gqa_decode import gqa_decode
from effkern.ops.kv_append import kv_append
from effkern.ops.low_rank_attention import low_rank_attention
from effkern.ops.low_rank_attention_block import low_rank_attention_block
from effkern.ops.low_rank_embedding import low_rank_embedding
from effkern.ops.low_rank_linear import low_rank_linear
from effkern.ops.residual_layer_norm import residual_layer_norm
from effkern.ops.rope import Rope

__all__ = ["Rope", "check_device_errors", "gqa_decode", "kv_append", "low_rank_attention", "low_rank_attention_block",
           "low_rank_embedding", "low_rank_linear", "residual_layer_norm"]
