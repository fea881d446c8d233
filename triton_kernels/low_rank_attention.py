"""Triton kernels for the core of ``effkern.ops.low_rank_attention``: attention inside the rank-r space of K side
networks, forward and backward (FlashAttention-2 style: online softmax, probabilities never stored).

qkv ``[K, B, N, 3r]`` (strided, unit last stride) holds each token's ``[q | k | v]``; head h of a part is columns
``[h dh, (h + 1) dh)``. Head dims are padded to a power of two >= 16 in registers (``tl.dot``'s minimum).

- ``_fwd_kernel``, grid ``(K B, H, cdiv(N, BLOCK_M))``: a block of query rows against all keys; writes out
  ``[K, B, N, r]`` and the rows' log-sum-exp ``[K, B, H, N]`` (fp32).
- ``_bwd_dkdv_kernel``, grid ``(K B, H, cdiv(N, BLOCK_N))``: a block of keys against all query rows
  (probabilities recomputed from the log-sum-exp): dK, dV.
- ``_bwd_dq_kernel``, grid ``(K B, H, cdiv(N, BLOCK_M))``: dQ. Two kernels instead of atomics: deterministic.

Numerics: fp32 inputs use IEEE fp32 dots (not TF32); fp16/bf16 inputs use 16-bit dots with fp32 accumulation
(probabilities and dS rounded to the input dtype for their dots, as in FlashAttention). bf16 ``tl.dot`` is wrong
in the interpreter, so there (only) bf16 tiles are widened to fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _checks as chk
from .gqa_decode import block_size, interpreting

NUM_WARPS = 4


@triton.jit
def _dot(a, b, DOT_F32: tl.constexpr):
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _tile(base, rows, n, stride_n, offs_d, DH: tl.constexpr):
    """[len(rows), BLOCK_D] tile of one part/head: rows < n, columns < DH (zeros elsewhere)."""
    mask = (rows < n)[:, None] & (offs_d < DH)[None, :]
    return tl.load(base + rows[:, None].to(tl.int64) * stride_n + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _program_head(qkv_ptr, stride_k, stride_b, n_batch, DH: tl.constexpr):
    """This program's (side network * B + image, head) and the head's first q column in qkv."""
    kb = tl.program_id(0)
    h = tl.program_id(1)
    return kb, h, qkv_ptr + (kb // n_batch).to(tl.int64) * stride_k + (kb % n_batch).to(tl.int64) * stride_b + h * DH


@triton.jit
def _fwd_kernel(qkv_ptr, out_ptr, lse_ptr, scale, stride_k, stride_b, stride_n, n_batch, n_tok,
                HEADS: tl.constexpr, DH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr):
    kb, h, base = _program_head(qkv_ptr, stride_k, stride_b, n_batch, DH)
    R: tl.constexpr = HEADS * DH
    rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _tile(base, rows, n_tok, stride_n, offs_d, DH)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(0, n_tok, BLOCK_N):
        cols = start + offs_n
        k = _tile(base + R, cols, n_tok, stride_n, offs_d, DH)
        v = _tile(base + 2 * R, cols, n_tok, stride_n, offs_d, DH)
        s = _dot(q, tl.trans(k), DOT_F32) * scale
        s = tl.where((cols < n_tok)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # every block has >= 1 valid key: finite
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_F32)
        m_i = m_new
    row_mask = rows < n_tok
    out = acc / l_i[:, None]
    o_ptr = out_ptr + (kb.to(tl.int64) * n_tok + rows[:, None]) * R + h * DH + offs_d[None, :]
    tl.store(o_ptr, out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & (offs_d < DH)[None, :])
    tl.store(lse_ptr + (kb.to(tl.int64) * HEADS + h) * n_tok + rows, m_i + tl.log(l_i), mask=row_mask)


@triton.jit
def _probs(q, k, lse, rows, cols, n_tok, scale, DOT_F32: tl.constexpr):
    """P = exp(scale q k^T - lse) with rows / cols past n_tok zeroed."""
    p = tl.exp(_dot(q, tl.trans(k), DOT_F32) * scale - lse[:, None])
    return tl.where((rows < n_tok)[:, None] & (cols < n_tok)[None, :], p, 0.0)


@triton.jit
def _query_rows(base, dout_ptr, lse_ptr, delta_ptr, kb, h, rows, n_tok, stride_n, offs_d, HEADS: tl.constexpr,
                DH: tl.constexpr):
    """What the backward needs of a block of query rows: q, dO, and the rows' saved lse and delta."""
    R: tl.constexpr = HEADS * DH
    q = _tile(base, rows, n_tok, stride_n, offs_d, DH)
    do = _tile(dout_ptr + kb.to(tl.int64) * n_tok * R + h * DH, rows, n_tok, R, offs_d, DH)
    stats = (kb.to(tl.int64) * HEADS + h) * n_tok + rows
    lse = tl.load(lse_ptr + stats, mask=rows < n_tok, other=0.0)
    delta = tl.load(delta_ptr + stats, mask=rows < n_tok, other=0.0)
    return q, do, lse, delta


