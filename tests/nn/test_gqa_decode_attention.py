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
