"""Argument checks of the Triton host launchers.

A Triton kernel trusts every shape, dtype and stride it is given, and the registered ops (``torch.ops.effkern.*``,
or a torch.compile / export graph) reach the launchers without the Python entry points' checks: what a kernel
relies on is checked here, before the launch, and raises ValueError like the entry points. Index values
(lengths, slots, ids) live on the device and are checked by the kernels themselves (see
effkern/ops/_device_errors.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import triton.language as tl

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# The index-error bits a kernel stores into its error word: effkern/ops/_device_errors.py's codes (csrc/cuda/common.cuh
# names the same bits for the CUDA kernels).
ERR_SEQ_LENS = tl.constexpr(1)
ERR_KV_START = tl.constexpr(2)
ERR_SLOTS = tl.constexpr(4)
ERR_IDS = tl.constexpr(8)


def require(ok: bool, op: str, what: str | Callable[[], str]) -> None:
    """Raise ``ValueError("op: what")`` unless ``ok``; ``what`` may be a function building the text, so that a passing
    check formats nothing (the launchers run on every call)."""
    if not ok:
        raise ValueError(f"{op}: {what() if callable(what) else what}")


def dense(t: torch.Tensor | None, dtype: torch.dtype | None, shape: Sequence[int]) -> bool:
    """``t`` is a contiguous tensor of ``dtype`` (None: any of FLOAT_DTYPES) and exactly ``shape``."""
    if t is None or not t.is_contiguous() or tuple(t.shape) != tuple(shape):
        return False
    return t.dtype in FLOAT_DTYPES if dtype is None else t.dtype == dtype


def on_device(op: str, device: torch.device, **tensors: torch.Tensor | None) -> None:
    """Every given tensor lives on ``device``."""
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(f"{op}: {name} must be on {device}, got {t.device}")


def float_tensor(op: str, name: str, t: torch.Tensor, ndim: int, dtype: torch.dtype | None = None) -> None:
    """``t`` has ``ndim`` dims and ``dtype`` (None: one of the kernels' float dtypes)."""
    ok_dtype = t.dtype in FLOAT_DTYPES if dtype is None else t.dtype == dtype
    require(t.dim() == ndim and ok_dtype, op,
            lambda: f"{name} must be a {ndim}-D {dtype or 'float32 / float16 / bfloat16'} tensor, got {t.dtype} "
            f"{tuple(t.shape)}")


def unit_last_stride(op: str, name: str, t: torch.Tensor) -> None:
    require(t.shape[-1] <= 1 or t.stride(-1) == 1, op, lambda: f"{name} must have a contiguous last dim, got strides "
            f"{t.stride()}")


def index_vector(op: str, name: str, t: torch.Tensor | None, n: int, device: torch.device) -> None:
    """A contiguous int32 ``[n]`` tensor (seq_lens, kv_start, slots) on ``device``."""
    require(t is not None and dense(t, torch.int32, (n,)) and t.device == device, op,
            lambda: f"{name} must be a contiguous int32 [{n}] tensor on {device}")


def rope_tables(op: str, cos, sin, b: int, d: int, rope_style: int, rotary_dim: int, device: torch.device) -> None:
    """rotary_dim even in [0, D], rope_style 0 or 1, and for rotary_dim > 0 cos / sin contiguous fp32 [B, R/2]."""
    require(0 <= rotary_dim <= d and rotary_dim % 2 == 0, op, lambda: f"rotary_dim must be even and in [0, D={d}], got "
            f"{rotary_dim}")
    require(rope_style in (0, 1), op, lambda: f"rope_style must be 0 (half) or 1 (interleaved), got {rope_style}")
    if rotary_dim:
        for name, t in (("cos", cos), ("sin", sin)):
            if not (dense(t, torch.float32, (b, rotary_dim // 2)) and t.device == device):
                raise ValueError(f"{op}: {name} must be a contiguous float32 [B={b}, R/2={rotary_dim // 2}] tensor on "
                                 f"{device} when rotary_dim > 0")


def error_word(op: str, err: torch.Tensor, device: torch.device) -> None:
    """The int32 ``[1]`` error word: on ``device``, or pinned host memory for CUDA kernels."""
    require(isinstance(err, torch.Tensor) and err.dtype == torch.int32 and err.numel() == 1, op,
            "err must be an int32 [1] tensor (effkern/ops/_device_errors.py's error word)")
    host_ok = device.type == "cuda" and err.device.type == "cpu" and err.is_pinned()
    require(err.device == device or host_ok, op,
            lambda: f"err must be on {device} or in pinned host memory, got {err.device}")
