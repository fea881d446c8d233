"""Argument checks shared by the op entry points. Every error names the argument and what was expected."""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)  # float64: the reference only
INDEX_DTYPES = (torch.int32, torch.int64)


def acc_dtype(t: torch.Tensor) -> torch.dtype:
    """What the references compute in: float32 (the kernels' accumulation), float64 for float64 inputs."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def native(t: torch.Tensor, preferred: list[str]) -> list[str]:
    """An op's preferred native backends for an input of t's dtype: none for float64 (the reference runs it)."""
    return [] if t.dtype == torch.float64 else preferred


def check_int(name: str, value: object, minimum: int) -> int:
    """``value`` as a Python int >= minimum (any integer type, numpy's included; not bool or float)."""
    try:
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}") from None
    if isinstance(value, bool) or number < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return number


def check_tensor(
    name: str,
    t: object,
    *,
    ndim: int | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
    device: torch.device | None = None,
    shape: Sequence[int | None] | None = None,
    dims: str = "",
) -> torch.Tensor:
    """Check that ``t`` is a tensor of the given rank, dtype, device and shape (None in ``shape`` = any).

    ``dims`` names the expected layout (e.g. ``"[B, Hq, D]"``) for the error text.
    """
    layout = f" {dims}" if dims else ""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor{layout}, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D{layout}, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device} like the other inputs, got {t.device}")
    if shape is not None:
        for i, (want, got) in enumerate(zip(shape, t.shape, strict=False)):
            if want is not None and want != got:
                raise ValueError(f"{name}{layout} must have size {want} in dim {i}, got shape {tuple(t.shape)}")
    return t


def check_same_dtype(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} must have the same dtype as {ref_name} ({ref.dtype}), got {t.dtype}")


def check_last_dim_contiguous(name: str, t: torch.Tensor) -> None:
    """Caches may be strided views, but rows must be contiguous (copying a cache per step would be a trap)."""
    if t.size(-1) > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous last dim (stride 1), got strides {t.stride()}")


def bounds_checkable(t: torch.Tensor) -> bool:
    """Value checks need real data: skip them on fake/meta tensors and while torch.compile traces."""
    return not (torch.compiler.is_compiling() or t.device.type == "meta" or torch._subclasses.fake_tensor.is_fake(t))


def check_index_range(name: str, t: torch.Tensor, lo: int, hi: int, what: str) -> None:
    """Check lo <= t <= hi elementwise (costs one host sync on CUDA)."""
    if t.numel() and bounds_checkable(t):
        mn, mx = int(t.min()), int(t.max())
        if mn < lo or mx > hi:
            raise ValueError(f"{name} must be within [{lo}, {hi}] ({what}), got values in [{mn}, {mx}]")
