"""LowRankLinear and LowRankEmbedding: what the modules compute, built from factors, and their argument checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, requires_ext

from effkern.nn import LowRankEmbedding, LowRankLinear

pytestmark = requires_ext


def test_low_rank_linear_from_an_exact_factorisation_is_the_linear():
    torch.manual_seed(0)
    linear = torch.nn.Linear(12, 8)
    q, r = torch.linalg.qr(linear.weight.detach().t())  # W^T = Q R: W = R^T Q^T, rank 8
    layer = LowRankLinear.from_factors(q.t().contiguous(), r.t().contiguous(), torch.zeros(8), linear.bias.detach())
    x = torch.randn(5, 3, 12)
    assert_close(layer(x), linear(x))
    assert layer.u.shape == (8, 12) and layer.v.shape == (8, 8)


def test_low_rank_linear_activation_and_training():
    torch.manual_seed(0)
    layer = LowRankLinear(10, 6, rank=3, activation="relu")
    x = torch.randn(7, 10)
    assert_close(layer(x), F.linear(F.relu(F.linear(x, layer.u, layer.b1)), layer.v, layer.b2))
    layer(x).sum().backward()
    assert all(p.grad is not None for p in layer.parameters())
    assert "rank=3, activation=relu, out_activation=none" in repr(layer)
    fused = LowRankLinear.from_factors(layer.u, layer.v, layer.b1, layer.b2, out_activation="relu")
    assert_close(fused(x), F.relu(F.linear(F.linear(x, layer.u, layer.b1), layer.v, layer.b2)))


def test_low_rank_embedding_reconstructs_and_compresses():
    torch.manual_seed(0)
    emb = LowRankEmbedding([5, 3], dim=6, rank=2, mode="mean")
    with torch.no_grad():
        emb.u.normal_(), emb.mu.normal_()
    ids = torch.tensor([[[4, -1], [0, 2]], [[-1, -1], [1, 1]]])
    rows = emb.table[torch.tensor([[[4, 0], [5, 7]], [[0, 0], [6, 6]]])] * (ids >= 0)[..., None]
    n = (ids >= 0).sum(-1, keepdim=True)
    compressed = rows.sum(2) / n.clamp_min(1)
    assert_close(emb.compressed(ids), compressed)
    expected = torch.einsum("fdk,bfk->bfd", emb.u, compressed) + (n > 0) * emb.mu
    assert_close(emb(ids), expected)
    assert emb(ids[..., 0].clamp_min(0)).shape == (2, 2, 6)


def test_bad_arguments():
    with pytest.raises(ValueError, match="activation must be one of"):
        LowRankLinear(4, 4, 2, activation="tanh")
    with pytest.raises(ValueError, match="out_activation must be one of"):
        LowRankLinear(4, 4, 2, out_activation="gelu")
    with pytest.raises(ValueError, match="rank must be >= 1"):
        LowRankLinear(4, 4, 0)
    with pytest.raises(ValueError, match="give both biases"):
        LowRankLinear.from_factors(torch.zeros(2, 4), torch.zeros(4, 2), b1=torch.zeros(2))
    with pytest.raises(ValueError, match="vocab_sizes must be positive"):
        LowRankEmbedding([5, 0], dim=4, rank=2)
    with pytest.raises(ValueError, match="mode must be one of"):
        LowRankEmbedding([5, 3], dim=4, rank=2, mode="max")
    emb = LowRankEmbedding([5, 3], dim=4, rank=2)
    with pytest.raises(ValueError, match=r"ids\[0, 1, 0\] = 3 is outside field 1's ids \[0, 3\)"):
        emb.compressed(torch.tensor([[0, 3]]))
