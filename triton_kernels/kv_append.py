"""Triton kernel for ``effkern.ops.kv_append``: rotate (and optionally project) one new token's keys and write
keys and values into the cache slot of each sequence, in place.

One program per (b, cache head j). With a projection, cache head j's key is ``concat(RoPE(k[b, j*g : j*g+g]))
@ k_proj[j]``; the g input heads of a group are consecutive in ``k``, so the concatenation is just the flat
row ``k[b].flatten()[j*g*D : (j+1)*g*D]`` rotated head by head, walked in ``BLOCK_C`` chunks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _checks as chk
from ._checks import ERR_SLOTS
from .gqa_decode import NUM_WARPS, block_size, chunk_rows, load_rotated


@triton.jit
def _kv_append_kernel(k_ptr, v_ptr, cos_ptr, sin_ptr, proj_ptr, slots_ptr, k_cache_ptr, v_cache_ptr, err_ptr,
                      stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs, num_kv_heads, s_max,
                      GROUP: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DK: tl.constexpr, HEAD_DV: tl.constexpr,
                      ROT_DIM: tl.constexpr, ROPE_STYLE: tl.constexpr, HAS_PROJ: tl.constexpr,
                      BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_C: tl.constexpr):
    """k: [B, Hkv * GROUP, D]; v: [B, Hkv, Dv]; cos/sin: [B, R/2] fp32; proj: [Hkv, GROUP * D, Dk] fp32;
    slots: [B] int32; k_cache: [B, Hkv, S_max, Dk], v_cache: [B, Hkv, S_max, Dv] (strided, unit last stride).
    A slot outside [0, S_max) is not written; it is recorded in err [1] int32 (effkern/ops/_device_errors.py)."""
    b = tl.program_id(0)
    j = tl.program_id(1)
    slot = tl.load(slots_ptr + b)
    ok = (slot >= 0) & (slot < s_max)
    tl.store(err_ptr, ERR_SLOTS, mask=((slot < 0) | (slot >= s_max)) & (j == 0))  # one report per sequence
    slot = tl.where(ok, slot, 0).to(tl.int64)
    k_group = k_ptr + (b * num_kv_heads + j).to(tl.int64) * (GROUP * HEAD_D)
    cos_row = cos_ptr + b * (ROT_DIM // 2)
    sin_row = sin_ptr + b * (ROT_DIM // 2)
    offs_k = tl.arange(0, BLOCK_DK)
    k_mask = offs_k < HEAD_DK
    if HAS_PROJ:
        acc = tl.zeros([BLOCK_DK], dtype=tl.float32)
        proj_group = proj_ptr + j * (GROUP * HEAD_D * HEAD_DK)
        for e0 in range(0, GROUP * HEAD_D, BLOCK_C):
            offs_c = e0 + tl.arange(0, BLOCK_C)
            x = load_rotated(k_group, cos_row, sin_row, offs_c, GROUP * HEAD_D, HEAD_D, ROT_DIM, ROPE_STYLE)
            w = tl.load(proj_group + offs_c[:, None] * HEAD_DK + offs_k[None, :],
                        mask=(offs_c < GROUP * HEAD_D)[:, None] & k_mask[None, :], other=0.0)
            acc += tl.sum(x[:, None] * w, axis=0)
    else:  # GROUP == 1, HEAD_DK == HEAD_D
        acc = load_rotated(k_group, cos_row, sin_row, offs_k, HEAD_D, HEAD_D, ROT_DIM, ROPE_STYLE)
    k_dst = k_cache_ptr + b.to(tl.int64) * stride_kb + j.to(tl.int64) * stride_kh + slot * stride_ks
    tl.store(k_dst + offs_k, acc.to(k_cache_ptr.dtype.element_ty), mask=k_mask & ok)

    offs_v = tl.arange(0, BLOCK_DV)
    v_mask = offs_v < HEAD_DV
    v_row = tl.load(v_ptr + (b * num_kv_heads + j).to(tl.int64) * HEAD_DV + offs_v, mask=v_mask)
    v_dst = v_cache_ptr + b.to(tl.int64) * stride_vb + j.to(tl.int64) * stride_vh + slot * stride_vs
    tl.store(v_dst + offs_v, v_row.to(v_cache_ptr.dtype.element_ty), mask=v_mask & ok)


def kv_append_triton(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slots: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    k_proj: torch.Tensor | None,
    rope_style: int,
    rotary_dim: int,
    err: torch.Tensor,
) -> None:
    """KV append on normalised arguments (the shapes are checked here again: the registered op can be called
    without ``effkern.ops.kv_append``'s checks), in place.

    k_cache: [B, Hkv, S_max, Dk], v_cache: [B, Hkv, S_max, Dv] (any strides, unit last stride); k: [B, Hk, D]
    and v: [B, Hkv, Dv] contiguous in the cache dtype; slots: [B] int32 in [0, S_max); cos, sin: [B, R/2] fp32
    or None; k_proj: [Hkv, (Hk / Hkv) * D, Dk] fp32 or None (then Hk == Hkv, Dk == D); rope_style 0 = half,
    1 = interleaved; rotary_dim R (0 = no RoPE); err: the int32 [1] error word that gets SLOTS for a slot outside
    the cache (that sequence is not written; effkern/ops/_device_errors.py).
    """
    _check(k_cache, v_cache, k, v, slots, cos, sin, k_proj, rope_style, rotary_dim, err)
    b, hkv, s_max, dk = k_cache.shape
    hk, d = k.shape[1:]
    if b == 0 or hkv == 0:
        return
    group = hk // hkv
    block_dk = block_size(dk)
    dummy = k_cache.new_empty(1, dtype=torch.float32)  # stands in for absent cos/sin/k_proj; never read
    _kv_append_kernel[(b, hkv)](
        k, v, dummy if cos is None else cos, dummy if sin is None else sin, dummy if k_proj is None else k_proj,
        slots, k_cache, v_cache, err, *k_cache.stride()[:3], *v_cache.stride()[:3], hkv, s_max,
        GROUP=group, HEAD_D=d, HEAD_DK=dk, HEAD_DV=v_cache.shape[-1], ROT_DIM=rotary_dim, ROPE_STYLE=rope_style,
        HAS_PROJ=k_proj is not None, BLOCK_DK=block_dk, BLOCK_DV=block_size(v_cache.shape[-1]),
        BLOCK_C=chunk_rows(group * d, block_dk), num_warps=NUM_WARPS,
    )


def _check(k_cache, v_cache, k, v, slots, cos, sin, k_proj, rope_style, rotary_dim, err) -> None:
    """What the kernel relies on: shapes, dtypes, strides and devices (see _checks.py)."""
    op = "kv_append_triton"
    chk.float_tensor(op, "k_cache", k_cache, 4)
    dev, dtype = k_cache.device, k_cache.dtype
    chk.float_tensor(op, "v_cache", v_cache, 4, dtype)
    chk.unit_last_stride(op, "k_cache", k_cache)
    chk.unit_last_stride(op, "v_cache", v_cache)
    chk.on_device(op, dev, v_cache=v_cache, k=k, v=v, k_proj=k_proj)
    b, hkv, _, dk = k_cache.shape
    dv = v_cache.shape[-1]
    chk.require(v_cache.shape[:3] == k_cache.shape[:3], op,
                lambda: f"v_cache must be [B, Hkv, S_max, Dv] like k_cache {tuple(k_cache.shape)}, got "
                f"{tuple(v_cache.shape)}")
    chk.require(k.dim() == 3 and k.is_contiguous() and k.dtype == dtype and k.shape[0] == b, op,
                lambda: f"k must be a contiguous [B={b}, Hk, D] tensor of the cache dtype {dtype}")
    chk.require(chk.dense(v, dtype, (b, hkv, dv)), op,
                lambda: f"v must be a contiguous [B, Hkv, Dv] = [{b}, {hkv}, {dv}] tensor of the cache dtype {dtype}")
    hk, d = k.shape[1:]
    chk.require(min(d, dk, dv) > 0, op, lambda: f"head dims must be >= 1, got D={d}, Dk={dk}, Dv={dv}")
    if k_proj is None:
        chk.require((hk, d) == (hkv, dk), op, lambda: f"without k_proj, k [B, Hk={hk}, D={d}] must match the cache's "
                    f"(Hkv={hkv}, Dk={dk})")
    else:
        chk.require(hkv > 0 and hk % hkv == 0, op, lambda: f"k's Hk={hk} must be a multiple of Hkv={hkv}")
        chk.require(chk.dense(k_proj, torch.float32, (hkv, hk // hkv * d, dk)), op,
                    lambda: f"k_proj must be a contiguous float32 [Hkv, g*D, Dk] = [{hkv}, {hk // hkv * d}, {dk}]")
    chk.index_vector(op, "slots", slots, b, dev)
    chk.rope_tables(op, cos, sin, b, d, rope_style, rotary_dim, dev)
    chk.error_word(op, err, dev)
