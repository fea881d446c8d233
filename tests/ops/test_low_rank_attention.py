"""low_rank_attention: the C++ CPU core (every SIMD level here) against the reference, values and gradients;
the reference backward against autograd of an independent formulation (SDPA)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, assert_close_scaled, env, requires_cuda, requires_ext, supported_cpu_isas
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from effkern.ops import low_rank_attention
from effkern.ops._backend import BackendUnavailableError
from effkern.ops.low_rank_attention import bwd_reference, reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ISAS = supported_cpu_isas()


def make(kk, b, n, d, r, dtype, shared=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((b, n, d) if shared else (kk, b, n, d), generator=g).to(dtype)
    w_qkv = (torch.randn(kk, d, 3 * r, generator=g) / d**0.5).to(dtype)
    w_o = (torch.randn(kk, r, d, generator=g) / r**0.5).to(dtype)
    return [t.requires_grad_() for t in (x, w_qkv, w_o)]


def forward_backward(backend, inputs, isa=None, **kwargs):
    """Output and gradients of a fixed random projection of it (so every output element matters)."""
    with env(EFFKERN_BACKEND=backend, EFFKERN_CPU_ISA=isa):
        y = low_rank_attention(*inputs, **kwargs)
        weight = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.device)
        grads = torch.autograd.grad((y.float() * weight).sum(), inputs)
    return [y, *grads]


def check_cpu(inputs, isas=None, **kwargs):
    expected = forward_backward("reference", inputs, **kwargs)
    for isa in isas or ISAS:
        for got, want in zip(forward_backward("cpu", inputs, isa=isa, **kwargs), expected, strict=True):
            assert got.shape == want.shape and got.dtype == want.dtype
            assert_close_scaled(got, want)


def test_reference_backward_matches_autograd_of_sdpa():
    """bwd_reference's closed-form gradients equal autograd through SDPA (an independent forward)."""
    g = torch.Generator().manual_seed(0)
    kk, b, n, heads, dh = 2, 3, 37, 2, 5
    qkv = torch.randn(kk, b, n, 3 * heads * dh, generator=g, dtype=torch.float64).float().requires_grad_()
    q, k, v = qkv.view(kk, b, n, 3, heads, dh).unbind(3)
    out = F.scaled_dot_product_attention(*(t.transpose(2, 3) for t in (q, k, v)), scale=0.3)
    out = out.transpose(2, 3).reshape(kk, b, n, heads * dh)
    dout = torch.randn(out.shape, generator=g)
    (expected,) = torch.autograd.grad(out, qkv, dout)
    ref_out, lse = reference(qkv.detach(), heads, 0.3)
    assert_close(ref_out, out.detach())
    assert_close(bwd_reference(qkv.detach(), ref_out, lse, dout, heads, 0.3), expected)


pytestmark = requires_ext


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kk", [1, 3, 8])
@pytest.mark.parametrize("n, r, heads", [(197, 16, 2), (50, 7, 1), (65, 12, 3)])
def test_cpu_matches_reference(n, r, heads, kk, dtype):
    check_cpu(make(kk, 2, n, 24, r, dtype), heads=heads)


@pytest.mark.parametrize("n", [1, 2, 17])
def test_tiny_token_counts_and_per_network_inputs(n):
    check_cpu(make(3, 2, n, 16, 8, torch.float32, shared=False), heads=2)


def test_scale_argument():
    check_cpu(make(2, 2, 30, 16, 8, torch.float32), heads=1, scale=0.9, isas=ISAS[:1])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kk=st.integers(1, 4), b=st.integers(1, 3), n=st.integers(1, 80), d=st.integers(1, 40),
       heads=st.integers(1, 3), dh=st.integers(1, 9), shared=st.booleans(), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2**16))
def test_property_against_reference(kk, b, n, d, heads, dh, shared, dtype, seed):
    check_cpu(make(kk, b, n, d, heads * dh, dtype, shared=shared, seed=seed), heads=heads, isas=ISAS[:1])


