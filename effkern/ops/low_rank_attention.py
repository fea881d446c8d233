"""``effkern.ops.low_rank_attention``: LAST's low-rank self-attention (LSA) for K side networks in one call.

For side network k with weights ``w_qkv[k] [d, 3r]`` (columns: q | k | v, each split into H heads of
``dh = r / H`` consecutive columns) and ``w_o[k] [r, d]``, on tokens ``x [B, N, d]`` (shared by every side
network) or ``x[k]``::

    q | k | v = x @ w_qkv[k]                          # down-projection d -> r
    o_h       = softmax(q_h k_h^T * scale) v_h        # attention inside the r-dim space, per head
    y[k]      = concat_h(o_h) @ w_o[k]                # up-projection r -> d

Layers: the two projections are dense GEMMs (one ``[B N, d] x [d, K 3r]`` GEMM for all K side networks when x
is shared: the K hyper-parameter configurations of LAST's parallel search cost one wide GEMM, not K), and the
attention core ``effkern::low_rank_attention_core`` (forward + backward custom ops) has its own kernels. On the
CPU fusing the projections into the core does not pay: a BLAS GEMM already streams x once, and the core's
[N, 3r] input per item is small. Core backends (op contract, DESIGN.md): ``cpu`` = C++ kernel (per
(side network, image, head) item, keys in SIMD lanes, probabilities recomputed in the backward); on CUDA
tensors the CUDA kernels (fp32 FMAs, a warp per row, head dims up to 128) when built, else the Triton kernels
(FlashAttention-2 style forward and backward); the reference everywhere else.
Accumulation is fp32.
"""

from __future__ import annotations

import math

import torch

from effkern.ops import _backend
from effkern.ops._checks import FLOAT_DTYPES, acc_dtype, check_int, check_same_dtype, check_tensor, native
from effkern.ops._op import custom_op, register_autograd

CUDA_MAX_HEAD_DIM = 128  # csrc/cuda/low_rank_attention.cuh: kLowRankAttnMaxHeadDim


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[K, B, N, H dh] -> fp32 (float64 for float64 t) [K, B, H, N, dh]."""
    kk, b, n, r = t.shape
    return t.to(acc_dtype(t)).view(kk, b, n, heads, r // heads).transpose(2, 3)


def _split_heads(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, ...]:
    """qkv [K, B, N, 3r] -> q, k, v as fp32 (float64) [K, B, H, N, dh]."""
    return tuple(_heads(part, heads) for part in qkv.chunk(3, dim=-1))


def _merge_heads(t: torch.Tensor) -> torch.Tensor:
    """[K, B, H, N, dh] -> [K, B, N, H dh]."""
    kk, b, h, n, dh = t.shape
    return t.transpose(2, 3).reshape(kk, b, n, h * dh)


def reference(qkv: torch.Tensor, heads: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Ground truth of the core: ``(out [K, B, N, r] in qkv's dtype, lse fp32 [K, B, H, N])``."""
    q, k, v = _split_heads(qkv, heads)
    logits = q @ k.transpose(-1, -2) * scale
    lse = torch.logsumexp(logits, dim=-1)
    out = torch.exp(logits - lse[..., None]) @ v
    return _merge_heads(out).to(qkv.dtype), lse


def bwd_reference(qkv, out, lse, dout, heads: int, scale: float) -> torch.Tensor:
    """dqkv from the saved forward: P = exp(S - lse), dV = P^T dO, dS = P (dO V^T - rowsum(dO O)),
    dQ = scale dS K, dK = scale dS^T Q."""
    q, k, v = _split_heads(qkv, heads)
    do, o = _heads(dout, heads), _heads(out, heads)
    p = torch.exp(q @ k.transpose(-1, -2) * scale - lse[..., None])
    ds = p * (do @ v.transpose(-1, -2) - (do * o).sum(-1, keepdim=True))
    grads = [ds @ k * scale, ds.transpose(-1, -2) @ q * scale, p.transpose(-1, -2) @ do]
    return torch.cat([_merge_heads(g) for g in grads], -1).to(qkv.dtype)


def _cpu(qkv, heads, scale):
    return tuple(_backend.extension().low_rank_attention_fwd_cpu(qkv, heads, scale))


def _cuda(qkv, heads, scale):
    return tuple(_backend.extension().low_rank_attention_fwd_cuda(qkv, heads, scale))


def _cpu_bwd(*args):
    return _backend.extension().low_rank_attention_bwd_cpu(*args)


def _cuda_bwd(*args):
    return _backend.extension().low_rank_attention_bwd_cuda(*args)


def _triton(*args):
    from effkern.triton_kernels.low_rank_attention import low_rank_attention_fwd_triton

    return low_rank_attention_fwd_triton(*args)


def _triton_bwd(*args):
    from effkern.triton_kernels.low_rank_attention import low_rank_attention_bwd_triton

    return low_rank_attention_bwd_triton(*args)


_IMPLS = {"reference": reference, "cpu": _cpu, "cuda": _cuda, "triton": _triton}
_BWD_IMPLS = {"reference": bwd_reference, "cpu": _cpu_bwd, "cuda": _cuda_bwd, "triton": _triton_bwd}


