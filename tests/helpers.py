"""Shared test helpers: tolerances per dtype (stated once), backend selection and input builders."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os

import pytest
import torch

from effkern.ops import _backend

# Absolute/relative tolerances per dtype for outputs of O(1) magnitude: fp32 kernels differ from the
# reference only in summation order; fp16/bf16 outputs are rounded once at the end.
TOL = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    tol = TOL[dtype or expected.dtype]
    torch.testing.assert_close(actual.float(), expected.float(), **tol)


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """assert_close for tensors not of O(1) magnitude (gradients: sums of many terms): the absolute tolerance
    scales with the largest expected magnitude."""
    tol = TOL[expected.dtype]
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual.float(), expected.float(), atol=tol["atol"] * scale, rtol=tol["rtol"])


def check_backend(forward_backward, backend: str, isas=(None,)) -> None:
    """``forward_backward(backend, isa)`` returns an op's outputs and gradients; for every isa (a C++ SIMD level,
    None: the default) the backend's must match the reference's in shape, dtype and value."""
    expected = forward_backward("reference", None)
    for isa in isas:
        got = forward_backward(backend, isa)
        assert len(got) == len(expected)
        for a, b in zip(got, expected, strict=True):
            assert a.shape == b.shape and a.dtype == b.dtype
            assert_close_scaled(a, b)


@contextlib.contextmanager
def env(**values: str | None):
    """Temporarily set (or, with None, unset) environment variables."""
    old = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def supported_cpu_isas() -> list[str]:
    """Every SIMD level of the C++ CPU kernels this machine can run (each compiled path gets tested)."""
    ext = _backend.extension()
    if ext is None:
        return []
    levels = ["avx512", "avx2", "generic"]
    return levels[levels.index(ext.cpu_isa()):]


requires_ext = pytest.mark.skipif(
    _backend.extension() is None, reason="effkern._C is not built (pip install --no-build-isolation -e .)"
)
requires_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and getattr(_backend.extension(), "HAS_CUDA", False)),
    reason="needs a CUDA GPU and effkern._C built with CUDA kernels",
)


def strided_cache(b: int, h: int, s: int, d: int, dtype: torch.dtype, layout: str) -> torch.Tensor:
    """A [B, H, S, D] cache of random values laid out as users hit it: contiguous, a slice of a longer
    buffer, or a [B, S, H, D] buffer seen through a transpose."""
    if layout == "contiguous":
        return torch.randn(b, h, s, d).to(dtype)
    if layout == "sliced":
        return torch.randn(b, h, s + 7, d).to(dtype)[:, :, 3 : s + 3]
    if layout == "bshd":
        return torch.randn(b, s, h, d).to(dtype).transpose(1, 2)
    raise ValueError(layout)


def installed(dist: str) -> bool:
    """Whether the distribution ``dist`` is installed (data-only packages are located, never imported)."""
    try:
        importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True
