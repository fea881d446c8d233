"""gqa_decode: every native backend that can run here against the pure-PyTorch reference.

The C++ CPU kernel is tested at every SIMD level this machine supports (EFFKERN_CPU_ISA), the CUDA kernel
when a GPU is present. The Triton kernels are tested under the interpreter in test_triton_kernels.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_close, env, requires_cuda, requires_ext, strided_cache, supported_cpu_isas
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from effkern.ops import Rope, gqa_decode
from effkern.ops._backend import BackendUnavailableError

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ISAS = supported_cpu_isas()


def run(backend: str, *args, isa: str | None = None, **kwargs) -> torch.Tensor:
    with env(EFFKERN_BACKEND=backend, EFFKERN_CPU_ISA=isa):
        return gqa_decode(*args, **kwargs)


def check_cpu(*args, isas=None, **kwargs) -> None:
    """The C++ kernel at each SIMD level equals the reference."""
    expected = run("reference", *args, **kwargs)
    for isa in isas or ISAS:
        assert_close(run("cpu", *args, isa=isa, **kwargs), expected)


def make(b, hq, hkv, s, d, dtype, dk=None, dv=None, layout="contiguous", seed=0):
    torch.manual_seed(seed)
    q = torch.randn(b, hq, d).to(dtype)
    k = strided_cache(b, hkv, s, dk or d, dtype, layout)
    v = strided_cache(b, hkv, s, dv or dk or d, dtype, layout)
    return q, k, v


pytestmark = requires_ext


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [1, 2, 3, 5, 6, 7, 8, 16])
def test_group_sizes(group, dtype):
    q, k, v = make(3, 2 * group, 2, 97, 72, dtype)
    check_cpu(q, k, v, torch.tensor([0, 1, 97]), rope=Rope())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 72, 80, 96, 128, 37])
def test_head_dims(d, dtype):
    q, k, v = make(2, 6, 2, 70, d, dtype)
    rope = Rope(rotary_dim=d - d % 2, style="interleaved")
    check_cpu(q, k, v, torch.tensor([70, 33]), rope=rope)


@pytest.mark.parametrize("lens", [[0, 0], [1, 1], [1, 0], [31, 33], [64, 65], [200, 3]])
def test_lengths(lens):
    q, k, v = make(2, 8, 2, 200, 64, torch.float32)
    check_cpu(q, k, v, torch.tensor(lens), rope=Rope(theta=1e5))


def test_empty_context_gives_zeros_not_nan():
    q, k, v = make(2, 4, 1, 16, 64, torch.float16)
    for backend in ["reference", "cpu"]:
        out = run(backend, q, k, v, torch.tensor([0, 0], dtype=torch.int32))
        assert torch.equal(out, torch.zeros_like(out)), backend


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lens, starts", [([40, 3000, 7], [0, 1001, 7]), ([1100, 300, 64], [33, 299, 31])])
def test_kv_start_skips_left_padding(lens, starts, dtype):
    # left-padded batches: rows before kv_start are padding; long ranges split, empty ones give zeros
    q, k, v = make(3, 6, 2, 3000, 64, dtype)
    lens, starts = torch.tensor(lens), torch.tensor(starts)
    kwargs = dict(kv_start=starts, rope=Rope(), positions=(lens - starts - 1).clamp_min(0))
    check_cpu(q, k, v, lens, **kwargs)
    out = run("cpu", q, k, v, lens, **kwargs)
    for b in range(3):  # equal to attending over the valid rows moved to the front
        n0, n1 = int(starts[b]), int(lens[b])
        alone = run("cpu", q[b : b + 1], k[b : b + 1, :, n0:n1], v[b : b + 1, :, n0:n1], torch.tensor([n1 - n0]),
                    rope=Rope(), positions=kwargs["positions"][b : b + 1])
        assert_close(out[b : b + 1], alone)


@pytest.mark.parametrize("dtype", DTYPES)
def test_long_context_uses_splits(dtype):
    # one (sequence, KV head) pair and 3000 keys: the kernel splits the range across threads and merges
    q, k, v = make(1, 4, 1, 3000, 64, dtype)
    check_cpu(q, k, v, torch.tensor([2999]), rope=Rope())
    q, k, v = make(3, 9, 3, 1100, 64, dtype)
    check_cpu(q, k, v, torch.tensor([1100, 0, 517]), rope=Rope())


@pytest.mark.parametrize("style", ["half", "interleaved"])
@pytest.mark.parametrize("rotary_dim", [None, 32, 2])
def test_rope_variants(style, rotary_dim):
    q, k, v = make(2, 6, 3, 50, 64, torch.float32)
    lens = torch.tensor([50, 17])
    check_cpu(q, k, v, lens, rope=Rope(style=style, rotary_dim=rotary_dim), positions=torch.tensor([1000, 3]))


def test_rope_tables_and_inv_freq_match_theta():
    q, k, v = make(2, 4, 2, 40, 64, torch.float32)
    lens, pos = torch.tensor([40, 9]), torch.tensor([7, 123])
    by_theta = run("cpu", q, k, v, lens, rope=Rope(theta=500.0), positions=pos)
    inv_freq = 500.0 ** -(torch.arange(0, 64, 2, dtype=torch.float32) / 64)
    by_freq = run("cpu", q, k, v, lens, rope=Rope(inv_freq=inv_freq), positions=pos)
    angle = torch.arange(200, dtype=torch.float32)[:, None] * inv_freq
    by_table = run("cpu", q, k, v, lens, rope=Rope(cos=angle.cos(), sin=angle.sin()), positions=pos)
    assert_close(by_freq, by_theta)
    assert_close(by_table, by_theta)


@pytest.mark.parametrize("dtype", DTYPES)
def test_query_projection_and_value_dim(dtype):
    # post-RoPE compressed keys: q' = RoPE(q) P_h with P_h [D, Dk]; values of another width
    q, k, v = make(2, 6, 2, 45, 64, dtype, dk=40, dv=24)
    proj = torch.randn(6, 64, 40) / 8
    check_cpu(q, k, v, torch.tensor([45, 12]), rope=Rope(), q_proj=proj)


def test_scale_and_softcap():
    q, k, v = make(2, 4, 2, 60, 64, torch.float32)
    q = q * 4  # large logits so the cap matters
    check_cpu(q, k, v, torch.tensor([60, 31]), scale=0.3, softcap=5.0)
    capped = run("reference", q, k, v, torch.tensor([60, 31]), softcap=5.0)
    uncapped = run("reference", q, k, v, torch.tensor([60, 31]))
    assert not torch.allclose(capped, uncapped)


@pytest.mark.parametrize("layout", ["sliced", "bshd"])
def test_strided_caches_and_queries(layout):
    q, k, v = make(3, 8, 4, 77, 64, torch.bfloat16, layout=layout)
    q = torch.randn(8, 3, 64).to(torch.bfloat16).transpose(0, 1)  # non-contiguous q as well
    check_cpu(q, k, v, torch.tensor([77, 5, 40]), rope=Rope())


def test_reference_matches_sdpa():
    """The reference itself against an independent formulation (SDPA over repeated KV heads)."""
    q, k, v = make(2, 8, 2, 30, 64, torch.float32)
    lens = torch.tensor([30, 11])
    out = run("reference", q, k, v, lens)
    for b in range(2):
        n = int(lens[b])
        kk = k[b, :, :n].repeat_interleave(4, 0)
        vv = v[b, :, :n].repeat_interleave(4, 0)
        ref = torch.nn.functional.scaled_dot_product_attention(q[b][:, None], kk, vv)[:, 0]
        assert_close(out[b], ref)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    b=st.integers(1, 3),
    hkv=st.integers(1, 3),
    group=st.integers(1, 9),
    d_half=st.integers(1, 68),
    s=st.integers(1, 300),
    dtype=st.sampled_from(DTYPES),
    style=st.sampled_from(["half", "interleaved"]),
    data=st.data(),
)
def test_property_against_reference(b, hkv, group, d_half, s, dtype, style, data):
    d = 2 * d_half
    lens = torch.tensor(data.draw(st.lists(st.integers(0, s), min_size=b, max_size=b)))
    rotary = data.draw(st.integers(1, d_half)) * 2
    q, k, v = make(b, hkv * group, hkv, s, d, dtype, seed=data.draw(st.integers(0, 2**16)))
    check_cpu(q, k, v, lens, rope=Rope(style=style, rotary_dim=rotary), isas=ISAS[:1])


def test_opcheck():
    q, k, v = make(2, 6, 2, 40, 64, torch.float32)
    lens = torch.tensor([40, 7], dtype=torch.int32)
    cos, sin = Rope().cos_sin(lens.long() - 1, 64)
    args = (q, k, v, lens, None, cos, sin, None, 0.125, 0.0, 0, 64)
    torch.library.opcheck(torch.ops.effkern.gqa_decode.default, args)
    starts = torch.tensor([3, 7], dtype=torch.int32)
    args = (q, k, v, lens, starts, None, None, None, 0.1, 2.0, 0, 0)
    torch.library.opcheck(torch.ops.effkern.gqa_decode.default, args)


def test_torch_compile_fullgraph():
    q, k, v = make(2, 6, 2, 40, 64, torch.float32)
    lens = torch.tensor([40, 7])

    def step(q, k, v, lens):
        return gqa_decode(q, k, v, lens, rope=Rope()) * 2

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    assert_close(compiled(q, k, v, lens), step(q, k, v, lens))


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: a.update(q=a["q"][0]), r"q must be 3-D \[B, Hq, D\]"),
        (lambda a: a.update(q=a["q"][:, :5]), "Hq=5 must be a multiple of .* Hkv=2"),
        (lambda a: a.update(seq_lens=torch.tensor([41, 3])), r"seq_lens must be within \[0, 40\]"),
        (lambda a: a.update(seq_lens=torch.tensor([-1, 3])), r"seq_lens must be within"),
        (lambda a: a.update(seq_lens=torch.tensor([1.0, 3.0])), "seq_lens must have dtype in"),
        (lambda a: a.update(seq_lens=torch.tensor([1, 2, 3])), "seq_lens .* size 2 in dim 0"),
        (lambda a: a.update(k_cache=a["k_cache"].half()), "k_cache must have the same dtype as q"),
        (lambda a: a.update(v_cache=a["v_cache"][:, :1]), r"v_cache \[B, Hkv, S_max, Dv\] must have size 2 in dim 1"),
        (lambda a: a.update(k_cache=a["k_cache"][..., :40]), "k_cache's head dim Dk=40 differs"),
        (lambda a: a.update(k_cache=a["k_cache"][..., ::2]), "k_cache must have a contiguous last dim"),
        (lambda a: a.update(q_proj=torch.randn(6, 64, 32)), r"q_proj \[Hq, D, Dk\] must have size 64 in dim 2"),
        (lambda a: a.update(q_proj=torch.randn(6, 64, 64).double()), "q_proj must have dtype in"),
        (lambda a: a.update(softcap=0.0), "softcap must be > 0"),
        (lambda a: a.update(rope=Rope(rotary_dim=3)), "rope.rotary_dim must be even"),
        (lambda a: a.update(positions=torch.tensor([-2, 0])), "positions must be within"),
        (lambda a: a.update(kv_start=torch.tensor([0, 4])), "kv_start must be <= seq_lens"),
        (lambda a: a.update(kv_start=torch.tensor([0, -1])), r"kv_start must be within \[0, 40\]"),
        (lambda a: a.update(kv_start=torch.tensor([0])), r"kv_start .* size 2 in dim 0"),
    ],
)
def test_bad_inputs_name_the_argument(change, match):
    q, k, v = make(2, 6, 2, 40, 64, torch.float32)
    args = dict(q=q, k_cache=k, v_cache=v, seq_lens=torch.tensor([40, 3]), rope=Rope())
    change(args)
    with pytest.raises((ValueError, TypeError), match=match):
        gqa_decode(**args)


def test_bad_rope_style():
    with pytest.raises(ValueError, match="rope.style must be one of"):
        Rope(style="neox")


def test_forcing_an_unavailable_backend_raises():
    q, k, v = make(1, 2, 1, 8, 64, torch.float32)
    with pytest.raises(BackendUnavailableError, match="EFFKERN_BACKEND=cuda cannot run: the cuda backend runs on CUDA"):
        run("cuda", q, k, v, torch.tensor([8]))
    with pytest.raises(BackendUnavailableError, match="not a backend"):
        run("fast", q, k, v, torch.tensor([8]))


def test_missing_extension_warns_once_and_falls_back(monkeypatch):
    from effkern.ops import _backend

    monkeypatch.setattr(_backend, "extension", lambda: None)
    _backend._warn_fallback.cache_clear()
    q, k, v = make(1, 2, 1, 8, 64, torch.float32)
    with pytest.warns(RuntimeWarning, match="effkern._C is not built .*pip install"):
        out = gqa_decode(q, k, v, torch.tensor([8]))
    assert_close(out, run("reference", q, k, v, torch.tensor([8])))
    with env(EFFKERN_BACKEND="cpu"), pytest.raises(BackendUnavailableError, match="effkern._C is not built"):
        gqa_decode(q, k, v, torch.tensor([8]))


def test_default_scale_is_query_head_dim():
    q, k, v = make(1, 2, 1, 10, 64, torch.float32, dk=32)
    proj = torch.randn(2, 64, 32)
    lens = torch.tensor([10])
    explicit = run("cpu", q, k, v, lens, q_proj=proj, scale=1 / math.sqrt(64))
    assert_close(run("cpu", q, k, v, lens, q_proj=proj), explicit)


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [1, 3, 4, 7, 16])
def test_gpu_backends(backend, dtype, group):
    q, k, v = (t.cuda() for t in make(3, 2 * group, 2, 1500, 128, dtype, layout="sliced"))
    lens = torch.tensor([0, 1, 1500], device="cuda")
    starts = torch.tensor([0, 1, 333], device="cuda")
    proj = torch.randn(2 * group, 128, 128, device="cuda") / 11
    for kwargs in (dict(rope=Rope()), dict(rope=Rope(style="interleaved", rotary_dim=64), q_proj=proj, softcap=30.0),
                   dict(rope=Rope(), kv_start=starts)):
        expected = run("reference", q, k, v, lens, **kwargs)
        assert_close(run(backend, q, k, v, lens, **kwargs), expected)
