"""low_rank_linear: the C++ CPU kernel (every SIMD level here) and the Triton kernels (interpreter) against the
reference, values and gradients, for every hidden activation with and without the fused output ReLU; the reference
against autograd of the plain two-linear form."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    assert_close,
    assert_close_scaled,
    check_backend,
    env,
    requires_cuda,
    requires_ext,
    supported_cpu_isas,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from effkern.ops import low_rank_linear
from effkern.ops.low_rank_linear import ACTIVATIONS, OUT_ACTIVATIONS

ACTS = list(itertools.product(ACTIVATIONS, OUT_ACTIVATIONS))  # (activation, out_activation)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ISAS = supported_cpu_isas()


def make(m, d_in, r, d_out, dtype, bias=True, seed=0, b2_margin=0.0):
    """Inputs on a grid of multiples of 1/32 (x, u) and 1/64 (v), with b1 = 1/64 mod 1/32: every hidden value
    t = x u^T + b1 is exact in fp32 whatever the summation order and never 0, so ReLU's kink is never at stake
    (any rounding difference there would flip a gradient by a whole term). The output is not exact: a kernel that
    rounds the hidden layer to a 16-bit dtype before the second product (Triton's tl.dot) moves it by ~1e-2, so for
    the output ReLU those tests keep b2 at least ``b2_margin`` from 0 (each column then all kept or all cut)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-8, 9, (m, d_in), generator=g) / 32
    u = torch.randint(-4, 5, (r, d_in), generator=g) / 32
    v = torch.randint(-16, 17, (d_out, r), generator=g) / 64
    b1 = torch.randint(-8, 8, (r,), generator=g) / 32 + 1 / 64
    b2 = torch.randn(d_out, generator=g)
    b2 += b2.sign() * b2_margin
    tensors = [x, u, v] + ([b1, b2] if bias else [])
    return [t.to(dtype).requires_grad_() for t in tensors]


def margin(acts, dtype) -> float:
    return 8.0 if acts[1] == "relu" and dtype != torch.float32 else 0.0


def forward_backward(backend, inputs, acts, isa=None):
    with env(EFFKERN_BACKEND=backend, EFFKERN_CPU_ISA=isa):
        y = low_rank_linear(*inputs, activation=acts[0], out_activation=acts[1])
        weight = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.device)
        grads = torch.autograd.grad((y.float() * weight).sum(), inputs)
    return [y, *grads]


def check(backend, inputs, acts, isas=(None,)):
    check_backend(lambda name, isa: forward_backward(name, inputs, acts, isa), backend, isas)


@pytest.mark.parametrize("acts", ACTS)
def test_reference_matches_autograd_of_two_linears(acts):
    inputs = make(9, 20, 6, 11, torch.float32)
    x, u, v, b1, b2 = inputs
    with env(EFFKERN_BACKEND="reference"):
        got = forward_backward("reference", inputs, acts)
    act, out_act = ({"none": lambda t: t, "relu": F.relu, "gelu": F.gelu}[a] for a in acts)
    y = out_act(F.linear(act(F.linear(x, u, b1)), v, b2))
    weight = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    want = [y, *torch.autograd.grad((y * weight).sum(), inputs)]
    for a, b in zip(got, want, strict=True):
        assert_close_scaled(a, b)


pytestmark = requires_ext


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("acts", ACTS)
@pytest.mark.parametrize("m, d_in, r, d_out", [
    (13, 40, 8, 24),  # row tail (13 = 2 tiles of 6 + 1), small everything
    (50, 112, 20, 400),  # the CTR shapes: r not a multiple of a vector, d_out of the MLP
    (7, 5, 3, 17),  # every width below one vector
    (31, 64, 100, 33),  # r over one register tile: two column chunks (64 + 48 on AVX-512)
    (1, 1, 1, 1),
    (3, 40, 20, 33),  # a few rows (<= 4): dot products from u and v in place, eight rows of them at a time + tails
    (4, 400, 64, 400),  # a few rows on a CTR layer: two rows a group on AVX-512
    (10, 1024, 130, 1100),  # fp32 weights over 1 MiB: up to 32 rows as dot products, split over threads
])
def test_cpu_matches_reference(m, d_in, r, d_out, acts, dtype):
    check("cpu", make(m, d_in, r, d_out, dtype), acts, isas=ISAS)


def test_cpu_streamed_outputs_match_reference():
    """An fp32 output of 1 MiB or more is written with streaming stores: y (with the relu in the same store) and the
    backward's dx (610 x 512 floats: 1.25 MB; 610 rows end in a partial tile)."""
    for acts in (("relu", "none"), ("none", "relu")):
        check("cpu", make(610, 40, 16, 512, torch.float32), acts, isas=ISAS)
        check("cpu", make(610, 512, 16, 40, torch.float32), acts, isas=ISAS)


