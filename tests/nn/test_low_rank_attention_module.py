"""effkern.nn.LowRankAttention: shapes, the K-network layout, init and training signal."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, requires_ext

from effkern.nn import LowRankAttention

pytestmark = requires_ext


def test_k_networks_equal_k_separate_modules():
    torch.manual_seed(0)
    stacked = LowRankAttention(24, 8, heads=2, num_networks=3, zero_init_out=False)
    x = torch.randn(2, 11, 24)
    y = stacked(x)
    assert y.shape == (3, 2, 11, 24)
    for k in range(3):
        single = LowRankAttention(24, 8, heads=2)
        with torch.no_grad():
            single.w_qkv.copy_(stacked.w_qkv[k : k + 1])
            single.w_o.copy_(stacked.w_o[k : k + 1])
        assert single(x).shape == (2, 11, 24)
        assert_close(single(x), y[k])


def test_zero_init_out_starts_at_zero_and_still_learns():
    layer = LowRankAttention(16, 4)
    x = torch.randn(3, 7, 16)
    assert torch.equal(layer(x), torch.zeros(3, 7, 16))
    layer(x).sum().backward()  # zero Wo: only Wo gets a gradient at the first step, and it is non-zero
    assert layer.w_o.grad.abs().sum() > 0


def test_bad_configuration():
    with pytest.raises(ValueError, match="rank % heads == 0"):
        LowRankAttention(16, 6, heads=4)
