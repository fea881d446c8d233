"""``effkern.ops.gqa_decode``: one decode step of grouped-query attention over a (compressed) KV cache.

For every sequence b and query head h (served by KV head ``h // (Hq / Hkv)``)::

    q'  = RoPE(q[b, h], position[b])            # first R dims, "half" or "interleaved" style
    q'  = q' @ q_proj[h]                        # optional [D, Dk] projection (post-RoPE key bases)
    s_t = scale * q' . k_cache[b, kvh, t]       # kv_start[b] <= t < seq_lens[b]; optional softcap
    out[b, h] = sum_t softmax(s)_t * v_cache[b, kvh, t]

Backends (op contract, DESIGN.md): ``cpu`` = C++ kernel in ``effkern._C``; on CUDA tensors the CUDA kernel
when built and both head dims are <= 256 (its compiled tile limit), else the Triton kernel; the
reference everywhere else. All accumulate in fp32; an empty context gives zeros.
"""

from __future__ import annotations

import math

import torch

from effkern.ops import _backend
from effkern.ops._checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    acc_dtype,
    bounds_checkable,
    check_index_range,
    check_last_dim_contiguous,
    check_same_dtype,
    check_tensor,
    native,
)
from effkern.ops._device_errors import guarded
from effkern.ops._op import custom_op
from effkern.ops.rope import Rope, apply_rope, check_tables, rope_args

CUDA_MAX_HEAD_DIM = 256


