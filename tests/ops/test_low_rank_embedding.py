"""low_rank_embedding: the C++ CPU kernel (every SIMD level here) and the Triton kernels (interpreter) against the
reference, values and gradients; the reference against the uncompressed embedding it reconstructs."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, check_backend, env, requires_cuda, requires_ext, supported_cpu_isas
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from effkern.ops import low_rank_embedding

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ISAS = supported_cpu_isas()


def make(b, sizes, k, d, bag, dtype, seed=0, pad=0.3):
    """Inputs for fields of vocabulary ``sizes``; with ``bag`` ids per field some of them are padding (-1)."""
    g = torch.Generator().manual_seed(seed)
    offsets = torch.tensor([0, *torch.tensor(sizes).cumsum(0)[:-1].tolist()])
    ids = torch.stack([torch.randint(0, n, (b, bag), generator=g) for n in sizes], 1)
    if bag > 1:
        ids[torch.rand(ids.shape, generator=g) < pad] = -1
    table = torch.randn(sum(sizes), k, generator=g).to(dtype).requires_grad_()
    u = (torch.randn(len(sizes), d, k, generator=g) / k**0.5).to(dtype).requires_grad_()
    mu = torch.randn(len(sizes), d, generator=g).to(dtype).requires_grad_()
    return ids if bag > 1 else ids[..., 0], table, offsets, u, mu


def forward_backward(backend, inputs, mode, isa=None):
    ids, table, offsets, u, mu = inputs
    with env(EFFKERN_BACKEND=backend, EFFKERN_CPU_ISA=isa):
        out = low_rank_embedding(ids, table, offsets, u, mu, mode)
        weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device)
        grads = torch.autograd.grad((out.float() * weight).sum(), (table, u, mu))
    return [out, *grads]


def check(backend, inputs, mode, isas=(None,)):
    check_backend(lambda name, isa: forward_backward(name, inputs, mode, isa), backend, isas)


def test_reference_reconstructs_the_embedding():
    """With U_f, mu_f from a table's own eigenbasis at full rank (k = d), the lookup equals the original table's."""
    g = torch.Generator().manual_seed(0)
    sizes, d = [7, 5], 4
    full = torch.randn(sum(sizes), d, generator=g, dtype=torch.float64)
    offsets = torch.tensor([0, 7])
    us, mus, rows = [], [], []
    for lo, n in zip(offsets.tolist(), sizes, strict=True):
        e = full[lo : lo + n]
        mu = e.mean(0)
        basis = torch.linalg.eigh((e - mu).T @ (e - mu))[1]
        us.append(basis), mus.append(mu), rows.append((e - mu) @ basis)
    ids = torch.tensor([[3, 4], [0, 1], [6, 0]])
    with env(EFFKERN_BACKEND="reference"):
        out = low_rank_embedding(ids, torch.cat(rows).float(), offsets, torch.stack(us).float(),
                                 torch.stack(mus).float())
    assert_close(out, torch.stack([full[ids[:, 0]], full[7 + ids[:, 1]]], 1).float())


pytestmark = requires_ext


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("b, sizes, k, d, bag", [
    (33, [943, 1682, 7, 2, 21], 4, 16, 1),  # MovieLens-like single-valued fields
    (17, [19], 3, 16, 6),  # a multi-valued field (genres): bags with padding, some empty
    (9, [5, 3, 8], 2, 19, 3),  # d not a multiple of a vector
    (4, [11], 16, 64, 2),
])
def test_cpu_matches_reference(b, sizes, k, d, bag, mode, dtype):
    check("cpu", make(b, sizes, k, d, bag, dtype), mode, isas=ISAS)


def test_cpu_rank_zero():
    """k = 0 (empty table rows: each lookup is its field's mean) runs forward and backward (empty dtable, du)."""
    inputs = make(6, [12, 4], 0, 5, 2, torch.float32)
    for got, want in zip(forward_backward("cpu", inputs, "sum"), forward_backward("reference", inputs, "sum"),
                         strict=True):
        torch.testing.assert_close(got, want)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(b=st.integers(1, 20), sizes=st.lists(st.integers(1, 30), min_size=1, max_size=5), k=st.integers(1, 9),
       d=st.integers(1, 40), bag=st.integers(1, 4), mode=st.sampled_from(["sum", "mean"]),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_property_against_reference(b, sizes, k, d, bag, mode, dtype, seed):
    check("cpu", make(b, sizes, k, d, bag, dtype, seed), mode, isas=ISAS[:1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_triton_matches_reference(mode, dtype):
    pytest.importorskip("triton")
    check("triton", make(40, [50, 7, 3], 4, 16, 3, dtype), mode)
    check("triton", make(5, [9], 3, 5, 1, dtype), mode)


def test_opcheck_and_compile():
    ids, table, offsets, u, mu = make(6, [5, 4], 3, 8, 2, torch.float32)
    torch.library.opcheck(torch.ops.effkern.low_rank_embedding.default, (ids, table, offsets, u, mu, False))
    g = torch.randn(6, 2, 8)
    torch.library.opcheck(torch.ops.effkern.low_rank_embedding_bwd.default,
                          (ids, table.detach(), offsets, u.detach(), mu.detach(), g, True))

    def loss(table, u, mu):
        return low_rank_embedding(ids, table, offsets, u, mu, "mean").square().sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    assert_close(compiled(table, u, mu), loss(table, u, mu))


@pytest.mark.parametrize("change, match", [
    (lambda a: a.update(ids=a["ids"].float()), "ids must have dtype in"),
    (lambda a: a.update(ids=torch.tensor([[0, 4]])), r"ids\[0, 1, 0\] = 4 is outside field 1's ids \[0, 4\)"),
    (lambda a: a.update(ids=torch.tensor([[-2, 0]])), r"ids\[0, 0, 0\] = -2 is outside field 0's ids"),
    (lambda a: a.update(offsets=torch.tensor([1, 5])), "offsets must start at 0"),
    (lambda a: a.update(offsets=torch.tensor([0, 12])), "offsets must start at 0 and not decrease"),
    (lambda a: a.update(u=a["u"][:, :, :2]), r"u \[F, d, k\] must have size 3 in dim 2"),
    (lambda a: a.update(mu=a["mu"][:, :5]), r"mu \[F, d\] must have size 8 in dim 1"),
    (lambda a: a.update(table=a["table"].half()), "must have the same dtype as table"),
    (lambda a: a.update(mode="max"), "mode must be one of"),
])
def test_bad_inputs_name_the_argument(change, match):
    ids, table, offsets, u, mu = (t.detach() for t in make(6, [5, 4], 3, 8, 1, torch.float32))
    args = dict(ids=ids, table=table, offsets=offsets, u=u, mu=mu, mode="sum")
    change(args)
    with pytest.raises((ValueError, TypeError), match=match):
        low_rank_embedding(**args)


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("b, sizes, k, d, bag", [(4096, [943, 1682, 7, 2, 21], 8, 16, 1), (33, [19], 3, 70, 6)])
def test_gpu_backends(backend, dtype, mode, b, sizes, k, d, bag):
    ids, table, offsets, u, mu = make(b, sizes, k, d, bag, dtype)
    inputs = [ids.cuda(), *(t.detach().cuda().requires_grad_() if t.is_floating_point() else t.cuda()
                            for t in (table, offsets, u, mu))]
    check(backend, inputs, mode)
