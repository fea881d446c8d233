"""Triton kernels of ``effkern.ops.low_rank_linear``: ``y = act(x U^T + b1) V^T + b2`` over blocks of rows.

- ``_lrl_fwd_kernel``, grid ``cdiv(M, BLOCK_M)``: t = x U^T accumulated over d_in in ``BLOCK_K`` slices into a
  ``[BLOCK_M, BLOCK_R]`` register tile (the whole rank), bias + activation in registers, then y = act(t) V^T + b2
  in ``BLOCK_N`` column slices. The hidden layer never reaches memory.
- ``_lrl_bwd_kernel``, same grid: recomputes t, da = g V (over d_out slices), dt = da * act'(t), dx = dt U (over
  d_in slices, written), and writes the rank-sized act(t) and dt for the op's two weight-gradient GEMMs
  (dU = dt^T x, dV = g^T act(t): reductions over all rows, which cuBLAS does better than atomics).

Numerics: fp32 inputs use IEEE fp32 dots; fp16/bf16 use 16-bit dots with fp32 accumulation (the hidden tile
rounded to the input dtype for its dot). bf16 ``tl.dot`` is wrong in the interpreter, so there bf16 tiles are
widened to fp32. GELU is the exact (erf) one, through the same Abramowitz-Stegun 7.1.26 erfc as the C++ kernel
(|error| <= 1.5e-7; the interpreter has no libdevice erf).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _checks as chk
from .gqa_decode import block_size, interpreting
from .low_rank_attention import _dot

NUM_WARPS = 4


@triton.jit
def _normal_cdf(t):
    z = tl.abs(t) * 0.7071067811865476
    s = 1.0 / (1.0 + 0.3275911 * z)
    poly = ((((1.061405429 * s - 1.453152027) * s + 1.421413741) * s - 0.284496736) * s + 0.254829592) * s
    q = 0.5 * poly * tl.exp(-z * z)  # Phi(-|t|)
    return tl.where(t > 0, 1.0 - q, q)


@triton.jit
def _relu(t):
    """ReLU as torch's: NaN stays NaN (tl.maximum's default drops it on the GPU and would hide a diverged row)."""
    return tl.where(t < 0, 0.0, t)


@triton.jit
def _act(t, ACT: tl.constexpr):
    if ACT == 1:
        return _relu(t)
    if ACT == 2:
        return t * _normal_cdf(t)
    return t


@triton.jit
def _act_grad(t, ACT: tl.constexpr):
    if ACT == 1:
        return tl.where(t <= 0, 0.0, 1.0)  # NaN passes the gradient, as torch's threshold_backward
    if ACT == 2:
        return _normal_cdf(t) + t * tl.exp(-0.5 * t * t) * 0.3989422804014327
    return tl.full(t.shape, 1.0, tl.float32)


@triton.jit
def _hidden(x_ptr, u_ptr, b1_ptr, rows, offs_r, n_rows, d_in, rank, HAS_B1: tl.constexpr, BLOCK_M: tl.constexpr,
            BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, DOT_F32: tl.constexpr):
    """t = x U^T + b1 for the block's rows: fp32 [BLOCK_M, BLOCK_R] (columns >= rank are 0: set outright, since x . 0
    is NaN for an infinite x, and NaN * 0 would reach every output through the padded columns)."""
    t = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for k0 in range(0, d_in, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * d_in + ks[None, :],
                    mask=(rows < n_rows)[:, None] & (ks < d_in)[None, :], other=0.0)
        ut = tl.load(u_ptr + offs_r[None, :] * d_in + ks[:, None], mask=(ks < d_in)[:, None] & (offs_r < rank)[None, :],
                     other=0.0)
        t += _dot(x, ut, DOT_F32)
    if HAS_B1:
        t += tl.load(b1_ptr + offs_r, mask=offs_r < rank, other=0.0).to(tl.float32)[None, :]
    return tl.where((offs_r < rank)[None, :], t, 0.0)


@triton.jit
def _lrl_fwd_kernel(x_ptr, u_ptr, b1_ptr, v_ptr, b2_ptr, y_ptr, n_rows, d_in, rank, d_out, HAS_B1: tl.constexpr,
                    HAS_B2: tl.constexpr, ACT: tl.constexpr, RELU_OUT: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    t = _hidden(x_ptr, u_ptr, b1_ptr, rows, offs_r, n_rows, d_in, rank, HAS_B1, BLOCK_M, BLOCK_K, BLOCK_R, DOT_F32)
    a = _act(t, ACT).to(y_ptr.dtype.element_ty)
    for n0 in range(0, d_out, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        vt = tl.load(v_ptr + ns[None, :] * rank + offs_r[:, None],
                     mask=(offs_r < rank)[:, None] & (ns < d_out)[None, :], other=0.0)
        y = _dot(a, vt, DOT_F32)
        if HAS_B2:
            y += tl.load(b2_ptr + ns, mask=ns < d_out, other=0.0).to(tl.float32)[None, :]
        if RELU_OUT:
            y = _relu(y)
        tl.store(y_ptr + rows[:, None].to(tl.int64) * d_out + ns[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=(rows < n_rows)[:, None] & (ns < d_out)[None, :])


@triton.jit
def _lrl_bwd_kernel(x_ptr, u_ptr, b1_ptr, v_ptr, g_ptr, dx_ptr, a_ptr, dt_ptr, n_rows, d_in, rank, d_out,
                    HAS_B1: tl.constexpr, ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    t = _hidden(x_ptr, u_ptr, b1_ptr, rows, offs_r, n_rows, d_in, rank, HAS_B1, BLOCK_M, BLOCK_K, BLOCK_R, DOT_F32)
    da = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for n0 in range(0, d_out, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        g = tl.load(g_ptr + rows[:, None].to(tl.int64) * d_out + ns[None, :],
                    mask=row_ok[:, None] & (ns < d_out)[None, :], other=0.0)
        v = tl.load(v_ptr + ns[:, None] * rank + offs_r[None, :], mask=(ns < d_out)[:, None] & (offs_r < rank)[None, :],
                    other=0.0)
        da += _dot(g, v, DOT_F32)
    dt = tl.where((offs_r < rank)[None, :], da * _act_grad(t, ACT), 0.0).to(dx_ptr.dtype.element_ty)  # as t
    hid = rows[:, None].to(tl.int64) * rank + offs_r[None, :]
    hid_mask = row_ok[:, None] & (offs_r < rank)[None, :]
    tl.store(a_ptr + hid, _act(t, ACT).to(a_ptr.dtype.element_ty), mask=hid_mask)
    tl.store(dt_ptr + hid, dt, mask=hid_mask)
    for k0 in range(0, d_in, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        u = tl.load(u_ptr + offs_r[:, None] * d_in + ks[None, :], mask=(offs_r < rank)[:, None] & (ks < d_in)[None, :],
                    other=0.0)
        dx = _dot(dt, u, DOT_F32).to(dx_ptr.dtype.element_ty)
        tl.store(dx_ptr + rows[:, None].to(tl.int64) * d_in + ks[None, :], dx,
                 mask=row_ok[:, None] & (ks < d_in)[None, :])


def kernel_constexprs(dtype: torch.dtype, rank: int, act: int, has_b1: bool, interpret: bool,
                      backward: bool = False) -> dict:
    """Compile-time parameters (also for the GPU compile test): the whole rank in one register tile. Rows per
    block keep the forward's tile at ~4096 values (32 registers a thread at 4 warps) for 16-bit inputs (tl.dot on
    tensor cores); fp32 dots run as FMAs whose operand tiles also sit in registers, so fp32 takes half the rows
    and narrower slices, and the backward (t, da and dt tiles at once) half again: spill-free on sm_80 / sm_90
    (tests/ops/test_triton_compile.py)."""
    block_r = block_size(rank)
    wide = dtype != torch.float32
    budget = (4096 if wide else 2048) // (2 if backward else 1)
    return dict(HAS_B1=has_b1, ACT=act, BLOCK_M=max(16, min(64, budget // block_r)), BLOCK_K=32 if wide else 16,
                BLOCK_R=block_r, BLOCK_N=64 if wide else 32,
                DOT_F32=dtype == torch.float32 or (dtype == torch.bfloat16 and interpret))


def _dummy(x: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
    return x if t is None else t


def low_rank_linear_fwd_triton(x, u, b1, v, b2, act: int, out_act: int) -> torch.Tensor:
    """y [M, d_out] from contiguous x [M, d_in], u [r, d_in], v [d_out, r] and optional biases; out_act 1 = relu."""
    _check("low_rank_linear_fwd_triton", x, u, b1, v, b2, act)
    chk.require(out_act in (0, 1), "low_rank_linear_fwd_triton",
                lambda: f"out_act must be 0 (none) or 1 (relu), got {out_act}")
    m, d_in = x.shape
    rank, d_out = u.shape[0], v.shape[0]
    u, v = u.contiguous(), v.contiguous()
    y = torch.empty((m, d_out), dtype=x.dtype, device=x.device)
    if m:
        c = kernel_constexprs(x.dtype, rank, act, b1 is not None, interpreting())
        _lrl_fwd_kernel[(triton.cdiv(m, c["BLOCK_M"]),)](
            x, u, _dummy(u, b1), v, _dummy(v, b2), y, m, d_in, rank, d_out, HAS_B2=b2 is not None,
            RELU_OUT=out_act == 1, **c, num_warps=NUM_WARPS)
    return y


def low_rank_linear_bwd_triton(x, u, b1, v, g, act: int):
    """(dx, act(t), dt) of the fused backward; the op forms the weight gradients from the last two."""
    op = "low_rank_linear_bwd_triton"
    _check(op, x, u, b1, v, None, act)
    chk.require(chk.dense(g, x.dtype, (x.shape[0], v.shape[0])) and g.device == x.device, op,
                lambda: f"g must be a contiguous [M, d_out] = [{x.shape[0]}, {v.shape[0]}] tensor like x")
    m, d_in = x.shape
    rank = u.shape[0]
    u, v = u.contiguous(), v.contiguous()
    dx = torch.empty_like(x)
    hidden = torch.empty((m, rank), dtype=x.dtype, device=x.device)
    dt = torch.empty_like(hidden)
    if m:
        c = kernel_constexprs(x.dtype, rank, act, b1 is not None, interpreting(), backward=True)
        _lrl_bwd_kernel[(triton.cdiv(m, c["BLOCK_M"]),)](
            x, u, _dummy(u, b1), v, g, dx, hidden, dt, m, d_in, rank, v.shape[0], **c, num_warps=NUM_WARPS)
    return dx, hidden, dt


def _check(op: str, x, u, b1, v, b2, act: int) -> None:
    """What the kernels rely on: x contiguous [M, d_in], u [r, d_in], v [d_out, r], biases [r] / [d_out], one dtype."""
    chk.float_tensor(op, "x", x, 2)
    chk.require(x.is_contiguous(), op, "x must be contiguous")
    chk.require(u.dim() == 2 and u.dtype == x.dtype and u.shape[1] == x.shape[1], op,
                lambda: f"u must be [r, d_in={x.shape[1]}] in x's dtype {x.dtype}, got {u.dtype} {tuple(u.shape)}")
    chk.require(v.dim() == 2 and v.dtype == x.dtype and v.shape[1] == u.shape[0], op,
                lambda: f"v must be [d_out, r={u.shape[0]}] in x's dtype {x.dtype}, got {v.dtype} {tuple(v.shape)}")
    chk.require(min(u.shape[0], x.shape[1], v.shape[0]) > 0, op, "r, d_in and d_out must be >= 1")
    for name, b, n in (("b1", b1, u.shape[0]), ("b2", b2, v.shape[0])):
        if not (b is None or chk.dense(b, x.dtype, (n,))):
            raise ValueError(f"{op}: {name} must be a contiguous [{n}] tensor of x's dtype {x.dtype}")
    chk.require(act in (0, 1, 2), op, lambda: f"act must be 0 (none), 1 (relu) or 2 (gelu), got {act}")
    chk.on_device(op, x.device, u=u, v=v, b1=b1, b2=b2)
