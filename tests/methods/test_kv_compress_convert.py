"""KV-head conversion on small random Llamas: exact where the maths says so, errors where inputs are wrong."""

from __future__ import annotations

import copy

import pytest
import torch

from effkern.methods.kv_compress.attention import use_effkern_attention
from effkern.methods.kv_compress.calibrate import KVStats, collect_stats
from effkern.methods.kv_compress.convert import compress_kv_heads, plan_groups
from effkern.methods.kv_compress.model import tiny_llama


@pytest.fixture(scope="module")
def model_and_stats():
    model = tiny_llama()
    stats = collect_stats(model, torch.randint(0, 256, (8, 32)), progress=False)
    return model, stats


def converted(model, target, **kwargs):
    out = copy.deepcopy(model)
    compress_kv_heads(out, target, **kwargs)
    use_effkern_attention(out)
    return out


@pytest.mark.parametrize(
    "method, strategy", [("ours", "rope_commuting"), ("ours", "post_rope"), ("svd_w", "rope_commuting")]
)
def test_exact_without_compression(model_and_stats, method, strategy):
    model, stats = model_and_stats
    x = torch.randint(0, 256, (2, 20))
    out = converted(model, 2, method=method, key_strategy=strategy, stats=stats)
    torch.testing.assert_close(out(x).logits, model(x).logits, atol=2e-5, rtol=1e-5)


def test_pre_rope_fold_is_only_exact_without_rope(model_and_stats):
    """The pre-RoPE fold does not commute with RoPE (PAPERS.md D): with RoPE it must differ."""
    model, stats = model_and_stats
    x = torch.randint(0, 256, (2, 20))
    out = converted(model, 2, key_strategy="pre_rope", stats=stats)
    assert (out(x).logits - model(x).logits).abs().max() > 1e-4


@pytest.mark.parametrize("strategy", ["rope_commuting", "post_rope"])
def test_exact_when_group_heads_are_duplicates(strategy):
    model = tiny_llama()
    for layer in model.model.layers:
        a = layer.self_attn
        a.k_proj.weight.data[16:] = a.k_proj.weight.data[:16]
        a.v_proj.weight.data[16:] = a.v_proj.weight.data[:16]
    stats = collect_stats(model, torch.randint(0, 256, (8, 32)), progress=False)
    x = torch.randint(0, 256, (2, 20))
    out = converted(model, 1, key_strategy=strategy, stats=stats)
    torch.testing.assert_close(out(x).logits, model(x).logits, atol=2e-5, rtol=1e-5)
    if strategy == "rope_commuting":
        assert out.config.num_key_value_heads == 1


def test_rope_commuting_basis_commutes_with_rope_at_every_position(model_and_stats):
    """Per-frequency complex scalars commute with RoPE: after conversion at full rank (2 -> 2), logits agree
    at positions far beyond the calibration length."""
    model, stats = model_and_stats
    out = converted(model, 2, key_strategy="rope_commuting", stats=stats)
    x = torch.randint(0, 256, (1, 200))
    torch.testing.assert_close(out(x).logits, model(x).logits, atol=5e-5, rtol=1e-5)


def test_similarity_grouping_pairs_correlated_heads():
    model = tiny_llama(num_heads=8, num_kv_heads=4)
    for layer in model.model.layers:  # make heads 0 and 2 (and 1 and 3) near-duplicates
        a = layer.self_attn
        for src, dst in ((0, 2), (1, 3)):
            a.k_proj.weight.data[dst * 16 : (dst + 1) * 16] = a.k_proj.weight.data[src * 16 : (src + 1) * 16]
            a.v_proj.weight.data[dst * 16 : (dst + 1) * 16] = a.v_proj.weight.data[src * 16 : (src + 1) * 16]
    stats = collect_stats(model, torch.randint(0, 256, (8, 32)), progress=False)
    plan = plan_groups(4, 2, "similarity", stats.v[0] + stats.k_pre[0], 16)
    assert plan.groups == [[0, 2], [1, 3]]
    x = torch.randint(0, 256, (2, 20))
    out = converted(model, 2, key_strategy="rope_commuting", stats=stats, grouping="similarity")
    torch.testing.assert_close(out(x).logits, model(x).logits, atol=2e-5, rtol=1e-5)


def test_checkpointed_calibration_resumes(tmp_path):
    model = tiny_llama()
    blocks = torch.randint(0, 256, (6, 16))
    full = collect_stats(model, blocks, batch_size=2, progress=False)
    ckpt = tmp_path / "stats.safetensors"
    collect_stats(model, blocks[:4], batch_size=2, checkpoint=ckpt, progress=False)  # "interrupted" after 4
    assert KVStats.load(ckpt).blocks == 4
    resumed = collect_stats(model, blocks, batch_size=2, checkpoint=ckpt, progress=False)
    assert resumed.tokens == full.tokens == 6 * 16
    for a, b in zip(resumed.v + resumed.k_post + resumed.k_freq, full.v + full.k_post + full.k_freq, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(target_kv_heads=3), ValueError, "must divide num_key_value_heads=2"),
        (dict(target_kv_heads=1, method="best"), ValueError, "method must be one of"),
        (dict(target_kv_heads=1, key_strategy="nope"), ValueError, "key_strategy must be one of"),
        (dict(target_kv_heads=1, stats=None), ValueError, "needs calibration statistics"),
        (dict(target_kv_heads=1, method="svd_w", key_strategy="post_rope"), ValueError, "svd_w has no k_post"),
    ],
)
def test_bad_arguments(model_and_stats, kwargs, error, match):
    model, stats = model_and_stats
    kwargs = {"stats": stats, **kwargs}
    with pytest.raises(error, match=match):
        compress_kv_heads(copy.deepcopy(model), **kwargs)


def test_too_few_calibration_tokens(model_and_stats):
    model, _ = model_and_stats
    few = collect_stats(model, torch.randint(0, 256, (1, 8)), progress=False)
    with pytest.raises(ValueError, match="calibration covered 8 tokens"):
        compress_kv_heads(copy.deepcopy(model), 1, stats=few)


def test_unsupported_architecture():
    with pytest.raises(TypeError, match="Llama-family"):
        compress_kv_heads(torch.nn.Linear(2, 2), 1)


@pytest.mark.parametrize("grouping", ["consecutive", "similarity"])
def test_rope_commuting_checkpoint_loads_in_plain_transformers(model_and_stats, tmp_path, grouping):
    """A standard-GQA result saves with save_pretrained and loads with plain transformers (sdpa attention, no
    effkern code involved) with identical logits."""
    from transformers import AutoModelForCausalLM

    model, stats = model_and_stats
    out = copy.deepcopy(model)
    compress_kv_heads(out, 1, key_strategy="rope_commuting", stats=stats, grouping=grouping)
    out.save_pretrained(tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    assert plain.config.num_key_value_heads == 1
    x = torch.randint(0, 256, (2, 24))
    torch.testing.assert_close(plain(x).logits, out(x).logits, atol=1e-5, rtol=1e-5)