@triton.jit
def _bwd_dkdv_kernel(qkv_ptr, dout_ptr, lse_ptr, delta_ptr, dqkv_ptr, scale, stride_k, stride_b, stride_n, n_batch,
                     n_tok, HEADS: tl.constexpr, DH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr):
    kb, h, base = _program_head(qkv_ptr, stride_k, stride_b, n_batch, DH)
    R: tl.constexpr = HEADS * DH
    cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    k = _tile(base + R, cols, n_tok, stride_n, offs_d, DH)
    v = _tile(base + 2 * R, cols, n_tok, stride_n, offs_d, DH)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start in range(0, n_tok, BLOCK_M):
        q, do, lse, delta = _query_rows(base, dout_ptr, lse_ptr, delta_ptr, kb, h, start + offs_m, n_tok, stride_n,
                                        offs_d, HEADS, DH)
        p = _probs(q, k, lse, start + offs_m, cols, n_tok, scale, DOT_F32)
        dv += _dot(tl.trans(p.to(do.dtype)), do, DOT_F32)
        ds = p * (_dot(do, tl.trans(v), DOT_F32) - delta[:, None])
        dk += _dot(tl.trans(ds.to(q.dtype)), q, DOT_F32)
    mask = (cols < n_tok)[:, None] & (offs_d < DH)[None, :]
    d_ptr = dqkv_ptr + (kb.to(tl.int64) * n_tok + cols[:, None]) * 3 * R + h * DH + offs_d[None, :]
    tl.store(d_ptr + R, (dk * scale).to(dqkv_ptr.dtype.element_ty), mask=mask)
    tl.store(d_ptr + 2 * R, dv.to(dqkv_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_dq_kernel(qkv_ptr, dout_ptr, lse_ptr, delta_ptr, dqkv_ptr, scale, stride_k, stride_b, stride_n, n_batch,
                   n_tok, HEADS: tl.constexpr, DH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr):
    kb, h, base = _program_head(qkv_ptr, stride_k, stride_b, n_batch, DH)
    R: tl.constexpr = HEADS * DH
    rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q, do, lse, delta = _query_rows(base, dout_ptr, lse_ptr, delta_ptr, kb, h, rows, n_tok, stride_n, offs_d, HEADS,
                                    DH)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(0, n_tok, BLOCK_N):
        cols = start + offs_n
        k = _tile(base + R, cols, n_tok, stride_n, offs_d, DH)
        v = _tile(base + 2 * R, cols, n_tok, stride_n, offs_d, DH)
        p = _probs(q, k, lse, rows, cols, n_tok, scale, DOT_F32)
        ds = p * (_dot(do, tl.trans(v), DOT_F32) - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, DOT_F32)
    mask = (rows < n_tok)[:, None] & (offs_d < DH)[None, :]
    d_ptr = dqkv_ptr + (kb.to(tl.int64) * n_tok + rows[:, None]) * 3 * R + h * DH + offs_d[None, :]
    tl.store(d_ptr, (dq * scale).to(dqkv_ptr.dtype.element_ty), mask=mask)


def kernel_constexprs(dtype: torch.dtype, heads: int, dh: int, interpret: bool) -> dict:
    """Compile-time parameters shared by the three kernels (and the GPU compile test). Row blocks of 32 query
    rows / keys; 16 with fp32 tiles of head dims >= 32 (the dK/dV kernel holds six [block, dh] fp32 tiles and
    fp32 dots do not use the tensor cores: 32 rows spill there on sm_80/sm_90)."""
    block_d = block_size(dh)
    block = 16 if dtype == torch.float32 and block_d >= 32 else 32
    return dict(HEADS=heads, DH=dh, BLOCK_M=block, BLOCK_N=block, BLOCK_D=block_d,
                DOT_F32=dtype == torch.float32 or (dtype == torch.bfloat16 and interpret))


def _launch_args(qkv: torch.Tensor, heads: int):
    op = "low_rank_attention_triton"
    chk.float_tensor(op, "qkv", qkv, 4)
    chk.unit_last_stride(op, "qkv", qkv)
    chk.require(heads > 0 and qkv.shape[3] % (3 * heads) == 0, op,
                lambda: f"qkv's last dim must be 3 * heads * head_dim with heads={heads} >= 1, got {qkv.shape[3]}")
    kk, b, n, three_r = qkv.shape
    consts = kernel_constexprs(qkv.dtype, heads, three_r // (3 * heads), interpreting())
    return kk, b, n, three_r // 3, consts


def low_rank_attention_fwd_triton(qkv: torch.Tensor, heads: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [K, B, N, r] in qkv's dtype, lse fp32 [K, B, H, N]) on normalised arguments."""
    kk, b, n, r, consts = _launch_args(qkv, heads)
    grid = (kk * b, heads, triton.cdiv(n, consts["BLOCK_M"]))
    out = torch.empty((kk, b, n, r), dtype=qkv.dtype, device=qkv.device)
    lse = torch.empty((kk, b, heads, n), dtype=torch.float32, device=qkv.device)
    if out.numel():
        _fwd_kernel[grid](
            qkv, out, lse, float(scale), *qkv.stride()[:3], b, n, **consts, num_warps=NUM_WARPS)
    return out, lse


def low_rank_attention_bwd_triton(qkv, out, lse, dout, heads: int, scale: float) -> torch.Tensor:
    """dqkv [K, B, N, 3r] (contiguous) from the saved forward; out and dout contiguous [K, B, N, r]."""
    kk, b, n, r, consts = _launch_args(qkv, heads)
    op = "low_rank_attention_bwd_triton"
    chk.require(all(chk.dense(t, qkv.dtype, (kk, b, n, r)) and t.device == qkv.device for t in (out, dout)), op,
                lambda: f"out and dout must be contiguous [K, B, N, r] = [{kk}, {b}, {n}, {r}] tensors of qkv's dtype")
    chk.require(chk.dense(lse, torch.float32, (kk, b, heads, n)) and lse.device == qkv.device, op,
                lambda: f"lse must be a contiguous float32 [K, B, H, N] = [{kk}, {b}, {heads}, {n}] tensor")
    dqkv = torch.empty((kk, b, n, 3 * r), dtype=qkv.dtype, device=qkv.device)
    if not dqkv.numel():
        return dqkv
    delta = (dout.float() * out.float()).view(kk, b, n, heads, r // heads).sum(-1).transpose(2, 3).contiguous()
    args = (qkv, dout, lse, delta, dqkv, float(scale), *qkv.stride()[:3], b, n)
    grid = (kk * b, heads, triton.cdiv(n, consts["BLOCK_M"]))  # BLOCK_M == BLOCK_N
    _bwd_dkdv_kernel[grid](*args, **consts, num_warps=NUM_WARPS)
    _bwd_dq_kernel[grid](*args, **consts, num_warps=NUM_WARPS)
    return dqkv
