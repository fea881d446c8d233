"""``effkern.ops.low_rank_linear``: a dense layer factorised through rank r, fused:
``y = out_act(act(x U^T + b1) V^T + b2)``.

The compressed MLP layer of CTR low-rank compression (PAPERS.md E: ``W ~= U_k U_k^T W`` written as two linears,
``act`` = none for the exact variant, the layer's own activation for ``_act``; ``out_act`` = the activation that
follows the compressed layer in the MLP, fused into the output's store instead of a separate pass over the
``[M, d_out]`` output). ``U: [r, d_in]``, ``V: [d_out, r]`` (``nn.Linear`` weight layouts), ``act`` in none / relu /
gelu (exact, erf-based, as ``F.gelu``), ``out_act`` none or relu (its backward, g where y is not <= 0, needs only y).

Fused: the rank-r hidden layer is never written to memory. The C++ CPU kernel runs both products over tiles of 24
rows of x held in fp32 registers/L1 (its own AVX-512 / AVX2 micro-kernels on weights packed once per call), the bias
and activation applied in registers between them and the output's bias and ReLU as it is stored (streaming stores
from a 1 MiB output on); a forward of up to 4 rows (32 when u and v take 1 MiB or more) runs as dot products
straight from u and v instead, packing nothing (measured: README "Backends"); its backward
recomputes the hidden layer per tile (one extra rank-r product instead of storing it), applies the output ReLU's
backward as it reads g and accumulates the weight gradients per thread. On CUDA tensors: ranks up to 64 run the CUDA
kernels (a block of 64 rows holds the whole hidden tile in shared memory, fp32 FMAs), larger ranks the Triton
kernels (``tl.dot``); both fuse the forward fully and the backward up to dx, writing only the rank-sized ``act(t)``
and ``dt`` for the two weight-gradient GEMMs (cuBLAS, over all rows). Accumulation is fp32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from effkern.ops import _backend
from effkern.ops._checks import FLOAT_DTYPES, acc_dtype, check_tensor, native
from effkern.ops._op import custom_op, register_autograd

ACTIVATIONS = ("none", "relu", "gelu")  # the kernels' act codes are the indices
OUT_ACTIVATIONS = ("none", "relu")  # out_act codes, the same way
CUDA_MAX_RANK = 64  # csrc/cuda/low_rank_linear.cuh: kLowRankLinearMaxRank


def _act(t: torch.Tensor, act: int) -> torch.Tensor:
    return t if act == 0 else F.relu(t) if act == 1 else F.gelu(t)


def _act_grad(t: torch.Tensor, act: int) -> torch.Tensor:
    if act == 0:
        return torch.ones_like(t)
    if act == 1:
        return (~(t <= 0)).to(t.dtype)  # as torch's threshold_backward: 0 at 0, the gradient kept at NaN
    cdf = 0.5 * (1 + torch.erf(t / math.sqrt(2)))
    return cdf + t * torch.exp(-0.5 * t * t) / math.sqrt(2 * math.pi)


def _hidden(x, u, b1, act):
    acc = acc_dtype(x)
    t = F.linear(x.to(acc), u.to(acc), None if b1 is None else b1.to(acc))
    return t, _act(t, act)


def reference(x, u, b1, v, b2, act: int, out_act: int) -> torch.Tensor:
    """Ground truth: ``y [M, d_out]`` in x's dtype."""
    check_biases(x, b1, u.shape[0], b2, v.shape[0])
    _, a = _hidden(x, u, b1, act)
    return _act(F.linear(a, v.to(a.dtype), None if b2 is None else b2.to(a.dtype)), out_act).to(x.dtype)


def _masked(g, y):
    """The gradient through a relu'd output y (None: no out_act): 0 where y <= 0, else g, as torch's relu backward."""
    return g if y is None else torch.ops.aten.threshold_backward(g, y, 0)


def bwd_reference(x, u, b1, v, g, y, act: int):
    """``(dx, du, db1, dv, db2)`` in the inputs' dtype: with g zeroed where y <= 0 when y (the relu'd output) is given,
    dt = (g V) * act'(t), dx = dt U, dU = dt^T x, dV = g^T act(t), db1 = sum dt, db2 = sum g."""
    check_biases(x, b1, u.shape[0], None, v.shape[0])
    t, a = _hidden(x, u, b1, act)
    gf = _masked(g, y).to(t.dtype)
    dt = (gf @ v.to(t.dtype)) * _act_grad(t, act)
    grads = (dt @ u.to(t.dtype), dt.t() @ x.to(t.dtype), dt.sum(0), gf.t() @ a, gf.sum(0))
    return tuple(t.to(x.dtype) for t in grads)


