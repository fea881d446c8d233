"""``effkern.ops.low_rank_attention_block``: LAST's whole LSA block for K side networks, with the memory of the
side stream managed by hand.

For side stream ``u`` and the frozen backbone feature ``z`` of the block's group (PAPERS.md A)::

    h     = u + z
    u_new = h + low_rank_attention(LayerNorm(h))        # LayerNorm without affine

Built from :func:`~effkern.ops.residual_layer_norm` and the :func:`~effkern.ops.low_rank_attention` core and
projections, as one autograd function, because the side stream ``[K, B, N, d]`` is what a LAST step spends its
memory traffic and allocations on (every fresh d-wide buffer is page-faulted in again by the allocator): the
up-projection accumulates into h in place (h is this function's own buffer), so a block allocates two d-wide
tensors forward (h, x) and two backward, and saves one (x, with the fp32 inverse standard deviations and the
rank-sized q/k/v, output and log-sum-exp of the core). In plain autograd the same block allocates five and saves
two.
"""

from __future__ import annotations

import torch

from effkern.ops._checks import FLOAT_DTYPES, check_same_dtype, check_tensor
from effkern.ops.low_rank_attention import bwd_op as core_bwd_op
from effkern.ops.low_rank_attention import check_weights, down_projection
from effkern.ops.low_rank_attention import op as core_op
from effkern.ops.residual_layer_norm import bwd_op as rln_bwd_op
from effkern.ops.residual_layer_norm import check_eps
from effkern.ops.residual_layer_norm import op as rln_op


class _Block(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, z, w_qkv, w_o, heads, scale, eps):
        kk, r, d = w_o.shape
        b, n, _ = z.shape
        h, x, rstd = rln_op(u, z, eps)
        qkv = down_projection(x, w_qkv)
        out, lse = core_op(qkv, heads, scale)
        out3 = out.reshape(kk, b * n, r)
        if h.dim() == 4:  # h is this function's own buffer: the up-projection accumulates into it
            u_new = h.view(kk, b * n, d).baddbmm_(out3, w_o)
        else:  # h is shared by the K networks (u and z both [B, N, d]): broadcast it
            u_new = torch.baddbmm(h.view(1, b * n, d), out3, w_o)
        ctx.save_for_backward(x, rstd, qkv, out, lse, w_qkv, w_o)
        ctx.heads, ctx.scale = heads, scale
        return u_new.view(kk, b, n, d)

    @staticmethod
    def backward(ctx, grad):
        x, rstd, qkv, out, lse, w_qkv, w_o = ctx.saved_tensors
        kk, r, d = w_o.shape
        b, n = x.shape[-3:-1]
        grad = grad.contiguous()
        g3 = grad.view(kk, b * n, d)
        out3 = out.reshape(kk, b * n, r)
        dw_o = torch.bmm(out3.transpose(1, 2), g3)
        dout = torch.bmm(g3, w_o.transpose(1, 2)).view(kk, b, n, r)
        dqkv = core_bwd_op(qkv, out, lse, dout, ctx.heads, ctx.scale)
        du = dz = None
        if x.dim() == 3:  # shared x: the one wide GEMM's gradients
            dq2 = dqkv.permute(1, 2, 0, 3).reshape(b * n, kk * 3 * r)
            w2 = w_qkv.permute(1, 0, 2).reshape(d, kk * 3 * r)
            dw_qkv = (x.reshape(b * n, d).t() @ dq2).view(d, kk, 3 * r).permute(1, 0, 2)
            if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
                dx = (dq2 @ w2.t()).view(b, n, d)
                du = dz = rln_bwd_op(x, rstd, grad.sum(0), dx)
        else:
            dq3 = dqkv.view(kk, b * n, 3 * r)
            dw_qkv = torch.bmm(x.view(kk, b * n, d).transpose(1, 2), dq3)
            if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
                dx = torch.bmm(dq3, w_qkv.transpose(1, 2)).view(kk, b, n, d)
                du = rln_bwd_op(x, rstd, grad, dx)
                dz = du.sum(0) if ctx.needs_input_grad[1] else None
        return (du if ctx.needs_input_grad[0] else None, dz if ctx.needs_input_grad[1] else None, dw_qkv, dw_o,
                None, None, None)


def low_rank_attention_block(
    u: torch.Tensor,
    z: torch.Tensor,
    w_qkv: torch.Tensor,
    w_o: torch.Tensor,
    *,
    heads: int = 1,
    scale: float | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """One LAST LSA block of K side networks: ``h = u + z``, then ``h + LSA(LayerNorm(h))``.

    Args:
        u: the side streams ``[K, B, N, d]``, or ``[B, N, d]`` shared by all K (the first block: ``z_0``).
        z: the backbone feature ``[B, N, d]`` of this block's group (shared by all K).
        w_qkv: ``[K, d, 3r]`` down-projections (columns ``[q | k | v]``, each split into ``heads`` heads).
        w_o: ``[K, r, d]`` up-projections.
        heads, scale: as in :func:`~effkern.ops.low_rank_attention`.
        eps: LayerNorm's epsilon.

    Returns:
        The new side streams ``[K, B, N, d]`` in u's dtype. Differentiable in u, z and both weights.
    """
    check_tensor("z", z, ndim=3, dtypes=FLOAT_DTYPES, dims="[B, N, d]")
    check_tensor("u", u, device=z.device, dims="[K, B, N, d] or [B, N, d]")
    check_same_dtype("u", u, "z", z)
    heads, scale = check_weights(z, w_qkv, w_o, heads, scale)
    kk = w_qkv.shape[0]
    if u.shape not in (z.shape, (kk, *z.shape)):
        raise ValueError(f"u must be [K, B, N, d] = {(kk, *z.shape)} or [B, N, d] = {tuple(z.shape)}, got "
                         f"{tuple(u.shape)}")
    return _Block.apply(u.contiguous(), z.contiguous(), w_qkv, w_o, heads, scale, check_eps(eps))
