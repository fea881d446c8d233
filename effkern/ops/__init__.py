"""One public function per op, each declared once as a ``torch.library`` custom op (namespace ``effkern``).

Every ``effkern/ops/<op>.py`` names the same roles the same way:

* ``reference`` / ``bwd_reference``: the pure-PyTorch ground truth of the registered op and of its backward, on
  the op's normalised arguments;
* ``op`` / ``bwd_op``: the registered custom ops (``effkern::<op>`` and ``effkern::<op>_bwd``; LAST's attention
  registers its core, ``effkern::low_rank_attention_core``), as :class:`effkern.ops._op.Op`;
* ``_cpu``, ``_cuda``, ``_triton`` / ``_cpu_bwd``, ``_cuda_bwd``, ``_triton_bwd``: the backends, collected in
  ``_IMPLS`` / ``_BWD_IMPLS`` (backend name -> implementation) and chosen by ``_preferred`` (native backends in
  order for a call) through :func:`effkern.ops._backend.run`;
* ``_setup_context``, ``_backward``, ``_differentiable``: the autograd of ops used in training;
* ``check_*``: argument checks, each written once and called from every place that needs it (the entry point, and
  the reference where ``torch.ops`` callers reach it without the entry point);
* the public entry point, named after the op (``gqa_decode``, ...).
"""

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