def _cpu(x, u, b1, v, b2, act, out_act):  # the C++ CPU kernels pack the weights from any strides
    return _backend.extension().low_rank_linear_fwd_cpu(x, u, b1, v, b2, act, out_act)


def _cuda(x, u, b1, v, b2, act, out_act):
    return _backend.extension().low_rank_linear_fwd_cuda(x, u.contiguous(), b1, v.contiguous(), b2, act, out_act)


def _cpu_bwd(x, u, b1, v, g, y, act):
    return tuple(_backend.extension().low_rank_linear_bwd_cpu(x, u, b1, v, g, y, act))


def _gpu_bwd(dx_kernel):
    """A GPU backend's backward from its kernel ``dx_kernel(x, u, b1, v, g, act) -> (dx, act(t), dt)``: g masked by
    y first (the weight-gradient GEMMs need the masked g too), then du, db1, dv, db2 from the rank-sized act(t) and
    dt by GEMMs over all rows (cuBLAS), fp32."""
    def bwd(x, u, b1, v, g, y, act):
        g = _masked(g, y)
        dx, hidden, dt = dx_kernel(x, u, b1, v, g, act)
        acc = torch.float32
        return (dx, (dt.t().to(acc) @ x.to(acc)).to(x.dtype), dt.to(acc).sum(0).to(x.dtype),
                (g.t().to(acc) @ hidden.to(acc)).to(x.dtype), g.to(acc).sum(0).to(x.dtype))
    return bwd


def _cuda_dx(x, u, b1, v, g, act):
    return _backend.extension().low_rank_linear_bwd_cuda(x, u.contiguous(), b1, v.contiguous(), g, act)


def _triton(*args):
    from effkern.triton_kernels.low_rank_linear import low_rank_linear_fwd_triton

    return low_rank_linear_fwd_triton(*args)


def _triton_dx(*args):
    from effkern.triton_kernels.low_rank_linear import low_rank_linear_bwd_triton

    return low_rank_linear_bwd_triton(*args)


_cuda_bwd, _triton_bwd = _gpu_bwd(_cuda_dx), _gpu_bwd(_triton_dx)
_IMPLS = {"reference": reference, "cpu": _cpu, "cuda": _cuda, "triton": _triton}
_BWD_IMPLS = {"reference": bwd_reference, "cpu": _cpu_bwd, "cuda": _cuda_bwd, "triton": _triton_bwd}


def _preferred(x: torch.Tensor, u: torch.Tensor) -> list[str]:
    if x.device.type == "cpu":
        return native(x, ["cpu"])
    return native(x, ["cuda", "triton"] if u.shape[0] <= CUDA_MAX_RANK else ["triton"])


@custom_op("effkern::low_rank_linear")
def op(x: torch.Tensor, u: torch.Tensor, b1: torch.Tensor | None, v: torch.Tensor, b2: torch.Tensor | None,
       act: int, out_act: int) -> torch.Tensor:
    """x contiguous [M, d_in] -> y [M, d_out]."""
    return _backend.run("low_rank_linear", x.device, _preferred(x, u), _IMPLS, x, u, b1, v, b2, act, out_act)


@op.register_fake
def _(x, u, b1, v, b2, act, out_act):
    return x.new_empty((x.shape[0], v.shape[0]))


@custom_op("effkern::low_rank_linear_bwd")
def bwd_op(x: torch.Tensor, u: torch.Tensor, b1: torch.Tensor | None, v: torch.Tensor, g: torch.Tensor,
           y: torch.Tensor | None, act: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                      torch.Tensor]:
    """(dx, du, db1, dv, db2) from x, the weights and g = dL/dy (contiguous [M, d_out]); y, the forward's output when
    it was relu'd (else None), zeroes g where y <= 0 (the C++ CPU kernel in the same pass, the GPU backends first)."""
    return _backend.run("low_rank_linear", x.device, _preferred(x, u), _BWD_IMPLS, x, u, b1, v, g, y, act)


@bwd_op.register_fake
def _(x, u, b1, v, g, y, act):
    return (torch.empty_like(x), torch.empty_like(u), u.new_empty(u.shape[0]), torch.empty_like(v),
            v.new_empty(v.shape[0]))


def _setup_context(ctx, inputs, output):
    x, u, b1, v, b2, act, out_act = inputs
    ctx.save_for_backward(x, u, b1, v, output if out_act else None)
    ctx.act, ctx.has_b2 = act, b2 is not None


def _backward(ctx, g):
    x, u, b1, v, y = ctx.saved_tensors
    dx, du, db1, dv, db2 = bwd_op(x, u, b1, v, g.contiguous(), y, ctx.act)
    return dx, du, db1 if b1 is not None else None, dv, db2 if ctx.has_b2 else None, None, None


