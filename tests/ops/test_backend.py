"""The backend framework: availability rules, forcing, and that builds which promise the extension have it."""

from __future__ import annotations

import os

import pytest
import torch

from effkern.ops import _backend


def test_extension_present_when_required():
    """`make test` and CI set EFFKERN_REQUIRE_EXTENSION=1: a failed build must fail the suite, not skip it."""
    if os.environ.get("EFFKERN_REQUIRE_EXTENSION") != "1":
        pytest.skip("EFFKERN_REQUIRE_EXTENSION is not set")
    ext = _backend.extension()
    assert ext is not None, "effkern._C did not build"
    assert ext.cpu_isa() in ("avx512", "avx2", "generic")


def test_reference_is_always_usable():
    assert "reference" in _backend.usable_backends(torch.device("cpu"))
    assert _backend.why_unavailable("reference", torch.device("meta")) is None


def test_triton_needs_cuda_or_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET" in _backend.why_unavailable("triton", torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _backend.why_unavailable("triton", torch.device("cpu")) is None


def test_use_backend_restores_the_environment(monkeypatch):
    monkeypatch.delenv("EFFKERN_BACKEND", raising=False)
    with _backend.use_backend("reference"):
        assert _backend.resolve("x", torch.device("cpu"), ["cpu"]) == "reference"
    assert "EFFKERN_BACKEND" not in os.environ


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="unknown backend"):
        _backend.why_unavailable("tpu", torch.device("cpu"))
