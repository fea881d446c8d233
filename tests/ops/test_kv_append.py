"""kv_append: the C++ CPU kernel (and CUDA when present) against the reference, in place on strided caches."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, env, requires_cuda, requires_ext, strided_cache
from hypothesis import given, settings
from hypothesis import strategies as st

from effkern.ops import Rope, kv_append
from effkern.ops.rope import STYLES, apply_rope

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
pytestmark = requires_ext


def appended(backend, k_cache, v_cache, *args, **kwargs):
    kc, vc = k_cache.clone(), v_cache.clone()
    with env(EFFKERN_BACKEND=backend):
        kv_append(kc, vc, *args, **kwargs)
    return kc, vc


def check(backend, k_cache, v_cache, *args, **kwargs):
    want_k, want_v = appended("reference", k_cache, v_cache, *args, **kwargs)
    got_k, got_v = appended(backend, k_cache, v_cache, *args, **kwargs)
    assert_close(got_k, want_k)
    assert torch.equal(got_v, want_v)  # values are copied, never rounded twice


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("style", ["half", "interleaved"])
@pytest.mark.parametrize("layout", ["contiguous", "sliced", "bshd"])
def test_rotate_and_write(dtype, style, layout):
    torch.manual_seed(0)
    kc, vc = strided_cache(3, 2, 20, 64, dtype, layout), strided_cache(3, 2, 20, 48, dtype, layout)
    k, v = torch.randn(3, 2, 64).to(dtype), torch.randn(3, 2, 48).to(dtype)
    slots = torch.tensor([0, 19, 7])
    check("cpu", kc, vc, k, v, slots, rope=Rope(style=style, rotary_dim=32), positions=torch.tensor([5, 900, 7]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_grouped_projection(dtype):
    # post-RoPE compression: 6 input key heads -> 2 cache heads, each from a [3 * 64, 40] basis
    torch.manual_seed(1)
    kc, vc = torch.zeros(2, 2, 10, 40, dtype=dtype), torch.zeros(2, 2, 10, 64, dtype=dtype)
    k, v = torch.randn(2, 6, 64).to(dtype), torch.randn(2, 2, 64).to(dtype)
    proj = torch.randn(2, 3 * 64, 40) / 14
    check("cpu", kc, vc, k, v, torch.tensor([3, 9]), rope=Rope(), k_proj=proj)


@settings(max_examples=30, deadline=None)
@given(
    b=st.integers(1, 3),
    hkv=st.integers(1, 3),
    g=st.integers(1, 3),
    d_half=st.integers(1, 40),
    dk=st.integers(1, 70),
    dtype=st.sampled_from(DTYPES),
    style=st.sampled_from(["half", "interleaved"]),
    data=st.data(),
)
def test_property_against_reference(b, hkv, g, d_half, dk, dtype, style, data):
    d, s = 2 * d_half, 9
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    proj = torch.randn(hkv, g * d, dk) / d if g > 1 or data.draw(st.booleans()) else None
    dk = dk if proj is not None else d
    kc, vc = torch.zeros(b, hkv, s, dk, dtype=dtype), torch.zeros(b, hkv, s, 24, dtype=dtype)
    k, v = torch.randn(b, hkv * g, d).to(dtype), torch.randn(b, hkv, 24).to(dtype)
    slots = torch.tensor(data.draw(st.lists(st.integers(0, s - 1), min_size=b, max_size=b)))
    rope = Rope(style=style, rotary_dim=2 * data.draw(st.integers(1, d_half)))
    check("cpu", kc, vc, k, v, slots, rope=rope, k_proj=proj)


def test_without_rope_stores_keys_verbatim():
    kc, vc = torch.zeros(1, 2, 4, 64), torch.zeros(1, 2, 4, 64)
    k, v = torch.randn(1, 2, 64), torch.randn(1, 2, 64)
    got_k, got_v = appended("cpu", kc, vc, k, v, torch.tensor([2]))
    assert torch.equal(got_k[0, :, 2], k[0]) and torch.equal(got_v[0, :, 2], v[0])
    assert got_k[0, :, [0, 1, 3]].abs().sum() == 0


def test_reference_rotation_matches_definition():
    """rotate_half style: out[i] = x[i] cos - x[i + R/2] sin, out[i + R/2] = x[i + R/2] cos + x[i] sin."""
    x = torch.randn(64)
    theta = 7 * 10000.0 ** -(torch.arange(0, 64, 2) / 64)
    out = apply_rope(x, theta.cos(), theta.sin(), STYLES["half"], 64)
    expected = torch.cat([x[:32] * theta.cos() - x[32:] * theta.sin(), x[32:] * theta.cos() + x[:32] * theta.sin()])
    assert_close(out, expected)
    z = torch.view_as_complex(x.view(32, 2).contiguous()) * torch.polar(torch.ones(32), theta)
    assert_close(apply_rope(x, theta.cos(), theta.sin(), STYLES["interleaved"], 64), torch.view_as_real(z).flatten())


def test_opcheck():
    kc, vc = torch.zeros(2, 2, 8, 64), torch.zeros(2, 2, 8, 64)
    k, v = torch.randn(2, 2, 64), torch.randn(2, 2, 64)
    slots = torch.tensor([1, 5], dtype=torch.int32)
    cos, sin = Rope().cos_sin(slots, 64)
    torch.library.opcheck(torch.ops.effkern.kv_append.default, (kc, vc, k, v, slots, cos, sin, None, 0, 64))


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: a.update(slots=torch.tensor([8, 0])), r"slots must be within \[0, 7\]"),
        (lambda a: a.update(k=a["k"].half()), "k must have the same dtype as k_cache"),
        (lambda a: a.update(k=torch.randn(2, 3, 64)), r"k \[B, Hk=3, D=64\] must match k_cache"),
        (lambda a: a.update(v=torch.randn(2, 2, 32)), r"v \[B, Hkv, Dv\] must have size 64 in dim 2"),
        (lambda a: a.update(k=torch.randn(2, 3, 64), k_proj=torch.randn(2, 64, 64)), "Hk=3 must be a multiple"),
        (lambda a: a.update(k=torch.randn(2, 4, 64), k_proj=torch.randn(2, 64, 64)), r"k_proj \[Hkv, g\*D, Dk\]"),
        (lambda a: a.update(v_cache=a["v_cache"][..., ::2]), "v_cache must have a contiguous last dim"),
    ],
)
def test_bad_inputs_name_the_argument(change, match):
    args = dict(k_cache=torch.zeros(2, 2, 8, 64), v_cache=torch.zeros(2, 2, 8, 64), k=torch.randn(2, 2, 64),
                v=torch.randn(2, 2, 64), slots=torch.tensor([0, 1]))
    change(args)
    with pytest.raises((ValueError, TypeError), match=match):
        kv_append(**args)


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_backends(backend, dtype):
    kc = torch.zeros(3, 2, 50, 40, dtype=dtype, device="cuda")
    vc = torch.zeros(3, 2, 50, 96, dtype=dtype, device="cuda")
    k, v = torch.randn(3, 4, 128, device="cuda").to(dtype), torch.randn(3, 2, 96, device="cuda").to(dtype)
    proj = torch.randn(2, 256, 40, device="cuda") / 16
    check(backend, kc, vc, k, v, torch.tensor([0, 49, 3], device="cuda"), rope=Rope(), k_proj=proj)
