"""Perplexity of a causal LM on independent token blocks (the KV-head compression flow's quality measure)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


def perplexity(model: torch.nn.Module, blocks: torch.LongTensor, batch_size: int = 4, progress: bool = True) -> float:
    """``exp`` of the mean next-token negative log-likelihood over all blocks, with teacher forcing.

    Args:
        model: a Hugging Face causal LM (``model(input_ids=...).logits``: ``[B, L, V]``).
        blocks: ``[n, L]`` token ids, ``L >= 2``. Each block is scored on its own from position 0 (no context
            carried over): token ``t + 1`` is predicted from tokens ``0..t``, so a block contributes ``L - 1``
            predictions.
        batch_size: blocks per forward pass.
        progress: show a tqdm bar over batches.

    Returns:
        The perplexity over all ``n * (L - 1)`` predictions. The model's train/eval mode is restored afterwards.
    """
    if blocks.ndim != 2 or blocks.shape[1] < 2 or blocks.shape[0] == 0:
        raise ValueError(f"blocks must be [n >= 1, L >= 2] token ids, got shape {tuple(blocks.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_nll = 0.0  # summed in float64 on the host: tens of thousands of terms
    try:
        with torch.inference_mode():
            for start in tqdm(range(0, len(blocks), batch_size), desc="perplexity", disable=not progress):
                batch = blocks[start : start + batch_size].to(device)
                logits = model(input_ids=batch, use_cache=False).logits[:, :-1]
                # float32 log-softmax even for half-precision models: rounding the logits would bias the NLL.
                nll = F.cross_entropy(
                    logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
                )
                total_nll += nll.item()
    finally:
        model.train(was_training)
    return math.exp(total_nll / (blocks.shape[0] * (blocks.shape[1] - 1)))


def decode_tokens_per_s(model: torch.nn.Module, *, batch: int, context: int, steps: int = 8, warmup: int = 2,
                        seed: int = 0) -> float:
    """Decode throughput (new tokens per second over the batch) at ``context`` cached tokens per sequence.

    The model's ``StaticCache`` (in-place writes, so no per-step copy of the cache is timed) is filled with
    ``context`` random keys and values per layer (what a prefill would leave; speed does not depend on their
    values, and skipping the prefill keeps this cheap), then ``warmup`` untimed and ``steps`` timed decode steps
    run, one new token per sequence each, with the model's own attention implementation. Layers may have
    different KV head counts (KV-budget models).
    """
    if min(batch, context, steps) < 1 or warmup < 0:
        raise ValueError(f"batch, context and steps must be >= 1 and warmup >= 0, got {batch}, {context}, "
                         f"{steps}, {warmup}")
    import time

    from transformers import StaticCache

    param = next(model.parameters())
    cache = StaticCache(config=model.config, max_cache_len=context + warmup + steps)
    g = torch.Generator().manual_seed(seed)
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        kv_heads = attn.v_proj.weight.shape[0] // attn.head_dim
        shape = (batch, kv_heads, context, attn.head_dim)
        keys, values = (torch.randn(shape, generator=g).to(param) for _ in range(2))
        cache.update(keys, values, i)
    tokens = torch.randint(0, model.config.vocab_size, (batch, warmup + steps), generator=g).to(param.device)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for i in range(warmup + steps):
                if i == warmup:
                    start = time.perf_counter()
                pos = context + i
                model(input_ids=tokens[:, i : i + 1], attention_mask=torch.ones(batch, pos + 1, dtype=torch.long),
                      position_ids=torch.full((batch, 1), pos), cache=cache, use_cache=True)
            if param.device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
    finally:
        model.train(was_training)
    return batch * steps / elapsed
