"""Backend availability, the ``EFFKERN_BACKEND`` override and one-time fallback warnings.

Every op routes its device kernel through :func:`resolve`, so the rules live in one place:

* ``EFFKERN_BACKEND=reference|cpu|triton|cuda`` forces a backend; forcing one that cannot run on the
  input's device raises :class:`BackendUnavailableError` naming what is missing.
* Otherwise the op's preferred native backends for the device are tried in order; if none is usable the
  pure-PyTorch reference runs and a warning (once per op and device) says what is missing and how to build it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from types import ModuleType

import torch

BACKENDS = ("reference", "cpu", "triton", "cuda")

BUILD_HINT = (
    "build the extension with `pip install --no-build-isolation -e .` (or `make install`); "
    "the CUDA kernels need a CUDA build of torch and nvcc"
)


class BackendUnavailableError(RuntimeError):
    """A backend was forced (``EFFKERN_BACKEND``) but cannot run here."""


@functools.cache
def extension() -> ModuleType | None:
    """The compiled ``effkern._C`` module, or None when it was not built."""
    try:
        return importlib.import_module("effkern._C")
    except ImportError:
        return None


@functools.cache
def _triton_module() -> ModuleType | None:
    try:
        import triton  # noqa: F401

        return importlib.import_module("effkern.triton_kernels")
    except ImportError:
        return None


def triton_interpreted() -> bool:
    """True when Triton kernels run on CPU tensors through the interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def why_unavailable(backend: str, device: torch.device) -> str | None:
    """None when ``backend`` can run on ``device``; otherwise the reason, for error and warning texts."""
    kind = device.type
    if backend == "reference":
        return None
    if backend == "cpu":
        if kind != "cpu":
            return f"the cpu backend runs on CPU tensors, got a {kind} tensor"
        return None if extension() is not None else f"effkern._C is not built ({BUILD_HINT})"
    if backend == "cuda":
        if kind != "cuda":
            return f"the cuda backend runs on CUDA tensors, got a {kind} tensor"
        ext = extension()
        if ext is None or not getattr(ext, "HAS_CUDA", False):
            return f"effkern._C was built without CUDA kernels ({BUILD_HINT})"
        return None
    if backend == "triton":
        if _triton_module() is None:
            return "triton is not installed (pip install triton)"
        if kind == "cuda" or (kind == "cpu" and triton_interpreted()):
            return None
        return f"triton kernels need a CUDA tensor (or TRITON_INTERPRET=1 for CPU tensors), got {kind}"
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


def forced_backend() -> str | None:
    """The backend named by ``EFFKERN_BACKEND``, or None when unset."""
    name = os.environ.get("EFFKERN_BACKEND", "").strip().lower()
    if not name:
        return None
    if name not in BACKENDS:
        raise BackendUnavailableError(f"EFFKERN_BACKEND={name!r} is not a backend; expected one of {BACKENDS}")
    return name


@functools.cache
def _warn_fallback(op: str, device_type: str, reasons: str) -> None:
    warnings.warn(
        f"effkern.{op}: no native kernel for {device_type} tensors ({reasons}); "
        "running the slow pure-PyTorch reference",
        RuntimeWarning,
        stacklevel=4,
    )


def resolve(op: str, device: torch.device, preferred: Sequence[str]) -> str:
    """Pick the backend that runs ``op`` on ``device``.

    ``preferred`` lists native backends in order of preference for this call (the op decides, e.g. per shape); empty
    when no kernel takes the input (float64, which only the reference computes, e.g. for ``gradcheck``).
    """
    forced = forced_backend()
    if forced is not None:
        reason = why_unavailable(forced, device)
        if reason is None and not preferred and forced != "reference":
            reason = "its kernels take float32, float16 and bfloat16; float64 runs on the reference"
        if reason is not None:
            raise BackendUnavailableError(f"effkern.{op}: EFFKERN_BACKEND={forced} cannot run: {reason}")
        return forced
    if not preferred:
        return "reference"
    reasons = []
    for name in preferred:
        reason = why_unavailable(name, device)
        if reason is None:
            return name
        reasons.append(f"{name}: {reason}")
    _warn_fallback(op, device.type, "; ".join(reasons) or "none registered")
    return "reference"


def usable_backends(device: torch.device) -> list[str]:
    """Every backend that can run on ``device`` right now (for `effkern info` and tests)."""
    return [b for b in BACKENDS if why_unavailable(b, device) is None]


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force ``name`` (as ``EFFKERN_BACKEND`` does) inside the block; None restores automatic choice."""
    old = os.environ.get("EFFKERN_BACKEND")
    if name is None:
        os.environ.pop("EFFKERN_BACKEND", None)
    else:
        os.environ["EFFKERN_BACKEND"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("EFFKERN_BACKEND", None)
        else:
            os.environ["EFFKERN_BACKEND"] = old


@functools.cache
def _resolved(op: str, device_type: str, preferred: tuple[str, ...], *state) -> str:
    """:func:`resolve` memoised on what it reads that can change (``state``: the two environment variables and the
    extension module, which tests replace; triton's import is fixed per process), because it runs on every op call
    (README "Backends": what the unmemoised form cost); raising calls (a forced backend that cannot run) are not
    memoised."""
    return resolve(op, torch.device(device_type), preferred)


def run(op: str, device: torch.device, preferred: Sequence[str], impls: dict[str, Callable], *args, **kwargs):
    """Resolve the backend for ``op`` and call its implementation."""
    env = os.environ
    backend = _resolved(op, device.type, tuple(preferred), env.get("EFFKERN_BACKEND"), env.get("TRITON_INTERPRET"),
                        extension())
    if backend not in impls:
        raise BackendUnavailableError(f"effkern.{op} has no {backend} kernel; it has {sorted(impls)}")
    return impls[backend](*args, **kwargs)