def _preferred(qkv: torch.Tensor, heads: int) -> list[str]:
    if qkv.device.type == "cpu":
        return native(qkv, ["cpu"])
    return native(qkv, ["cuda", "triton"] if qkv.shape[-1] // (3 * heads) <= CUDA_MAX_HEAD_DIM else ["triton"])


@custom_op("effkern::low_rank_attention_core")
def op(qkv: torch.Tensor, heads: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention inside the low-rank space: qkv [K, B, N, 3r] (any strides, contiguous last dim) ->
    (out [K, B, N, r], lse fp32 [K, B, H, N])."""
    return _backend.run("low_rank_attention", qkv.device, _preferred(qkv, heads), _IMPLS, qkv, heads, scale)


@op.register_fake
def _(qkv, heads, scale):
    kk, b, n, three_r = qkv.shape
    return qkv.new_empty((kk, b, n, three_r // 3)), qkv.new_empty((kk, b, heads, n), dtype=acc_dtype(qkv))


@custom_op("effkern::low_rank_attention_core_bwd")
def bwd_op(qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, dout: torch.Tensor, heads: int,
           scale: float) -> torch.Tensor:
    """dqkv [K, B, N, 3r] (contiguous) of the core from its saved forward and dout [K, B, N, r] (contiguous)."""
    return _backend.run("low_rank_attention", qkv.device, _preferred(qkv, heads), _BWD_IMPLS, qkv, out, lse, dout,
                        heads, scale)


@bwd_op.register_fake
def _(qkv, out, lse, dout, heads, scale):
    return qkv.new_empty(qkv.shape)


def _setup_context(ctx, inputs, output):
    qkv, heads, scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(qkv, out, lse)
    ctx.heads, ctx.scale = heads, scale


def _backward(ctx, dout, _dlse):
    qkv, out, lse = ctx.saved_tensors
    return bwd_op(qkv, out, lse, dout.contiguous(), ctx.heads, ctx.scale), None, None


_differentiable = register_autograd(op, _backward, _setup_context)


def check_weights(x: torch.Tensor, w_qkv: torch.Tensor, w_o: torch.Tensor, heads: int,
                  scale: float | None) -> float:
    """Checks of the side networks' weights against tokens x ``[..., d]``; returns the heads as an int and the
    logit scale."""
    d = x.shape[-1]
    check_tensor("w_qkv", w_qkv, ndim=3, device=x.device, shape=(None, d), dims="[K, d, 3r]")
    kk, _, three_r = w_qkv.shape
    check_same_dtype("w_qkv", w_qkv, "x", x)
    if kk == 0 or three_r == 0 or three_r % 3:
        raise ValueError(f"w_qkv [K, d, 3r] needs K >= 1 and a last dim 3r > 0 divisible by 3, got "
                         f"{tuple(w_qkv.shape)}")
    r = three_r // 3
    check_tensor("w_o", w_o, ndim=3, device=x.device, shape=(kk, r, d), dims="[K, r, d]")
    check_same_dtype("w_o", w_o, "x", x)
    heads = check_int("heads", heads, 1)
    if r % heads:
        raise ValueError(f"heads must be a positive divisor of the rank r={r}, got {heads}")
    return heads, 1.0 / math.sqrt(r // heads) if scale is None else float(scale)


def down_projection(x: torch.Tensor, w_qkv: torch.Tensor) -> torch.Tensor:
    """qkv ``[K, B, N, 3r]`` of x ``[B, N, d]`` (shared: ONE ``[B N, d] x [d, K 3r]`` GEMM for every side network,
    returned as a strided view) or ``[K, B, N, d]`` (a 3-D GEMM over ``[K, B N, d]``; a 4-D broadcast matmul would
    run B small GEMMs per network and reduce the weight gradient over B afterwards)."""
    kk, d, three_r = w_qkv.shape
    b, n = x.shape[-3:-1]
    if x.dim() == 3:
        qkv = (x.reshape(b * n, d) @ w_qkv.permute(1, 0, 2).reshape(d, kk * three_r)).view(b, n, kk, three_r)
        return qkv.permute(2, 0, 1, 3)
    return torch.bmm(x.reshape(kk, b * n, d), w_qkv).view(kk, b, n, three_r)


def low_rank_attention(
    x: torch.Tensor,
    w_qkv: torch.Tensor,
    w_o: torch.Tensor,
    *,
    heads: int = 1,
    scale: float | None = None,
) -> torch.Tensor:
    """Low-rank self-attention of K side networks (LAST's LSA block without its LayerNorm and residual; with
    them: :func:`effkern.ops.low_rank_attention_block`).

    Args:
        x: ``[B, N, d]`` tokens shared by every side network, or ``[K, B, N, d]`` one set per side network.
        w_qkv: ``[K, d, 3r]`` down-projections, columns ``[q | k | v]``, each split into ``heads`` heads.
        w_o: ``[K, r, d]`` up-projections.
        heads: attention heads inside the rank-r space (``r % heads == 0``; any head dim, odd included).
        scale: logit scale, default ``1 / sqrt(r / heads)`` (``1 / sqrt(r)`` with one head, as in LAST).

    Returns:
        ``[K, B, N, d]`` in x's dtype. Differentiable in x, w_qkv and w_o.
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES, dims="[B, N, d] or [K, B, N, d]")
    if x.dim() not in (3, 4):
        raise ValueError(f"x must be [B, N, d] or [K, B, N, d], got shape {tuple(x.shape)}")
    heads, scale = check_weights(x, w_qkv, w_o, heads, scale)
    kk, r, d = w_o.shape
    if x.dim() == 4 and x.shape[0] != kk:
        raise ValueError(f"x [K, B, N, d] must have K={kk} (w_qkv's side networks) in dim 0, got {tuple(x.shape)}")
    b, n = x.shape[-3:-1]
    out, _ = _differentiable(down_projection(x, w_qkv), heads, scale)
    return torch.bmm(out.reshape(kk, b * n, r), w_o).view(kk, b, n, d)
