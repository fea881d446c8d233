"""Recovery fine-tuning (distillation through LoRA) and the decode-throughput measurement on tiny models."""

from __future__ import annotations

import copy

import pytest
import torch

from effkern.methods.kv_heads.attention import use_effkern_attention
from effkern.methods.kv_heads.calibrate import collect_stats
from effkern.methods.kv_heads.convert import compress_kv_heads
from effkern.methods.kv_heads.evaluate import decode_tokens_per_s
from effkern.methods.kv_heads.finetune import distillation_loss, lora_finetune
from effkern.methods.kv_heads.model import tiny_llama


def kl_to(teacher, student, blocks):
    with torch.no_grad():
        return distillation_loss(student(input_ids=blocks).logits, teacher(input_ids=blocks).logits).item()


@pytest.mark.parametrize("method, strategy", [("mean_pool", "mean_pool"), ("ours", "rope_commuting")])
def test_distillation_moves_the_compressed_model_towards_the_original(method, strategy):
    """The fine-tune optimises the distillation objective (on its training blocks: random tokens give a tiny
    model nothing to generalise from; generalisation is what the flow's held-out perplexity measures)."""
    teacher = tiny_llama(init_std=0.2)
    train = torch.randint(0, 256, (16, 32), generator=torch.Generator().manual_seed(0))
    student = copy.deepcopy(teacher)
    compress_kv_heads(student, 1, method=method, key_strategy=strategy,
                      stats=collect_stats(teacher, train, progress=False))
    use_effkern_attention(student)
    before = kl_to(teacher, student, train)
    tuned, info = lora_finetune(student, train, steps=40, teacher=teacher, lr=1e-2, progress=False)
    assert info["steps"] == 40 and info["tokens"] == 40 * 4 * 32
    assert kl_to(teacher, tuned, train) < 0.6 * before
    assert not any("lora" in name for name, _ in tuned.named_parameters())  # adapters merged


def test_distillation_loss_is_zero_only_for_equal_distributions():
    a = torch.randn(2, 5, 11)
    assert distillation_loss(a, a).abs() < 1e-6
    assert distillation_loss(a, a + torch.randn(2, 5, 11)) > 1e-3


def test_bad_finetune_arguments():
    model = tiny_llama()
    with pytest.raises(ValueError, match="steps must be >= 1"):
        lora_finetune(model, torch.zeros(2, 8, dtype=torch.long), steps=0)
    with pytest.raises(ValueError, match=r"blocks must be \[n >= 1, T\]"):
        lora_finetune(model, torch.zeros(8, dtype=torch.long), steps=1)


def test_decode_throughput_runs_both_attentions():
    model = tiny_llama()
    assert decode_tokens_per_s(model, batch=2, context=40, steps=2) > 0
    use_effkern_attention(model)
    assert decode_tokens_per_s(model, batch=2, context=40, steps=2) > 0
    with pytest.raises(ValueError, match="must be >= 1"):
        decode_tokens_per_s(model, batch=0, context=40)