@pytest.mark.parametrize("acts", ACTS)
def test_cpu_without_biases_and_with_batch_dims(acts):
    x, u, v = make(12, 16, 4, 8, torch.float32, bias=False)
    check("cpu", [x.detach().view(3, 4, 16).requires_grad_(), u, v], acts, isas=ISAS[:1])
    check("cpu", [x.detach().t().contiguous().t().requires_grad_(), u, v], acts, isas=ISAS[:1])
    strided = [t.detach().t().contiguous().t().requires_grad_() for t in (u, v)]  # the kernels pack any strides
    check("cpu", [x, *strided], acts, isas=ISAS[:1])


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_strided_weights_and_biases(backend):
    """Weights and biases that are views with stride 2 (slices of larger tensors) give the same values and
    gradients (the Triton kernels read the biases as contiguous)."""
    if backend == "triton":
        pytest.importorskip("triton")
    for m in (9, 2):  # 2 rows: the few rows' forward reads u and v in place only when contiguous
        inputs = [torch.stack([t.detach(), -t.detach()], -1)[..., 0] for t in make(m, 20, 6, 11, torch.float32)]
        assert all(not t.is_contiguous() for t in inputs)
        check(backend, [t.requires_grad_() for t in inputs], ("relu", "none"))


def test_cpu_gelu_on_a_wide_range():
    """The kernel's erf approximation against torch's GELU where it bends and in both tails."""
    x, u, v, b1, b2 = make(8, 4, 32, 8, torch.float32)
    with torch.no_grad():
        u.zero_()
        b1.copy_(torch.linspace(-9, 9, 32))
    check("cpu", [x, u, v, b1, b2], ("gelu", "none"), isas=ISAS)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(m=st.integers(1, 40), d_in=st.integers(1, 70), r=st.integers(1, 70), d_out=st.integers(1, 70),
       acts=st.sampled_from(ACTS), bias=st.booleans(), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_property_against_reference(m, d_in, r, d_out, acts, bias, dtype, seed):
    check("cpu", make(m, d_in, r, d_out, dtype, bias, seed), acts, isas=ISAS[:1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("acts", ACTS)
def test_triton_matches_reference(acts, dtype):
    pytest.importorskip("triton")
    check("triton", make(70, 100, 20, 70, dtype, b2_margin=margin(acts, dtype)), acts)
    check("triton", make(5, 7, 3, 9, dtype, bias=False), acts)


def test_opcheck_and_compile():
    x, u, v, b1, b2 = make(10, 12, 4, 6, torch.float32)
    torch.library.opcheck(torch.ops.effkern.low_rank_linear.default, (x, u, b1, v, b2, 2, 0))
    torch.library.opcheck(torch.ops.effkern.low_rank_linear.default, (x, u, None, v, None, 1, 1))
    g = torch.randn(10, 6)
    for y in (None, F.relu(g.flip(0))):
        torch.library.opcheck(torch.ops.effkern.low_rank_linear_bwd.default, (x.detach(), u.detach(), b1.detach(),
                                                                             v.detach(), g, y, 0))

    def loss(x, u, v, b1, b2):
        return low_rank_linear(x, u, v, b1, b2, activation="gelu").square().sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    assert_close(compiled(x, u, v, b1, b2), loss(x, u, v, b1, b2))
    for a, b in zip(torch.autograd.grad(compiled(x, u, v, b1, b2), (x, u, v)),
                    torch.autograd.grad(loss(x, u, v, b1, b2), (x, u, v)), strict=True):
        assert_close_scaled(a, b)


@pytest.mark.parametrize("change, match", [
    (lambda a: a.update(x=a["x"].to(torch.complex64)), "x must have dtype in"),
    (lambda a: a.update(u=a["u"][:, :5]), r"u \[r, d_in\] must have size 12 in dim 1"),
    (lambda a: a.update(v=a["v"][:, :3]), r"v \[d_out, r\] must have size 4 in dim 1"),
    (lambda a: a.update(v=a["v"].half()), "v must have the same dtype as x"),
    (lambda a: a.update(b1=torch.zeros(5)), r"b1 \[4\] must have size 4 in dim 0"),
    (lambda a: a.update(b2=torch.zeros(6, 1)), "b2 must be 1-D"),
    (lambda a: a.update(u=torch.zeros(0, 12), v=torch.zeros(6, 0)), "r, d_in and d_out must be >= 1"),
    (lambda a: a.update(activation="tanh"), "activation must be one of"),
    (lambda a: a.update(out_activation="gelu"), "out_activation must be one of"),
])
def test_bad_inputs_name_the_argument(change, match):
    x, u, v, b1, b2 = (t.detach() for t in make(10, 12, 4, 6, torch.float32))
    args = dict(x=x, u=u, v=v, b1=b1, b2=b2, activation="relu")
    change(args)
    with pytest.raises((ValueError, TypeError), match=match):
        low_rank_linear(**args)


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("acts", ACTS)
@pytest.mark.parametrize("m, d_in, r, d_out", [(4096, 400, 64, 400), (70, 100, 20, 70), (5, 7, 3, 9)])
def test_gpu_backends(backend, dtype, acts, m, d_in, r, d_out):
    inputs = [t.detach().cuda().requires_grad_() for t in make(m, d_in, r, d_out, dtype, b2_margin=margin(acts, dtype))]
    check(backend, inputs, acts)
