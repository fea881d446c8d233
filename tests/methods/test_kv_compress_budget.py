"""KV-budget mode on a small random Llama: per-layer sensitivity and compressing the least sensitive layers."""

from __future__ import annotations

import pytest
import torch

from effkern.methods.kv_compress.budget import compress_by_budget, layer_sensitivity
from effkern.methods.kv_compress.calibrate import collect_stats
from effkern.methods.kv_compress.flow import kv_bytes_per_token
from effkern.methods.kv_compress.model import tiny_llama


def test_budget_compresses_the_least_sensitive_layers():
    model = tiny_llama(layers=3, init_std=0.3)
    blocks = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    stats = collect_stats(model, blocks, progress=False)
    kwargs = dict(target_kv_heads=1, method="ours", key_strategy="rope_commuting")
    sens = layer_sensitivity(model, stats, blocks, progress=False, **kwargs)
    assert len(sens) == 3 and all(s > 0 for s in sens)
    assert all(abs(s - 1.0) > 1e-4 for s in sens)  # 2 -> 1 KV heads changes every layer's output
    full_bytes = kv_bytes_per_token(model)
    layers = compress_by_budget(model, sens, 1, stats=stats, **kwargs)
    assert layers == [min(range(3), key=sens.__getitem__)]
    kv_heads = [a.self_attn.k_proj.weight.shape[0] // 16 for a in model.model.layers]
    assert kv_heads == [1 if i in layers else 2 for i in range(3)]
    assert kv_bytes_per_token(model) == full_bytes - full_bytes // 3 // 2
    model(torch.randint(0, 256, (2, 10)))  # mixed per-layer KV heads still run
    with pytest.raises(ValueError, match="n_layers must be in"):
        compress_by_budget(model, sens, 4, stats=stats, **kwargs)
