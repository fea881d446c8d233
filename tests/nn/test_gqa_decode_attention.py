"""GQADecodeAttention: token-by-token decoding equals causal attention over the whole sequence."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close

from effkern.nn import GQADecodeAttention
from effkern.ops import Rope
from effkern.ops.rope import STYLES, apply_rope


def causal_attention(q, k, v, rope):
    """Independent formulation: rotate every position, SDPA with a causal mask over repeated KV heads.
    q [B, Hq, T, D], k [B, Hkv, T, D], v [B, Hkv, T, Dv] -> [B, Hq, T, Dv]."""
    t, d = q.shape[2], q.shape[3]
    cos, sin = rope.cos_sin(torch.arange(t), d)
    q, k = (apply_rope(x, cos, sin, STYLES[rope.style], rope.dim(d)) for x in (q, k))
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.float().repeat_interleave(g, 1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_steps_match_causal_attention(dtype):
    torch.manual_seed(0)
    b, hq, hkv, d, t0, steps = 2, 6, 2, 64, 5, 4
    rope = Rope(theta=1e4)
    q = torch.randn(b, hq, t0 + steps, d).to(dtype)
    k = torch.randn(b, hkv, t0 + steps, d).to(dtype)
    v = torch.randn(b, hkv, t0 + steps, d).to(dtype)
    full = causal_attention(q.float(), k.float(), v.float(), rope)
    layer = GQADecodeAttention(hq, hkv, d, max_seq_len=16, max_batch=b, rope=rope, dtype=dtype)
    layer.prefill(k[:, :, :t0], v[:, :, :t0])
    for i in range(t0, t0 + steps):
        out = layer(q[:, :, i], k[:, :, i], v[:, :, i])
        assert_close(out, full[:, :, i].to(dtype))
    assert layer.lengths.tolist() == [t0 + steps] * b


def test_post_rope_projection_at_full_rank_is_exact():
    """Post-RoPE compression with an orthogonal basis of full rank loses nothing: the cache holds
    RoPE(k_group) Psi and each query head attends through its block of Psi."""
    torch.manual_seed(1)
    b, hq, hk, d, t = 1, 4, 2, 32, 7
    rope = Rope(theta=100.0)
    psi = torch.linalg.qr(torch.randn(hk * d, hk * d))[0]  # one group of both key heads, Dk = 2 * D
    q_proj = torch.stack([psi[(h // (hq // hk)) * d : (h // (hq // hk) + 1) * d] for h in range(hq)])
    layer = GQADecodeAttention(hq, 1, d, max_seq_len=t, rope=rope, q_proj=q_proj, k_proj=psi[None])
    q, k, v = torch.randn(b, hq, t, d), torch.randn(b, hk, t, d), torch.randn(b, 1, t, d)
    # the uncompressed model: 2 KV heads; both happen to share the single value head here
    full = causal_attention(q, k, v.expand(b, hk, t, d), rope)
    layer.prefill(k[:, :, :3], v[:, :, :3])
    for i in range(3, t):
        assert_close(layer(q[:, :, i], k[:, :, i], v[:, :, i]), full[:, :, i])


def test_full_cache_and_mismatched_projections_raise():
    layer = GQADecodeAttention(2, 1, 8, max_seq_len=1)
    layer(torch.randn(1, 2, 8), torch.randn(1, 1, 8), torch.randn(1, 1, 8))
    with pytest.raises(RuntimeError, match="KV cache is full"):
        layer(torch.randn(1, 2, 8), torch.randn(1, 1, 8), torch.randn(1, 1, 8))
    layer.reset()
    assert int(layer.lengths[0]) == 0
    with pytest.raises(ValueError, match="q_proj and k_proj must be given together"):
        GQADecodeAttention(2, 1, 8, 4, q_proj=torch.randn(2, 8, 4))
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        GQADecodeAttention(3, 2, 8, 4)


def small_layer(**kwargs):
    """Hq 4, Hkv 2, D 16, S_max 8, 2 sequences, RoPE and post-RoPE projections (Dk 24) unless overridden."""
    torch.manual_seed(2)
    proj = dict(q_proj=torch.randn(4, 16, 24) / 4, k_proj=torch.randn(2, 16, 24) / 4)
    return GQADecodeAttention(4, 2, 16, 8, max_batch=2, rope=Rope(theta=1e4), **{**proj, **kwargs})


def test_prefill_rejects_lengths_past_the_prompt_and_bad_shapes():
    """A length past T would attend to rows a previous sequence left in the cache."""
    layer = small_layer()
    k, v = torch.randn(2, 2, 3, 16), torch.randn(2, 2, 3, 16)
    for lengths in ([4, 1], [-1, 2]):
        with pytest.raises(ValueError, match=r"lengths must be within \[0, 3\]"):
            layer.prefill(k, v, torch.tensor(lengths))
    with pytest.raises(TypeError, match="lengths must have dtype"):
        layer.prefill(k, v, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"lengths \[B\] must have size 2"):
        layer.prefill(k, v, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"k \[B, Hk, T, D\] must have size 2 in dim 1"):
        layer.prefill(torch.randn(2, 4, 3, 16), v)  # Hk: k_proj groups one key head per KV head
    with pytest.raises(ValueError, match=r"k \[B, Hk, T, D\] must have size 16 in dim 3"):
        layer.prefill(torch.randn(2, 2, 3, 8), v)
    with pytest.raises(ValueError, match=r"v \[B, Hkv, T, Dv\] must have size 3 in dim 2"):
        layer.prefill(k, v[:, :, :2])
    with pytest.raises(ValueError, match=r"v \[B, Hkv, T, Dv\] must have size 16 in dim 3"):
        layer.prefill(k, v[..., :8])
    layer.prefill(k, v, torch.tensor([3, 0], dtype=torch.int32))
    assert layer.lengths.tolist() == [3, 0]
    with pytest.raises(ValueError, match=r"k_proj \[Hkv, g\*D, Dk\] must have size 24 in dim 2"):
        GQADecodeAttention(4, 2, 16, 8, q_proj=torch.randn(4, 16, 24), k_proj=torch.randn(2, 16, 8))


def decode(layer, steps, dtype, seed=3):
    """Prefill 2 ragged prompts, then ``steps`` decode steps; returns the outputs ``[steps, B, Hq, Dv]``."""
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(2, 2, 4, 16, generator=g), torch.randn(2, 2, 4, 16, generator=g)
    layer.prefill(k.to(dtype), v.to(dtype), torch.tensor([4, 2]))
    out = []
    for _ in range(steps):
        q, k, v = (torch.randn(2, h, 16, generator=g).to(dtype) for h in (4, 2, 2))
        out.append(layer(q, k, v))
    return torch.stack(out)


@pytest.mark.parametrize("cast", ["to_bfloat16", "half"])
def test_low_precision_module_keeps_float32_projections(cast):
    """.to(torch.bfloat16) / .half() casts the cache; the projections stay the float32 weights, unrounded."""
    ref = small_layer()
    layer = small_layer()
    layer = layer.to(torch.bfloat16) if cast == "to_bfloat16" else layer.half()
    dtype = layer.k_cache.dtype
    assert dtype == (torch.bfloat16 if cast == "to_bfloat16" else torch.float16) and layer.v_cache.dtype == dtype
    for name in ("q_proj", "k_proj"):
        assert getattr(layer, name).dtype == torch.float32
        assert torch.equal(getattr(layer, name), getattr(ref, name))
    assert_close(decode(layer, 3, dtype), decode(ref, 3, torch.float32).to(dtype))
    layer.float()
    assert layer.k_cache.dtype == torch.float32 and torch.equal(layer.q_proj, ref.q_proj)


def test_state_dict_holds_the_weights_not_the_cache():
    layer = small_layer()
    decode(layer, 1, torch.float32)
    state = layer.state_dict()
    assert set(state) == {"q_proj", "k_proj"}
    assert set(GQADecodeAttention(2, 1, 8, 4).state_dict()) == set()
    other = small_layer(q_proj=torch.zeros(4, 16, 24), k_proj=torch.zeros(2, 16, 24))
    other.load_state_dict(state)
    assert torch.equal(other.q_proj, layer.q_proj) and torch.equal(other.k_proj, layer.k_proj)
    assert other.lengths.tolist() == [0, 0]  # the cache is runtime state: loading weights leaves it alone
    assert_close(decode(other, 2, torch.float32), decode(layer, 2, torch.float32))


def test_decode_step_compiles_with_fullgraph():
    """The eager full-cache check reads the lengths on the host; compiled, it is left to kv_append's launcher."""
    layer, ref = small_layer(), small_layer()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.manual_seed(4)
    k, v = torch.randn(2, 2, 4, 16), torch.randn(2, 2, 4, 16)
    layer.prefill(k, v, torch.tensor([4, 2]))
    ref.prefill(k, v, torch.tensor([4, 2]))
    for _ in range(3):
        q, k, v = torch.randn(2, 4, 16), torch.randn(2, 2, 16), torch.randn(2, 2, 16)
        assert_close(compiled(q, k, v), ref(q, k, v))
    assert layer.lengths.tolist() == ref.lengths.tolist() == [7, 5]
