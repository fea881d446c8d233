"""Triton kernels (triton_kernels/) against the PyTorch references, run by the Triton interpreter on CPU tensors.

Shapes are small (the interpreter's cost grows with programs x loop iterations) but awkward: GQA groups
1..16, head dims that are not powers of two, ragged lengths including 0 and 1, strided caches, forced splits.
bf16 tl.dot is broken in the interpreter, so there the decode kernel widens bf16 tiles to fp32: its bf16
tensor-core path (like every GPU-only detail) is covered by test_triton_compile.py's compile check only.
Out-of-range indices, NaN / Inf and cancelling rows: test_triton_hard_inputs.py.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton import

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import assert_close, assert_close_scaled, strided_cache  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from effkern.ops.gqa_decode import reference as gqa_decode_reference  # noqa: E402
from effkern.ops.kv_append import reference as kv_append_reference  # noqa: E402
from effkern.ops.low_rank_attention import bwd_reference as low_rank_attention_bwd_reference  # noqa: E402
from effkern.ops.low_rank_attention import reference as low_rank_attention_reference  # noqa: E402
from effkern.ops.rope import STYLES, Rope  # noqa: E402

pytest.importorskip("triton")

from effkern.triton_kernels import gqa_decode as gqa  # noqa: E402
from effkern.triton_kernels import kv_append as kv  # noqa: E402
from effkern.triton_kernels import low_rank_attention as lra  # noqa: E402


def error_word() -> torch.Tensor:
    """A fresh int32 [1] error word (the ops pass effkern.ops._device_errors.error_word's)."""
    return torch.zeros(1, dtype=torch.int32)


def make_cache(b: int, h: int, s: int, d: int, dtype: torch.dtype, layout: str) -> torch.Tensor:
    """helpers.strided_cache's layouts plus "padded": a window of a bigger [B, H+1, S+5, D+8] buffer, so every
    stride differs from the contiguous one (and the key stride D+8 need not be a multiple of 16)."""
    if layout == "padded":
        return torch.randn(b, h + 1, s + 5, d + 8).to(dtype)[:, 1:, 2 : s + 2, :d]
    return strided_cache(b, h, s, d, dtype, layout)


def rope_tables(style: str | None, rotary_dim: int | None, d: int, positions: torch.Tensor):
    """(cos, sin, style id, R) as the op entry points pass them; no RoPE for style None."""
    if style is None:
        return None, None, 0, 0
    rope = Rope(style=style, rotary_dim=rotary_dim)
    cos, sin = rope.cos_sin(positions, d)
    return cos, sin, STYLES[style], rope.dim(d)


def run_decode(lens, group, d, dtype=torch.float32, *, hkv=1, dk=None, dv=None, style="half", rotary_dim=None,
               proj=False, softcap=0.0, scale=None, layout="contiguous", s_max=None, num_splits=None, starts=None,
               seed=0):
    """Build one gqa_decode case, run kernel and reference, compare; returns the kernel output."""
    torch.manual_seed(seed)
    b, hq = len(lens), group * hkv
    dk = dk or d
    dv = dv or dk
    s_max = s_max or max(max(lens), 1)
    q = torch.randn(b, hq, d).to(dtype)
    k_cache = make_cache(b, hkv, s_max, dk, dtype, layout)
    v_cache = make_cache(b, hkv, s_max, dv, dtype, layout)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    cos, sin, style_id, r = rope_tables(style, rotary_dim, d, torch.randint(0, 4096, (b,)))
    q_proj = torch.randn(hq, d, dk) / d**0.5 if proj else None
    kv_start = None if starts is None else torch.tensor(starts, dtype=torch.int32)
    args = (q, k_cache, v_cache, seq_lens, kv_start, cos, sin, q_proj, scale or d**-0.5, softcap, style_id, r)
    err = error_word()
    out = gqa.gqa_decode_triton(*args, err, num_splits=num_splits)
    assert out.is_contiguous() and out.shape == (b, hq, dv) and out.dtype == dtype
    assert err.item() == 0  # valid lengths record nothing
    assert_close(out, gqa_decode_reference(*args))
    return out


LENS = [0, 1, 37, 300]  # empty, single key, ragged, several tiles; none a multiple of a block


@pytest.mark.parametrize("group", [1, 2, 3, 5, 6, 7, 8, 16])
def test_decode_group_sizes(group):
    run_decode(LENS, group, 64, hkv=2 if group <= 3 else 1)


@pytest.mark.parametrize("d", [64, 72, 80, 96, 128])
def test_decode_head_dims_fp16_split(d):
    # interleaved RoPE on the first half of the head only; three splits per head
    run_decode(LENS, 4, d, torch.float16, style="interleaved", rotary_dim=(d // 2) & ~1, num_splits=3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_splits", [1, 4, 7])
def test_decode_dtypes_and_splits(dtype, num_splits):
    run_decode([300, 0, 37, 1], 5, 96, dtype, num_splits=num_splits, s_max=333)


@pytest.mark.parametrize("style", [None, "half", "interleaved"])
@pytest.mark.parametrize("softcap", [0.0, 4.0])
def test_decode_projection_rope_softcap(style, softcap):
    # q_proj with Dk != D and Dv != Dk; a large scale so the softcap actually bends the logits
    run_decode([1, 37, 129], 3, 96, dk=48, dv=80, style=style, rotary_dim=32, proj=True, softcap=softcap,
               scale=0.5 if softcap else None, num_splits=2)


@pytest.mark.parametrize("layout", ["sliced", "padded", "bshd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_strided_caches(layout, dtype):
    run_decode([5, 0, 200], 2, 80, dtype, hkv=2, layout=layout, num_splits=2, s_max=257)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_kv_start(dtype, num_splits):
    # left padding: [start, len) valid; a start inside a tile, one at len (empty), one past a whole split
    run_decode([300, 37, 200, 64], 3, 64, dtype, hkv=2, num_splits=num_splits, starts=[17, 37, 150, 0], s_max=301)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_empty_contexts_give_zeros(num_splits):
    out = run_decode([0, 0], 2, 64, torch.float16, num_splits=num_splits, s_max=40)
    assert torch.equal(out, torch.zeros_like(out))


def test_decode_softcap_bounds_logits():
    """Huge logits (|s| ~ 1e6 x softcap) must saturate tanh without overflow: all capped logits are within
    +-1e-4, so the output is the plain mean of the values."""
    torch.manual_seed(1)
    q = torch.randn(1, 2, 64) * 10
    k_cache = torch.randn(1, 1, 50, 64)
    v_cache = torch.randn(1, 1, 50, 64)
    seq_lens = torch.tensor([50], dtype=torch.int32)
    out = gqa.gqa_decode_triton(q, k_cache, v_cache, seq_lens, None, None, None, None, 1.0, 1e-4, 0, 0, error_word())
    torch.testing.assert_close(out, v_cache.mean(dim=2).expand(1, 2, 64), atol=1e-3, rtol=0)


DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])
LAYOUTS = st.sampled_from(["contiguous", "sliced", "padded", "bshd"])
STYLES_OR_NONE = st.sampled_from([None, "half", "interleaved"])


@settings(max_examples=25, deadline=None, derandomize=True)
@given(group=st.sampled_from([1, 2, 3, 4, 5, 6, 7, 8, 16]), hkv=st.integers(1, 2),
       d=st.sampled_from([16, 48, 64, 72, 96]), lens=st.lists(st.integers(0, 200), min_size=1, max_size=3),
       dtype=DTYPES, style=STYLES_OR_NONE, num_splits=st.integers(1, 5), layout=LAYOUTS,
       softcap=st.sampled_from([0.0, 3.0]))
def test_decode_property(group, hkv, d, lens, dtype, style, num_splits, layout, softcap):
    run_decode(lens, group, d, dtype, hkv=hkv, style=style, num_splits=num_splits, layout=layout, softcap=softcap,
               s_max=max(lens) + 3)


def test_split_rule():
    cpu = torch.device("cpu")  # 132 SMs assumed without a GPU
    assert gqa._num_splits(1, 4096, cpu) == 4096 // gqa.MIN_KEYS_PER_SPLIT  # capped by keys per split
    assert gqa._num_splits(8, 1 << 15, cpu) == gqa.MAX_SPLITS  # 264 / 8 = 33 wanted
    assert gqa._num_splits(66, 1 << 15, cpu) == 4  # 2 programs per SM
    assert gqa._num_splits(1024, 1 << 15, cpu) == 1  # the batch alone fills the GPU
    assert gqa._num_splits(1, 100, cpu) == 1


def run_append(slots, hkv, d, dtype=torch.float32, *, group=1, dk=None, dv=None, style="half", rotary_dim=None,
               proj=False, layout="contiguous", s_max=16, seed=0):
    """Build one kv_append case, apply kernel and reference to clones of the same caches, compare them whole
    (so writes to a wrong slot, head or dim also fail)."""
    torch.manual_seed(seed)
    b = len(slots)
    dk = dk or d
    dv = dv or dk
    k_cache = make_cache(b, hkv, s_max, dk, dtype, layout)
    v_cache = make_cache(b, hkv, s_max, dv, dtype, layout)
    k = torch.randn(b, hkv * group, d).to(dtype)
    v = torch.randn(b, hkv, dv).to(dtype)
    cos, sin, style_id, r = rope_tables(style, rotary_dim, d, torch.randint(0, 4096, (b,)))
    k_proj = torch.randn(hkv, group * d, dk) / (group * d) ** 0.5 if proj else None
    slots_t = torch.tensor(slots, dtype=torch.int32)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    err = error_word()
    kv.kv_append_triton(k_cache, v_cache, k, v, slots_t, cos, sin, k_proj, style_id, r, err)
    assert err.item() == 0
    kv_append_reference(k_ref, v_ref, k, v, slots_t, cos, sin, k_proj, style_id, r)
    assert_close(k_cache, k_ref)
    assert torch.equal(v_cache, v_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("style,rotary_dim", [(None, None), ("half", None), ("interleaved", None), ("half", 24)])
def test_append_rope(dtype, style, rotary_dim):
    run_append([0, 15, 7], 2, 80, dtype, style=style, rotary_dim=rotary_dim)


@pytest.mark.parametrize("group", [1, 2, 3])
@pytest.mark.parametrize("style", ["half", "interleaved"])
def test_append_projection(group, style):
    # Dk != D and Dv != Dk; partial rotary dim
    run_append([3, 0], 2, 64, group=group, dk=48, dv=40, style=style, rotary_dim=32, proj=True)


@pytest.mark.parametrize("layout", ["sliced", "padded", "bshd"])
def test_append_strided_caches(layout):
    run_append([9, 2], 2, 96, torch.float16, layout=layout, s_max=12)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(b=st.integers(1, 3), hkv=st.integers(1, 3), group=st.integers(1, 3), d=st.sampled_from([16, 40, 64, 80]),
       dtype=DTYPES, style=STYLES_OR_NONE, layout=LAYOUTS, proj=st.booleans(), data=st.data())
def test_append_property(b, hkv, group, d, dtype, style, layout, proj, data):
    slots = data.draw(st.lists(st.integers(0, 9), min_size=b, max_size=b))
    run_append(slots, hkv, d, dtype, group=group if proj else 1, dk=48 if proj else None, style=style,
               rotary_dim=data.draw(st.sampled_from(range(2, d + 1, 2))) if style else None, proj=proj, layout=layout,
               s_max=10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kk, b, n, heads, dh", [(1, 2, 37, 1, 7), (3, 1, 70, 2, 16), (2, 2, 1, 3, 4)])
def test_low_rank_attention_core_fwd_bwd(kk, b, n, heads, dh, dtype):
    """Forward (out, lse) and backward (dqkv) against the references, on a strided qkv view (shared-x layout)."""
    g = torch.Generator().manual_seed(0)
    r = heads * dh
    qkv = torch.randn(b, n, kk, 3 * r, generator=g).to(dtype).permute(2, 0, 1, 3)  # as the op builds it
    out, lse = lra.low_rank_attention_fwd_triton(qkv, heads, 0.4)
    ref_out, ref_lse = low_rank_attention_reference(qkv, heads, 0.4)
    assert_close(out, ref_out)
    assert_close(lse, ref_lse, dtype=dtype)
    dout = torch.randn(out.shape, generator=g).to(dtype)
    dqkv = lra.low_rank_attention_bwd_triton(qkv, ref_out, ref_lse, dout, heads, 0.4)
    expected = low_rank_attention_bwd_reference(qkv, ref_out, ref_lse, dout, heads, 0.4)
    assert dqkv.shape == expected.shape and dqkv.is_contiguous()
    assert_close_scaled(dqkv, expected)
