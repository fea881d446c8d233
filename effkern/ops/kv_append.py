"""``effkern.ops.kv_append``: write one new token's keys and values into the KV cache, in place.

For every sequence b (slot ``t = slots[b]``)::

    k' = RoPE(k[b], position[b])                                   # each of the Hk input heads
    k_cache[b, j, t] = concat(k'[j*g:(j+1)*g]) @ k_proj[j]         # optional per-group [g*D, Dk] projection
    v_cache[b, j, t] = v[b, j]

Without ``k_proj`` the input has exactly the cache's KV heads (g = 1) and ``Dk == D``. With it, ``Hk`` input
heads are grouped ``g = Hk / Hkv`` at a time: post-RoPE key compression (PAPERS.md D) caches
``RoPE(k_G) Psi`` per group. Backends as for :mod:`effkern.ops.gqa_decode`.
"""

from __future__ import annotations

import torch

from effkern.ops import _backend
from effkern.ops._checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    acc_dtype,
    check_index_range,
    check_last_dim_contiguous,
    check_same_dtype,
    check_tensor,
    native,
)
from effkern.ops._device_errors import guarded
from effkern.ops._op import custom_op
from effkern.ops.rope import Rope, apply_rope, check_tables, rope_args


def reference(
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
) -> None:
    """Ground truth on normalised arguments (see :func:`kv_append`)."""
    b, hkv, s_max = k_cache.shape[:3]
    check_slots(slots, s_max)
    check_tables(cos, sin, b, rotary_dim)
    kf = k.to(acc_dtype(k))
    if rotary_dim:
        kf = apply_rope(kf, cos[:, None], sin[:, None], rope_style, rotary_dim)
    if k_proj is not None:
        kf = torch.einsum("bje,jef->bjf", kf.reshape(b, hkv, -1), k_proj.to(kf.dtype))
    rows = torch.arange(b, device=k_cache.device)
    idx = slots.long()
    k_cache[rows, :, idx] = kf.to(k_cache.dtype)
    v_cache[rows, :, idx] = v.to(v_cache.dtype)


def check_slots(slots: torch.Tensor, s_max: int) -> None:
    """0 <= slots < S_max for every sequence (a host sync on CUDA; skipped while compiling)."""
    check_index_range("slots", slots, 0, s_max - 1, f"cache length S_max={s_max}")


def _cpu(*args):
    _backend.extension().kv_append_cpu(*args)


@guarded
def _cuda(*args):
    _backend.extension().kv_append_cuda(*args)


@guarded
def _triton(*args):
    from effkern.triton_kernels.kv_append import kv_append_triton

    kv_append_triton(*args)


_IMPLS = {"reference": reference, "cpu": _cpu, "cuda": _cuda, "triton": _triton}


def _preferred(k: torch.Tensor) -> list[str]:
    return native(k, ["cpu"] if k.device.type == "cpu" else ["cuda", "triton"])


@custom_op("effkern::kv_append", mutates_args=("k_cache", "v_cache"))
def op(
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
) -> None:
    """The registered op on normalised arguments: k, v contiguous, slots int32, cos/sin fp32 [B, R/2] or
    None, k_proj fp32 [Hkv, g*D, Dk] or None, rotary_dim 0 = no RoPE. Each backend's launcher checks shapes and
    slots again (compiled graphs and torch.ops callers reach it without the entry point's checks)."""
    args = (k_cache, v_cache, k, v, slots, cos, sin, k_proj, rope_style, rotary_dim)
    _backend.run("kv_append", k.device, _preferred(k), _IMPLS, *args)


@op.register_fake
def _(k_cache, v_cache, k, v, slots, cos, sin, k_proj, rope_style, rotary_dim):
    return None


def kv_append(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slots: torch.Tensor,
    *,
    rope: Rope | None = None,
    positions: torch.Tensor | None = None,
    k_proj: torch.Tensor | None = None,
) -> None:
    """Rotate (and optionally project) one new token's keys and write keys and values at ``slots``.

    Args:
        k_cache: ``[B, Hkv, S_max, Dk]`` cache, updated in place (strided views allowed, contiguous last dim).
        v_cache: ``[B, Hkv, S_max, Dv]`` cache, updated in place.
        k: ``[B, Hk, D]`` new keys, not yet rotated; ``Hk == Hkv`` unless ``k_proj`` groups them.
        v: ``[B, Hkv, Dv]`` new values.
        slots: ``[B]`` int32/int64 cache index to write, ``0 <= slots < S_max``.
        rope: rotate k at ``positions`` (default: ``slots``). None: store k as given.
        positions: ``[B]`` integer RoPE positions.
        k_proj: ``[Hkv, (Hk / Hkv) * D, Dk]`` float32 per-group projection applied after RoPE.
    """
    check_tensor("k_cache", k_cache, ndim=4, dtypes=FLOAT_DTYPES, dims="[B, Hkv, S_max, Dk]")
    b, hkv, s_max, dk = k_cache.shape
    dev = k_cache.device
    check_tensor("v_cache", v_cache, ndim=4, device=dev, shape=(b, hkv, s_max), dims="[B, Hkv, S_max, Dv]")
    check_same_dtype("v_cache", v_cache, "k_cache", k_cache)
    check_last_dim_contiguous("k_cache", k_cache)
    check_last_dim_contiguous("v_cache", v_cache)
    check_tensor("k", k, ndim=3, device=dev, shape=(b,), dims="[B, Hk, D]")
    check_same_dtype("k", k, "k_cache", k_cache)
    check_tensor("v", v, ndim=3, device=dev, shape=(b, hkv, v_cache.shape[-1]), dims="[B, Hkv, Dv]")
    check_same_dtype("v", v, "k_cache", k_cache)
    hk, d = k.shape[1:]
    if k_proj is not None:
        if hk % hkv:
            raise ValueError(f"k's head count Hk={hk} must be a multiple of k_cache's Hkv={hkv} to group it")
        check_tensor("k_proj", k_proj, ndim=3, dtypes=(torch.float32,), device=dev,
                     shape=(hkv, hk // hkv * d, dk), dims="[Hkv, g*D, Dk]")
        k_proj = k_proj.contiguous()
    elif (hk, d) != (hkv, dk):
        raise ValueError(f"k [B, Hk={hk}, D={d}] must match k_cache's (Hkv={hkv}, Dk={dk}) without k_proj")
    check_tensor("slots", slots, ndim=1, dtypes=INDEX_DTYPES, device=dev, shape=(b,), dims="[B]")
    check_slots(slots, s_max)
    cos, sin, style, rotary_dim = rope_args(rope, positions, lambda: slots, b, d, dev)
    op(k_cache, v_cache, k.contiguous(), v.contiguous(), slots.to(torch.int32), cos, sin, k_proj, style, rotary_dim)
