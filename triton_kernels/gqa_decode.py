"""Triton kernels for ``effkern.ops.gqa_decode``: one decode step of grouped-query attention (split-KV).

Three launches per call:

1. ``_rotate_project_q_kernel``: ``q' = RoPE(q) (@ q_proj) * scale`` in fp32 -> ``[B, Hq, Dk]``. Done once per
   query head instead of once per KV split.
2. ``_decode_split_kernel``: grid ``(B * Hkv, num_splits)``. A program serves the whole GQA group of one KV
   head, so each K/V tile is read from memory once for all ``G = Hq / Hkv`` query heads; the group is packed
   into a ``BLOCK_G >= 16`` row block so ``tl.dot`` (tensor cores) applies. It runs the online softmax over its
   slice of the context and writes partial ``(max, sum, acc)`` (or, with one split, the final output).
3. ``_combine_splits_kernel``: merges the partials with log-sum-exp weights and writes ``out`` in q's dtype.

Numerics: fp32 accumulation everywhere. With fp16/bf16 caches the fp32 dot operands (``q'`` and the softmax
weights) are split into hi + lo halves of the cache dtype (two tensor-core dots instead of one, cheap in a
memory-bound kernel), so the only rounding left is the cache's own (fp16 also needs |q'| < 65504, which scaled
queries satisfy); fp32 caches use IEEE fp32 dots, not TF32.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

from . import _checks as chk
from ._checks import ERR_KV_START, ERR_SEQ_LENS

# Split rule (see _num_splits): aim for ~2 programs per SM so every SM has work and a second program to hide
# memory latency, but never give a split fewer than MIN_KEYS_PER_SPLIT keys of cache capacity (below that the
# partial write + combine costs more than the parallelism gains). MAX_SPLITS bounds the scratch and the
# combine kernel's block.
MIN_KEYS_PER_SPLIT = 256
MAX_SPLITS = 32
PROGRAMS_PER_SM = 2
DEFAULT_SM_COUNT = 132  # H100 SXM; used when there is no CUDA device to ask (the interpreter on CPU)
NUM_WARPS = 4
DECODE_STAGES = 3
TILE_PAIR_BYTES = 32 * 1024  # one K tile + one V tile per pipeline stage (see decode_constexprs)


@triton.jit
def load_rotated(x_ptr, cos_ptr, sin_ptr, offs, n, HEAD_DIM: tl.constexpr, ROT_DIM: tl.constexpr,
                 ROPE_STYLE: tl.constexpr):
    """fp32 ``x[offs]`` (0 where ``offs >= n``) of consecutive heads of ``HEAD_DIM`` starting at ``x_ptr``,
    each head's first ``ROT_DIM`` dims rotated by ``cos/sin [ROT_DIM / 2]``; ``ROPE_STYLE`` 0 = "half"
    (pairs i, i + R/2), 1 = "interleaved" (pairs 2i, 2i + 1). ``ROT_DIM == 0``: no rotation."""
    valid = offs < n
    x = tl.load(x_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    if ROT_DIM > 0:
        d = offs % HEAD_DIM
        rot = valid & (d < ROT_DIM)
        if ROPE_STYLE == 0:
            first = d < ROT_DIM // 2
            partner = tl.where(first, d + ROT_DIM // 2, d - ROT_DIM // 2)
            freq = tl.where(first, d, d - ROT_DIM // 2)
        else:
            first = (d % 2) == 0
            partner = d ^ 1
            freq = d // 2
        # The partner is re-read from memory (an L1 hit) rather than shuffled between lanes. Lanes that are
        # not rotated read cos=1, sin=0, partner=0 and so pass through unchanged.
        xp = tl.load(x_ptr + (offs - d) + partner, mask=rot, other=0.0).to(tl.float32)
        c = tl.load(cos_ptr + freq, mask=rot, other=1.0)
        s = tl.load(sin_ptr + freq, mask=rot, other=0.0)
        x = x * c + tl.where(first, -xp, xp) * s
    return x


@triton.jit
def _rotate_project_q_kernel(q_ptr, cos_ptr, sin_ptr, proj_ptr, qp_ptr, scale, num_q_heads,
                             HEAD_D: tl.constexpr, HEAD_DK: tl.constexpr, ROT_DIM: tl.constexpr,
                             ROPE_STYLE: tl.constexpr, HAS_PROJ: tl.constexpr, BLOCK_DK: tl.constexpr,
                             BLOCK_C: tl.constexpr):
    """One program per (b, h): ``qp[b, h] = RoPE(q[b, h]) (@ proj[h]) * scale``. q: [B, Hq, D];
    cos/sin: [B, R/2]; proj: [Hq, D, Dk] fp32; qp: [B, Hq, Dk] fp32. The projection walks D in ``BLOCK_C`` row
    chunks so only a ``BLOCK_C x BLOCK_DK`` slice of proj is live in registers."""
    pid = tl.program_id(0)
    b = pid // num_q_heads
    h = pid % num_q_heads
    q_row = q_ptr + pid.to(tl.int64) * HEAD_D
    cos_row = cos_ptr + b * (ROT_DIM // 2)
    sin_row = sin_ptr + b * (ROT_DIM // 2)
    offs_k = tl.arange(0, BLOCK_DK)
    k_mask = offs_k < HEAD_DK
    if HAS_PROJ:
        acc = tl.zeros([BLOCK_DK], dtype=tl.float32)
        proj_head = proj_ptr + h * (HEAD_D * HEAD_DK)
        for d0 in range(0, HEAD_D, BLOCK_C):
            offs_c = d0 + tl.arange(0, BLOCK_C)
            x = load_rotated(q_row, cos_row, sin_row, offs_c, HEAD_D, HEAD_D, ROT_DIM, ROPE_STYLE)
            w = tl.load(proj_head + offs_c[:, None] * HEAD_DK + offs_k[None, :],
                        mask=(offs_c < HEAD_D)[:, None] & k_mask[None, :], other=0.0)
            acc += tl.sum(x[:, None] * w, axis=0)
    else:  # HEAD_DK == HEAD_D
        acc = load_rotated(q_row, cos_row, sin_row, offs_k, HEAD_D, HEAD_D, ROT_DIM, ROPE_STYLE)
    tl.store(qp_ptr + pid.to(tl.int64) * HEAD_DK + offs_k, acc * scale, mask=k_mask)


@triton.jit
def _split16(x, DTYPE: tl.constexpr):
    """fp32 ``x`` as ``hi + lo`` in a 16-bit float type: two dots on the halves carry ~16 mantissa bits."""
    hi = x.to(DTYPE)
    lo = (x - hi.to(tl.float32)).to(DTYPE)
    return hi, lo


@triton.jit
def _tanh(x):
    """tanh from exp (libdevice tanh is missing in the interpreter); exp(-2|x|) <= 1 never overflows."""
    t = tl.exp(-2.0 * tl.abs(x))
    y = (1.0 - t) / (1.0 + t)
    return tl.where(x < 0, -y, y)


@triton.jit
def _decode_split_kernel(qp_ptr, k_ptr, v_ptr, seq_lens_ptr, kv_start_ptr, out_ptr, m_ptr, l_ptr, acc_ptr, err_ptr,
                         softcap, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs, num_kv_heads, s_max,
                         GROUP: tl.constexpr, HEAD_DK: tl.constexpr, HEAD_DV: tl.constexpr,
                         NUM_SPLITS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                         HAS_START: tl.constexpr, DOT_F32: tl.constexpr):
    """Program (b * Hkv + kvh, split): attention of the G query heads of KV head kvh over this split's keys.

    qp: [B, Hq, Dk] fp32 (rotated, projected, scaled); k: [B, Hkv, S_max, Dk], v: [B, Hkv, S_max, Dv]
    (strided, unit last stride); seq_lens, kv_start (HAS_START): [B] int32, the valid keys are
    [kv_start, seq_lens), clamped into [0, S_max] (a value outside is recorded in err [1] int32, as
    effkern/ops/_device_errors.py describes): no other cache row is ever read. NUM_SPLITS == 1: out [B, Hq, Dv]
    gets the result.
    Else m, l: [B, Hq, NUM_SPLITS] and acc: [B, Hq, NUM_SPLITS, Dv] (fp32) get the unnormalised partials;
    an empty split writes (-inf, 0, 0). Each sequence's own key range is cut into NUM_SPLITS slices of whole
    tiles, so short sequences use fewer splits rather than many near-empty ones.
    """
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // num_kv_heads
    kvh = bh % num_kv_heads
    given_len = tl.load(seq_lens_ptr + b)
    seq_len = tl.minimum(tl.maximum(given_len, 0), s_max)
    code = tl.where(seq_len != given_len, ERR_SEQ_LENS, 0)
    if HAS_START:
        given_first = tl.load(kv_start_ptr + b)
        first = tl.minimum(tl.maximum(given_first, 0), seq_len)
        code |= tl.where((given_first < 0) | (given_first > given_len), ERR_KV_START, 0)
    else:
        first = 0
    per_split = tl.cdiv(tl.cdiv(seq_len - first, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = first + split * per_split
    hi = tl.minimum(lo + per_split, seq_len)

    offs_g = tl.arange(0, BLOCK_G)
    offs_n = tl.arange(0, BLOCK_N)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    g_mask = offs_g < GROUP
    dk_mask = offs_dk < HEAD_DK
    dv_mask = offs_dv < HEAD_DV
    rows = bh * GROUP + offs_g  # = b * Hq + kvh * G + g: the group's query heads are consecutive
    q = tl.load(qp_ptr + rows[:, None] * HEAD_DK + offs_dk[None, :], mask=g_mask[:, None] & dk_mask[None, :],
                other=0.0)
    if not DOT_F32:
        q_hi, q_lo = _split16(q, k_ptr.dtype.element_ty)

    # Scalar 64-bit tile pointers (a strided cache view can span more than 2**31 elements) plus loop-invariant
    # 32-bit in-tile offsets: carrying a full pointer tensor across iterations instead doubles the registers and
    # spills badly when the key stride is not a multiple of 16 (no vector loads).
    k_tile = k_ptr + b.to(tl.int64) * stride_kb + kvh.to(tl.int64) * stride_kh + lo.to(tl.int64) * stride_ks
    v_tile = v_ptr + b.to(tl.int64) * stride_vb + kvh.to(tl.int64) * stride_vh + lo.to(tl.int64) * stride_vs
    k_offs = offs_n[:, None] * stride_ks + offs_dk[None, :]
    v_offs = offs_n[:, None] * stride_vs + offs_dv[None, :]
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_DV], dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        n_mask = (start + offs_n) < hi
        k = tl.load(k_tile + k_offs, mask=n_mask[:, None] & dk_mask[None, :], other=0.0)
        v = tl.load(v_tile + v_offs, mask=n_mask[:, None] & dv_mask[None, :], other=0.0)
        if DOT_F32:
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            kt = tl.trans(k)
            s = tl.dot(q_lo, kt, acc=tl.dot(q_hi, kt))
        if HAS_SOFTCAP:
            s = softcap * _tanh(s / softcap)
        s = tl.where(n_mask[None, :], s, float("-inf"))
        # Every tile holds >= 1 valid key, so m_new is finite and no exp sees (-inf) - (-inf).
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if DOT_F32:
            pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            p_hi, p_lo = _split16(p, v_ptr.dtype.element_ty)
            pv = tl.dot(p_lo, v, acc=tl.dot(p_hi, v))
        acc = acc * alpha[:, None] + pv
        m_i = m_new
        k_tile += BLOCK_N * stride_ks
        v_tile += BLOCK_N * stride_vs

    # One report per sequence, stored after the key loop: a store ahead of it changes how the loop is pipelined
    # and makes the widest fp32 tiles spill (tests/ops/test_triton_compile.py).
    tl.store(err_ptr, code, mask=(code != 0) & (kvh == 0) & (split == 0))
    out_mask = g_mask[:, None] & dv_mask[None, :]
    if NUM_SPLITS == 1:
        o = acc / tl.where(l_i == 0, 1.0, l_i)[:, None]  # an empty context leaves acc = 0: zeros, not NaN
        tl.store(out_ptr + rows[:, None] * HEAD_DV + offs_dv[None, :], o.to(out_ptr.dtype.element_ty),
                 mask=out_mask)
    else:
        part = rows * NUM_SPLITS + split
        tl.store(m_ptr + part, m_i, mask=g_mask)
        tl.store(l_ptr + part, l_i, mask=g_mask)
        tl.store(acc_ptr + part[:, None] * HEAD_DV + offs_dv[None, :], acc, mask=out_mask)


@triton.jit
def _combine_splits_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, NUM_SPLITS: tl.constexpr, HEAD_DV: tl.constexpr,
                           BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr):
    """One program per (b, h): ``out = sum_s w_s acc_s / sum_s w_s l_s`` with ``w_s = exp(m_s - max m)``.
    m, l: [B * Hq, NUM_SPLITS]; acc: [B * Hq, NUM_SPLITS, Dv] fp32; out: [B * Hq, Dv]."""
    row = tl.program_id(0)
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    s_mask = offs_s < NUM_SPLITS
    part = row * NUM_SPLITS + offs_s
    m = tl.load(m_ptr + part, mask=s_mask, other=float("-inf"))
    sums = tl.load(l_ptr + part, mask=s_mask, other=0.0)
    acc = tl.load(acc_ptr + part[:, None] * HEAD_DV + offs_dv[None, :],
                  mask=s_mask[:, None] & (offs_dv < HEAD_DV)[None, :], other=0.0)
    m_max = tl.max(m, axis=0)
    m_max = tl.where(m_max > float("-inf"), m_max, 0.0)  # all splits empty (length 0): weights exp(-inf) = 0
    w = tl.exp(m - m_max)
    total = tl.sum(w * sums, axis=0)
    o = tl.sum(w[:, None] * acc, axis=0) / tl.where(total == 0, 1.0, total)
    tl.store(out_ptr + row * HEAD_DV + offs_dv, o.to(out_ptr.dtype.element_ty), mask=offs_dv < HEAD_DV)


def block_size(dim: int) -> int:
    """Register block for a head dim or group size: the next power of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(dim))


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1`` (kernels run on CPU tensors through numpy)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def chunk_rows(rows: int, block_cols: int) -> int:
    """Rows of a projection matrix walked per step: a ``chunk x block_cols`` fp32 slice of at most 4096 values
    (32 registers per thread at 4 warps), so D = Dk = 128 or larger stays spill-free."""
    return min(block_size(rows), max(16, 4096 // block_cols))


def decode_constexprs(dtype: torch.dtype, group: int, dk: int, dv: int, num_splits: int, softcap: bool,
                      interpret: bool, has_start: bool = False) -> dict:
    """The compile-time parameters of ``_decode_split_kernel`` (shared with the GPU compile test).

    BLOCK_N keeps one K tile plus one V tile at <= 32 KiB, so DECODE_STAGES-deep pipelining fits sm_80's shared
    memory: 64 keys for 16-bit heads <= 128, fewer for fp32 or wider heads (never below tl.dot's 16).
    bf16 ``tl.dot`` is wrong in the interpreter; there (only) bf16 tiles are widened to fp32 for the dots.
    """
    block_dk, block_dv = block_size(dk), block_size(dv)
    keys_fit = max(1, TILE_PAIR_BYTES // ((block_dk + block_dv) * dtype.itemsize))
    return dict(
        GROUP=group, HEAD_DK=dk, HEAD_DV=dv, NUM_SPLITS=num_splits, BLOCK_G=block_size(group),
        BLOCK_N=max(16, min(64, 1 << (keys_fit.bit_length() - 1))), BLOCK_DK=block_dk, BLOCK_DV=block_dv,
        HAS_SOFTCAP=softcap, HAS_START=has_start,
        DOT_F32=dtype == torch.float32 or (dtype == torch.bfloat16 and interpret),
    )


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_SM_COUNT


def _num_splits(batch_kv_heads: int, s_max: int, device: torch.device) -> int:
    """Splits per (b, kvh): enough programs for PROGRAMS_PER_SM per SM, each with >= MIN_KEYS_PER_SPLIT
    keys of capacity, at most MAX_SPLITS. Uses the cache capacity S_max, not max(seq_lens), so choosing needs
    no device-to-host sync (CUDA-graph safe); the kernel then slices each sequence's actual length."""
    wanted = math.ceil(PROGRAMS_PER_SM * _sm_count(device) / max(batch_kv_heads, 1))
    return max(1, min(wanted, s_max // MIN_KEYS_PER_SPLIT, MAX_SPLITS))


def gqa_decode_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    kv_start: torch.Tensor | None,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    q_proj: torch.Tensor | None,
    scale: float,
    softcap: float,
    rope_style: int,
    rotary_dim: int,
    err: torch.Tensor,
    num_splits: int | None = None,
) -> torch.Tensor:
    """GQA decode on normalised arguments (the shapes are checked here again: the registered op can be called
    without ``effkern.ops.gqa_decode``'s checks).

    q: [B, Hq, D] contiguous; k_cache: [B, Hkv, S_max, Dk], v_cache: [B, Hkv, S_max, Dv] (q's dtype, any
    strides with unit last stride; never copied); seq_lens: [B] int32; kv_start: [B] int32 or None (the
    first valid key of each sequence, for left padding); cos, sin: [B, R/2] fp32 or None;
    q_proj: [Hq, D, Dk] fp32 or None (then Dk == D); softcap 0 = off; rope_style 0 = half, 1 = interleaved;
    rotary_dim R (0 = no RoPE); err: the int32 [1] error word that gets SEQ_LENS / KV_START for lengths the
    kernel had to clamp (effkern/ops/_device_errors.py). num_splits overrides the split rule (tests use it to
    force splitting). Returns [B, Hq, Dv] contiguous in q's dtype.
    """
    _check(q, k_cache, v_cache, seq_lens, kv_start, cos, sin, q_proj, softcap, rope_style, rotary_dim, err)
    b, hq, d = q.shape
    hkv, s_max, dk = k_cache.shape[1:]
    dv = v_cache.shape[-1]
    out = torch.empty((b, hq, dv), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    group = hq // hkv
    qp = torch.empty((b, hq, dk), dtype=torch.float32, device=q.device)
    block_dk = block_size(dk)
    # Absent optional inputs get a valid fp32 pointer (qp) that the kernel never reads: one signature.
    _rotate_project_q_kernel[(b * hq,)](
        q, qp if cos is None else cos, qp if sin is None else sin, qp if q_proj is None else q_proj, qp,
        float(scale), hq,
        HEAD_D=d, HEAD_DK=dk, ROT_DIM=rotary_dim, ROPE_STYLE=rope_style, HAS_PROJ=q_proj is not None,
        BLOCK_DK=block_dk, BLOCK_C=chunk_rows(d, block_dk), num_warps=NUM_WARPS,
    )

    splits = num_splits if num_splits is not None else _num_splits(b * hkv, s_max, q.device)
    if splits > 1:
        m_part = torch.empty((b, hq, splits), dtype=torch.float32, device=q.device)
        l_part = torch.empty_like(m_part)
        acc_part = torch.empty((b, hq, splits, dv), dtype=torch.float32, device=q.device)
    else:
        m_part = l_part = acc_part = qp  # unused with one split
    _decode_split_kernel[(b * hkv, splits)](
        qp, k_cache, v_cache, seq_lens, seq_lens if kv_start is None else kv_start, out, m_part, l_part, acc_part,
        err, float(softcap), *k_cache.stride()[:3], *v_cache.stride()[:3], hkv, s_max,
        **decode_constexprs(q.dtype, group, dk, dv, splits, softcap != 0.0, interpreting(), kv_start is not None),
        num_warps=NUM_WARPS, num_stages=DECODE_STAGES,
    )
    if splits > 1:
        _combine_splits_kernel[(b * hq,)](
            m_part, l_part, acc_part, out, NUM_SPLITS=splits, HEAD_DV=dv,
            BLOCK_S=triton.next_power_of_2(splits), BLOCK_DV=block_size(dv), num_warps=NUM_WARPS,
        )
    return out


def _check(q, k_cache, v_cache, seq_lens, kv_start, cos, sin, q_proj, softcap, rope_style, rotary_dim, err) -> None:
    """What the kernels rely on: shapes, dtypes, strides and devices (see _checks.py)."""
    op = "gqa_decode_triton"
    chk.float_tensor(op, "q", q, 3)
    chk.require(q.is_contiguous(), op, "q must be contiguous")
    b, hq, d = q.shape
    dev = q.device
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        chk.float_tensor(op, name, c, 4, q.dtype)
        chk.unit_last_stride(op, name, c)
    chk.on_device(op, dev, k_cache=k_cache, v_cache=v_cache, q_proj=q_proj)
    hkv, s_max, dk = k_cache.shape[1:]
    dv = v_cache.shape[-1]
    chk.require(k_cache.shape[0] == b and v_cache.shape[:3] == k_cache.shape[:3], op,
                lambda: f"k_cache and v_cache must be [B={b}, Hkv, S_max, *] alike, got {tuple(k_cache.shape)} and "
                f"{tuple(v_cache.shape)}")
    chk.require(hkv > 0 and hq % hkv == 0, op, lambda: f"Hq={hq} must be a multiple of Hkv={hkv}")
    chk.require(min(d, dk, dv) > 0, op, lambda: f"head dims must be >= 1, got D={d}, Dk={dk}, Dv={dv}")
    chk.index_vector(op, "seq_lens", seq_lens, b, dev)
    if kv_start is not None:
        chk.index_vector(op, "kv_start", kv_start, b, dev)
    if q_proj is None:
        chk.require(dk == d, op, lambda: f"without q_proj, k_cache's Dk={dk} must equal q's D={d}")
    else:
        chk.require(chk.dense(q_proj, torch.float32, (hq, d, dk)), op,
                    lambda: f"q_proj must be a contiguous float32 [Hq, D, Dk] = [{hq}, {d}, {dk}] tensor")
    chk.require(math.isfinite(softcap) and softcap >= 0, op, lambda: f"softcap must be finite and >= 0 (0 = off), got "
                f"{softcap}")
    chk.rope_tables(op, cos, sin, b, d, rope_style, rotary_dim, dev)
    chk.error_word(op, err, dev)