_differentiable = register_autograd(op, _backward, _setup_context)


def check_biases(x: torch.Tensor, b1: torch.Tensor | None, r: int, b2: torch.Tensor | None, d_out: int) -> None:
    """b1 ``[r]`` and b2 ``[d_out]``, each None or a tensor of x's dtype and device (the entry point's check, and the
    references': torch.ops callers reach them without the entry point, and F.linear would broadcast a wrong length)."""
    for name, b, n in (("b1", b1, r), ("b2", b2, d_out)):
        if b is None:
            continue
        if not isinstance(b, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor [{n}] or None, got {type(b).__name__}")
        if b.dim() != 1:
            raise ValueError(f"{name} must be 1-D [{n}], got shape {tuple(b.shape)}")
        if b.shape[0] != n:
            raise ValueError(f"{name} [{n}] must have size {n} in dim 0, got shape {tuple(b.shape)}")
        if b.device != x.device:
            raise ValueError(f"{name} must be on {x.device} like the other inputs, got {b.device}")
        if b.dtype != x.dtype:
            raise TypeError(f"{name} must have the same dtype as x ({x.dtype}), got {b.dtype}")


def check_args(x, u, v, b1, b2, activation, out_activation) -> None:
    """The entry point's argument checks; the first failing one raises, naming the argument and the expectation.
    Each is a plain condition written once (not :func:`~effkern.ops._checks.check_tensor`): they run on every eager
    call, where the generic helpers cost a large part of a few-row call (measured: README "Backends")."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor [..., d_in], got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        check_tensor("x", x, dtypes=FLOAT_DTYPES)  # raises, listing the dtypes
    if x.dim() == 0:
        raise ValueError("x must be [..., d_in], got a scalar")
    for name, t, dims in (("u", u, "[r, d_in]"), ("v", v, "[d_out, r]")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor {dims}, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D {dims}, got shape {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name} must be on {x.device} like the other inputs, got {t.device}")
        if t.dtype != x.dtype:
            raise TypeError(f"{name} must have the same dtype as x ({x.dtype}), got {t.dtype}")
    (r, d_in), d_out = u.shape, v.shape[0]
    if d_in != x.shape[-1]:
        raise ValueError(f"u [r, d_in] must have size {x.shape[-1]} in dim 1, got shape {tuple(u.shape)}")
    if v.shape[1] != r:
        raise ValueError(f"v [d_out, r] must have size {r} in dim 1, got shape {tuple(v.shape)}")
    if not (r and d_in and d_out):
        raise ValueError(f"r, d_in and d_out must be >= 1, got u {tuple(u.shape)} and v {tuple(v.shape)}")
    if b1 is not None or b2 is not None:
        check_biases(x, b1, r, b2, d_out)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if out_activation not in OUT_ACTIVATIONS:
        raise ValueError(f"out_activation must be one of {OUT_ACTIVATIONS}, got {out_activation!r}")


def low_rank_linear(x: torch.Tensor, u: torch.Tensor, v: torch.Tensor, b1: torch.Tensor | None = None,
                    b2: torch.Tensor | None = None, activation: str = "none",
                    out_activation: str = "none") -> torch.Tensor:
    """``out_act(act(x u^T + b1) v^T + b2)`` with the rank-r hidden layer never in memory.

    Args:
        x: ``[..., d_in]``.
        u: ``[r, d_in]`` first factor; v: ``[d_out, r]`` second factor (``nn.Linear`` weight layouts).
        b1: ``[r]`` or None; b2: ``[d_out]`` or None.
        activation: ``"none"`` (the exact factorisation), ``"relu"`` or ``"gelu"``, applied to the hidden layer.
        out_activation: ``"none"`` or ``"relu"``, applied to the output as it is stored (an MLP's own activation
            after a compressed layer; bit-identical to ``F.relu`` of the unfused output).

    Returns:
        ``[..., d_out]`` in x's dtype. Differentiable in x, u, v and the biases.
    """
    check_args(x, u, v, b1, b2, activation, out_activation)
    d_in = x.shape[-1]
    if b1 is not None:  # the kernels read the biases densely
        b1 = b1.contiguous()
    if b2 is not None:
        b2 = b2.contiguous()
    flat = x.dim() == 2  # no reshape then: each view would add a node to the autograd graph
    y = _differentiable((x if flat else x.reshape(-1, d_in)).contiguous(), u, b1, v, b2,
                        ACTIVATIONS.index(activation), OUT_ACTIVATIONS.index(out_activation))
    return y if flat else y.view(*x.shape[:-1], v.shape[0])
