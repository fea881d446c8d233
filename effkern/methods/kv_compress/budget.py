"""KV-budget mode: compress only the layers whose compression hurts least.

Each layer's sensitivity is the perplexity ratio (compressed / original) on calibration-source blocks when that
layer alone is converted. A budget of n layers then converts the n least sensitive ones. Errors compound across
layers (PAPERS.md D found single-layer costs from +0.5% to +12%), so the curve is measured, not predicted.
"""

from __future__ import annotations

import copy

import torch
from tqdm.auto import tqdm

from effkern.methods.kv_compress.attention import use_effkern_attention
from effkern.methods.kv_compress.calibrate import KVStats, _attention_layers
from effkern.methods.kv_compress.convert import compress_kv_heads
from effkern.methods.kv_compress.evaluate import perplexity


def layer_sensitivity(model, stats: KVStats | None, blocks: torch.Tensor, *, target_kv_heads: int, method: str,
                      key_strategy: str, batch_size: int = 4, progress: bool = True) -> list[float]:
    """Perplexity ratio on ``blocks`` when only layer i of ``model`` is compressed, for every layer i."""
    base = perplexity(model, blocks, batch_size, progress=False)
    ratios = []
    for i in tqdm(range(len(_attention_layers(model))), desc="layer sensitivity", disable=not progress):
        one = copy.deepcopy(model)
        compress_kv_heads(one, target_kv_heads, method=method, key_strategy=key_strategy, stats=stats, layers=[i])
        use_effkern_attention(one)
        ratios.append(perplexity(one, blocks, batch_size, progress=False) / base)
    return ratios


def compress_by_budget(model, sensitivity: list[float], n_layers: int, **compress_kwargs) -> list[int]:
    """Compress the ``n_layers`` least sensitive layers of ``model`` in place; returns their indices."""
    if not 0 <= n_layers <= len(sensitivity):
        raise ValueError(f"n_layers must be in [0, {len(sensitivity)}], got {n_layers}")
    layers = sorted(sorted(range(len(sensitivity)), key=sensitivity.__getitem__)[:n_layers])
    if layers:
        compress_kv_heads(model, layers=layers, **compress_kwargs)
    use_effkern_attention(model)
    return layers