def reference(
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
) -> torch.Tensor:
    """Ground truth on normalised arguments (see :func:`gqa_decode`). Written for clarity, not speed. Rows outside
    ``[kv_start, seq_lens)`` are never read; a NaN anywhere else reaches the output, as in SDPA."""
    b, hq, _ = q.shape
    hkv, s_max = k_cache.shape[1], k_cache.shape[2]
    check_lengths(seq_lens, kv_start, s_max)
    check_tables(cos, sin, b, rotary_dim)
    acc = acc_dtype(q)
    qf = q.to(acc)
    if rotary_dim:
        qf = apply_rope(qf, cos[:, None], sin[:, None], rope_style, rotary_dim)
    if q_proj is not None:
        qf = torch.einsum("bhd,hde->bhe", qf, q_proj.to(acc))
    t = torch.arange(s_max, device=q.device)[None, :]
    valid = t < seq_lens.to(q.device)[:, None]  # [B, S]
    if kv_start is not None:
        valid &= t >= kv_start.to(q.device)[:, None]
    rows = valid[:, None, :, None]
    k = k_cache.to(acc).masked_fill(~rows, 0).repeat_interleave(hq // hkv, dim=1)  # [B, Hq, S, Dk]
    v = v_cache.to(acc).masked_fill(~rows, 0).repeat_interleave(hq // hkv, dim=1)
    logits = torch.einsum("bhd,bhsd->bhs", qf, k) * scale
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    logits = logits.masked_fill(~valid[:, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1).masked_fill(~valid.any(-1)[:, None, None], 0.0)  # empty context: zeros
    return torch.einsum("bhs,bhsd->bhd", probs, v).to(q.dtype)


def check_lengths(seq_lens: torch.Tensor, kv_start: torch.Tensor | None, s_max: int) -> None:
    """0 <= kv_start <= seq_lens <= S_max for every sequence (host syncs on CUDA; skipped while compiling)."""
    check_index_range("seq_lens", seq_lens, 0, s_max, f"cache length S_max={s_max}")
    if kv_start is not None:
        check_index_range("kv_start", kv_start, 0, s_max, f"cache length S_max={s_max}")
        if bounds_checkable(kv_start) and bool((kv_start > seq_lens).any()):
            raise ValueError("kv_start must be <= seq_lens for every sequence (the first valid row comes before "
                             "the end of the valid rows)")


def _cpu(*args):
    return _backend.extension().gqa_decode_cpu(*args)


@guarded
def _cuda(*args):
    return _backend.extension().gqa_decode_cuda(*args)


@guarded
def _triton(*args):
    from effkern.triton_kernels.gqa_decode import gqa_decode_triton

    return gqa_decode_triton(*args)


_IMPLS = {"reference": reference, "cpu": _cpu, "cuda": _cuda, "triton": _triton}


def _preferred(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> list[str]:
    if q.device.type == "cpu":
        return native(q, ["cpu"])
    return native(q, ["cuda", "triton"] if max(k_cache.shape[-1], v_cache.shape[-1]) <= CUDA_MAX_HEAD_DIM
                  else ["triton"])


@custom_op("effkern::gqa_decode")
def op(
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
) -> torch.Tensor:
    """The registered op on normalised arguments: q contiguous, seq_lens and kv_start (or None) int32,
    cos/sin fp32 [B, R/2] or None, q_proj fp32 [Hq, D, Dk] or None, softcap 0 or inf = off, rotary_dim 0 = no
    RoPE. Each backend's launcher checks shapes and index ranges again (compiled graphs and torch.ops callers
    reach it without the entry point's checks)."""
    if not softcap >= 0:
        raise ValueError(f"softcap must be >= 0 (0 = off), got {softcap}")
    if softcap == math.inf:  # the limit of softcap * tanh(s / softcap)
        softcap = 0.0
    args = (q, k_cache, v_cache, seq_lens, kv_start, cos, sin, q_proj, scale, softcap, rope_style, rotary_dim)
    return _backend.run("gqa_decode", q.device, _preferred(q, k_cache, v_cache), _IMPLS, *args)


@op.register_fake
def _(q, k_cache, v_cache, seq_lens, kv_start, cos, sin, q_proj, scale, softcap, rope_style, rotary_dim):
    return q.new_empty((q.shape[0], q.shape[1], v_cache.shape[-1]))


def gqa_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    kv_start: torch.Tensor | None = None,
    rope: Rope | None = None,
    positions: torch.Tensor | None = None,
    q_proj: torch.Tensor | None = None,
    scale: float | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention of one new query token per sequence over its cached keys and values.

    Args:
        q: ``[B, Hq, D]`` new-token queries, not yet rotated.
        k_cache: ``[B, Hkv, S_max, Dk]`` keys (already rotated, as :func:`kv_append` writes them); any strides
            with a contiguous last dim. ``Hq % Hkv == 0`` (any group size).
        v_cache: ``[B, Hkv, S_max, Dv]`` values; Dv may differ from Dk.
        seq_lens: ``[B]`` int32/int64 valid cache length per sequence, ``0 <= seq_lens <= S_max``.
        kv_start: ``[B]`` int32/int64 first valid cache row per sequence, ``0 <= kv_start <= seq_lens``
            (left-padded batches: rows before it are padding and ignored). None: 0.
        rope: rotate q at ``positions`` (default ``seq_lens - 1``: the token just appended). None: no RoPE.
        positions: ``[B]`` integer RoPE position of each query.
        q_proj: ``[Hq, D, Dk]`` float32 per-query-head projection applied after RoPE (post-RoPE compressed
            keys, PAPERS.md D). None requires ``Dk == D``.
        scale: logit scale, default ``1 / sqrt(D)`` (the query's head dim, also with a projection).
        softcap: if set (> 0), logits become ``softcap * tanh(logits / softcap)``; ``inf`` is the same as None.

    Returns:
        ``[B, Hq, Dv]`` in q's dtype.
    """
    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES, dims="[B, Hq, D]")
    b, hq, d = q.shape
    if d == 0:
        raise ValueError(f"q [B, Hq, D] must have a head dim D >= 1, got shape {tuple(q.shape)}")
    dev = q.device
    check_tensor("k_cache", k_cache, ndim=4, device=dev, shape=(b,), dims="[B, Hkv, S_max, Dk]")
    check_same_dtype("k_cache", k_cache, "q", q)
    hkv, s_max, dk = k_cache.shape[1:]
    check_tensor("v_cache", v_cache, ndim=4, device=dev, shape=(b, hkv, s_max), dims="[B, Hkv, S_max, Dv]")
    check_same_dtype("v_cache", v_cache, "q", q)
    check_last_dim_contiguous("k_cache", k_cache)
    check_last_dim_contiguous("v_cache", v_cache)
    if hkv == 0 or hq % hkv:
        raise ValueError(f"q's head count Hq={hq} must be a multiple of k_cache's KV head count Hkv={hkv}")
    check_tensor("seq_lens", seq_lens, ndim=1, dtypes=INDEX_DTYPES, device=dev, shape=(b,), dims="[B]")
    if kv_start is not None:
        check_tensor("kv_start", kv_start, ndim=1, dtypes=INDEX_DTYPES, device=dev, shape=(b,), dims="[B]")
        kv_start = kv_start.to(torch.int32)
    check_lengths(seq_lens, kv_start, s_max)
    if q_proj is not None:
        check_tensor("q_proj", q_proj, ndim=3, dtypes=(torch.float32,), device=dev, shape=(hq, d, dk),
                     dims="[Hq, D, Dk]")
        q_proj = q_proj.contiguous()
    elif dk != d:
        raise ValueError(f"k_cache's head dim Dk={dk} differs from q's D={d}; pass q_proj [Hq, D, Dk]")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0 (or None to disable), got {softcap}")
    cos, sin, style, rotary_dim = rope_args(rope, positions, lambda: (seq_lens.long() - 1).clamp_min(0), b, d, dev)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    return op(
        q.contiguous(), k_cache, v_cache, seq_lens.to(torch.int32), kv_start, cos, sin, q_proj, scale,
        float(softcap or 0.0), style, rotary_dim,
    )
