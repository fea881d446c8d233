"""effkern attention in transformers' generate(): decode steps through gqa_decode, padded batches, caches."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import requires_ext

from effkern.methods.kv_compress import attention
from effkern.methods.kv_compress.attention import ProjectedKeyCache, use_effkern_attention
from effkern.methods.kv_compress.calibrate import collect_stats
from effkern.methods.kv_compress.convert import compress_kv_heads
from effkern.methods.kv_compress.model import tiny_llama

pytestmark = requires_ext

PAD = 0


def padded_batch(lengths=(9, 3, 6), vocab=256, seed=0):
    """Left-padded prompts of different lengths (as generate() expects for decoder-only models)."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, width - n :] = torch.randint(1, vocab, (n,), generator=g)
        mask[i, width - n :] = 1
    return ids, mask


@pytest.fixture
def decode_calls(monkeypatch):
    """Counts gqa_decode calls made by the attention function."""
    calls = []

    def counting(*args, **kwargs):
        calls.append(kwargs.get("kv_start"))
        return original(*args, **kwargs)

    original = attention.gqa_decode
    monkeypatch.setattr(attention, "gqa_decode", counting)
    return calls


def generate(model, ids, mask, **kwargs):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                          pad_token_id=PAD, **kwargs)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_generate_equals_sdpa_with_padded_batches(cache, decode_calls):
    """Same tokens as transformers' SDPA on the uncompressed model; the decode steps went through gqa_decode
    with the left padding as kv_start."""
    sdpa = tiny_llama(num_heads=6, num_kv_heads=2, hidden=96, init_std=0.2)
    ours = copy.deepcopy(sdpa)
    use_effkern_attention(ours)
    ids, mask = padded_batch()
    kwargs = dict(cache_implementation="static") if cache == "static" else {}
    expected = generate(sdpa, ids, mask, **kwargs)
    got = generate(ours, ids, mask, **kwargs)
    assert torch.equal(got, expected)
    layers = sdpa.config.num_hidden_layers
    assert len(decode_calls) == 11 * layers  # every step after the prefill, every layer
    assert decode_calls[0].tolist() == [0, 6, 3]  # the left padding of each prompt


def test_decode_in_bf16_is_as_accurate_as_sdpa():
    """A bf16 decode step: effkern's logits are as close to the fp32 model's as SDPA's bf16 logits are."""
    reference = tiny_llama(num_heads=4, num_kv_heads=1, init_std=0.2)
    sdpa = copy.deepcopy(reference).to(torch.bfloat16)
    ours = copy.deepcopy(sdpa)
    use_effkern_attention(ours)
    ids, mask = padded_batch((5, 8))
    step_mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
    logits = {}
    for name, m in (("fp32", reference), ("sdpa", sdpa), ("ours", ours)):
        with torch.no_grad():
            cache = m(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values
            logits[name] = m(input_ids=torch.tensor([[7], [9]]), attention_mask=step_mask, cache=cache).logits.float()
    err_ours = (logits["ours"] - logits["fp32"]).abs().max()
    err_sdpa = (logits["sdpa"] - logits["fp32"]).abs().max()
    assert err_ours <= 1.5 * err_sdpa + 1e-3, (err_ours, err_sdpa)


def test_post_rope_generate_with_projected_cache():
    """A post-RoPE model decodes the same tokens whether the cache holds projected keys (compressed size) or the
    full rotated keys, and the projected cache really stores Hkv heads of Dk dims."""
    model = tiny_llama(num_heads=4, num_kv_heads=2, init_std=0.2)
    stats = collect_stats(model, torch.randint(1, 256, (8, 32)), progress=False)
    compress_kv_heads(model, 1, key_strategy="post_rope", stats=stats)
    use_effkern_attention(model)
    ids, mask = padded_batch()
    full = generate(model, ids, mask)
    cache = ProjectedKeyCache(model)
    projected = generate(model, ids, mask, cache=cache)
    assert torch.equal(projected, full)
    basis = model.model.layers[0].self_attn.kv_k_basis
    keys = cache.layers[0].keys
    assert keys.shape[1] == basis.shape[0] and keys.shape[-1] == basis.shape[-1] and keys.shape[1] == 1


def test_mask_with_holes_falls_back_to_sdpa():
    keep = torch.tensor([[True, False, True, True]])[:, None, None]
    assert attention._key_ranges(keep, 1, 4) is None
    start, end = attention._key_ranges(torch.tensor([[False, True, True, False]])[:, None, None], 1, 4)
    assert start.tolist() == [1] and end.tolist() == [3]
    additive = torch.tensor([[float("-inf"), 0.0, 0.0]])[:, None, None]
    assert [t.tolist() for t in attention._key_ranges(additive, 1, 3)] == [[1], [3]]