def test_opcheck():
    kk, b, n, heads, dh = 2, 2, 19, 2, 4
    qkv = torch.randn(kk, b, n, 3 * heads * dh, requires_grad=True)
    torch.library.opcheck(torch.ops.effkern.low_rank_attention_core.default, (qkv, heads, 0.5))
    out, lse = torch.ops.effkern.low_rank_attention_core(qkv.detach(), heads, 0.5)
    dout = torch.randn(out.shape)
    torch.library.opcheck(torch.ops.effkern.low_rank_attention_core_bwd.default, (qkv.detach(), out, lse, dout,
                                                                                 heads, 0.5))


def test_torch_compile_fullgraph():
    inputs = make(3, 2, 20, 16, 8, torch.float32)

    def loss(x, w_qkv, w_o):
        return low_rank_attention(x, w_qkv, w_o, heads=2).square().sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    assert_close(compiled(*inputs), loss(*inputs))
    got = torch.autograd.grad(compiled(*inputs), inputs)
    for a, b in zip(got, torch.autograd.grad(loss(*inputs), inputs), strict=True):
        assert_close_scaled(a, b)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: a.update(x=a["x"][0, 0]), r"x must be \[B, N, d\] or \[K, B, N, d\]"),
        (lambda a: a.update(x=a["x"].to(torch.complex64)), "x must have dtype in"),
        (lambda a: a.update(w_qkv=a["w_qkv"][:, :5]), r"w_qkv \[K, d, 3r\] must have size 16 in dim 1"),
        (lambda a: a.update(w_qkv=a["w_qkv"][..., :23]), "divisible by 3"),
        (lambda a: a.update(w_o=a["w_o"][:, :3]), r"w_o \[K, r, d\] must have size 8 in dim 1"),
        (lambda a: a.update(w_o=a["w_o"].half()), "w_o must have the same dtype as x"),
        (lambda a: a.update(x=torch.randn(2, 2, 5, 16)), "must have K=3"),
        (lambda a: a.update(heads=3), "heads must be a positive divisor of the rank r=8"),
    ],
)
def test_bad_inputs_name_the_argument(change, match):
    x, w_qkv, w_o = (t.detach() for t in make(3, 2, 5, 16, 8, torch.float32))
    args = dict(x=x, w_qkv=w_qkv, w_o=w_o, heads=2)
    change(args)
    with pytest.raises((ValueError, TypeError), match=match):
        low_rank_attention(**args)


def test_forcing_an_unusable_backend_raises():
    inputs = make(1, 1, 4, 8, 4, torch.float32)
    with pytest.raises(BackendUnavailableError, match="cannot run"):
        forward_backward("cuda", inputs)


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, r, heads", [(197, 16, 2), (50, 7, 1), (65, 96, 1), (33, 256, 2)])
def test_gpu_backends(backend, dtype, n, r, heads):
    """Values and gradients on the GPU vs the reference, head dims 8 / 7 / 96 / 128 (the CUDA limit)."""
    inputs = [t.detach().cuda().requires_grad_() for t in make(3, 2, n, 24, r, dtype)]
    expected = forward_backward("reference", inputs, heads=heads)
    for got, want in zip(forward_backward(backend, inputs, heads=heads), expected, strict=True):
        assert_close_scaled(got, want)


def test_denormal_probabilities_are_flushed_inside_the_kernel_only():
    """Logits spanning hundreds of nats put probabilities at the exp clamp, where products fall below FLT_MIN.
    The kernel flushes those to zero on its threads (x86 FMAs on denormals are ~100x slower); results still equal
    the reference, and the caller's thread keeps its own floating-point mode."""
    x, w_qkv, w_o = make(2, 3, 65, 16, 8, torch.float32)
    with torch.no_grad():
        w_qkv[..., :8] *= 40  # sharp queries: logits spread over ~300 nats
    expected = forward_backward("reference", [x, w_qkv, w_o], heads=2)
    got = forward_backward("cpu", [x, w_qkv, w_o], heads=2)
    assert_close_scaled(got[0], expected[0])
    for g, want in zip(got[1:], expected[1:], strict=True):  # near one-hot softmax: an ill-conditioned backward
        torch.testing.assert_close(g, want, rtol=2e-3, atol=2e-3 * want.abs().max().item())
    assert (torch.tensor([1e-40]) * 1.0).item() != 0.0  # denormals still exist on this thread
