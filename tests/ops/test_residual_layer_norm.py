"""residual_layer_norm: the C++ CPU kernel (every SIMD level here) and the Triton kernels (interpreter) against the
reference, values and gradients; the reference against autograd of torch's own add + layer_norm."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, assert_close_scaled, check_backend, env, requires_ext, supported_cpu_isas
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from effkern.ops import residual_layer_norm
from effkern.ops.residual_layer_norm import bwd_reference, reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ISAS = supported_cpu_isas()


def make(u_shape, z_shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    # an offset and a spread per row, as residual streams have: the variance must not come from cancellation
    u = (torch.randn(u_shape, generator=g) * 3 + torch.randn(*u_shape[:-1], 1, generator=g) * 5).to(dtype)
    z = torch.randn(z_shape, generator=g).to(dtype)
    return u.requires_grad_(), z.requires_grad_()


def forward_backward(backend, u, z, isa=None, eps=1e-5):
    """h, x and the gradients of u and z under fixed random projections of both outputs."""
    with env(EFFKERN_BACKEND=backend, EFFKERN_CPU_ISA=isa):
        h, x = residual_layer_norm(u, z, eps)
        g = torch.Generator().manual_seed(1)
        wh, wx = torch.randn(h.shape, generator=g), torch.randn(x.shape, generator=g)
        grads = torch.autograd.grad((h.float() * wh).sum() + (x.float() * wx).sum(), (u, z))
    return [h, x, *grads]


def check(backend, u, z, isas=(None,), eps=1e-5):
    check_backend(lambda name, isa: forward_backward(name, u, z, isa, eps), backend, isas)


def test_reference_matches_autograd_of_add_and_layer_norm():
    u, z = make((3, 4, 5, 24), (4, 5, 24), torch.float32)
    with env(EFFKERN_BACKEND="reference"):  # the reference forward + closed-form backward
        h, x = residual_layer_norm(u, z)
        g = torch.Generator().manual_seed(2)
        wh, wx = torch.randn(h.shape, generator=g), torch.randn(x.shape, generator=g)
        got = torch.autograd.grad((h * wh).sum() + (x * wx).sum(), (u, z))
    h_t = u + z
    x_t = F.layer_norm(h_t, (24,))
    want = torch.autograd.grad((h_t * wh).sum() + (x_t * wx).sum(), (u, z))
    assert_close(h, h_t)
    assert_close(x, x_t)
    for a, b in zip(got, want, strict=True):
        assert_close_scaled(a, b)



@requires_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("u_shape, z_shape", [
    ((8, 2, 65, 128), (2, 65, 128)),  # K side streams, one shared feature
    ((2, 5, 131), (2, 5, 131)),  # same shapes, d not a multiple of any vector width
    ((3, 4, 7), (7,)),  # one row of z for every row of u
    ((1, 1), (1,)),  # d = 1: x is 0
])
def test_cpu_matches_reference(u_shape, z_shape, dtype):
    check("cpu", *make(u_shape, z_shape, dtype), isas=ISAS)


@requires_ext
def test_cpu_eps_and_empty_rows():
    check("cpu", *make((2, 3, 16), (3, 16), torch.float32), eps=0.5)
    u, z = make((0, 3, 16), (3, 16), torch.float32)
    h, x = residual_layer_norm(u, z)
    assert h.shape == x.shape == (0, 3, 16)


@requires_ext
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lead=st.integers(1, 4), rows=st.integers(1, 9), d=st.integers(1, 70), shared=st.booleans(),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_property_against_reference(lead, rows, d, shared, dtype, seed):
    check("cpu", *make((lead, rows, d), (rows, d) if shared else (lead, rows, d), dtype, seed), isas=ISAS[:1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("u_shape, z_shape", [((3, 2, 9, 40), (2, 9, 40)), ((5, 131), (5, 131))])
def test_triton_matches_reference(u_shape, z_shape, dtype):
    pytest.importorskip("triton")
    check("triton", *make(u_shape, z_shape, dtype))


@requires_ext
def test_opcheck_and_compile():
    u, z = make((2, 3, 16), (3, 16), torch.float32)
    torch.library.opcheck(torch.ops.effkern.residual_layer_norm.default, (u, z, 1e-5))
    h, x, rstd = torch.ops.effkern.residual_layer_norm(u.detach(), z.detach(), 1e-5)
    torch.library.opcheck(torch.ops.effkern.residual_layer_norm_bwd.default, (x, rstd, torch.randn_like(h),
                                                                             torch.randn_like(x)))
    assert_close(bwd_reference(x, rstd, h, x), torch.ops.effkern.residual_layer_norm_bwd(x, rstd, h, x))
    assert_close(reference(u, z, 1e-5)[2], rstd)

    def loss(u, z):
        h, x = residual_layer_norm(u, z)
        return (h * x).sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    assert_close(compiled(u, z), loss(u, z))
    for a, b in zip(torch.autograd.grad(compiled(u, z), (u, z)), torch.autograd.grad(loss(u, z), (u, z)),
                    strict=True):
        assert_close_scaled(a, b)


@pytest.mark.parametrize("change, match", [
    (lambda a: a.update(u=a["u"].to(torch.complex64)), "u must have dtype in"),
    (lambda a: a.update(z=a["z"].half()), "z must have the same dtype as u"),
    (lambda a: a.update(z=torch.randn(4, 16)), r"z must have u's trailing dims \(3, 16\)"),
    (lambda a: a.update(z=torch.randn(1, 2, 3, 16)), "z must have u's trailing dims"),
    (lambda a: a.update(u=torch.randn(2, 3, 0), z=torch.randn(3, 0)), "d >= 1"),
    (lambda a: a.update(eps=0.0), "eps must be > 0"),
])
def test_bad_inputs_name_the_argument(change, match):
    args = dict(u=torch.randn(2, 3, 16), z=torch.randn(3, 16), eps=1e-5)
    change(args)
    with pytest.raises((ValueError, TypeError), match=match):
        residual_layer_norm(**args)
