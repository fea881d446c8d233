"""Recovery fine-tuning (distillation through LoRA) and the decode-throughput measurement on tiny models."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from effkern.methods.kv_compress.attention import use_effkern_attention
from effkern.methods.kv_compress.calibrate import collect_stats
from effkern.methods.kv_compress.convert import compress_kv_heads
from effkern.methods.kv_compress.evaluate import decode_tokens_per_s
from effkern.methods.kv_compress.finetune import head_loss, lora_finetune
from effkern.methods.kv_compress.model import tiny_llama


def kl(student_logits, teacher_logits):
    """Mean over positions of KL(teacher || student), on whole logits (the formula head_loss chunks)."""
    s = F.log_softmax(student_logits.flatten(0, -2), -1)
    t = F.log_softmax(teacher_logits.flatten(0, -2), -1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


def kl_to(teacher, student, blocks):
    with torch.no_grad():
        return kl(student(input_ids=blocks).logits, teacher(input_ids=blocks).logits).item()


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


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_head_loss_equals_whole_logits_losses_and_their_gradients(chunk):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(20, 16, generator=g, requires_grad=True)
    head = torch.randn(50, 16, generator=g)
    teacher_hidden, teacher_head = torch.randn(20, 12, generator=g), torch.randn(50, 12, generator=g)
    labels = torch.randint(0, 50, (20,), generator=g)
    labels[[3, 11]] = -100
    cases = [
        (dict(labels=labels), lambda h: F.cross_entropy(h @ head.T, labels)),
        (dict(teacher_hidden=teacher_hidden, teacher_head=teacher_head),
         lambda h: kl(h @ head.T, teacher_hidden @ teacher_head.T)),
    ]
    for kwargs, formula in cases:
        ours = head_loss(hidden, head, chunk=chunk, **kwargs)
        (grad,) = torch.autograd.grad(3.0 * ours, hidden)
        want = formula(hidden)
        (want_grad,) = torch.autograd.grad(3.0 * want, hidden)
        torch.testing.assert_close(ours, want)
        torch.testing.assert_close(grad, want_grad)
    same = head_loss(teacher_hidden, teacher_head, teacher_hidden=teacher_hidden, teacher_head=teacher_head)
    assert same.abs() < 1e-6


def test_bad_head_loss_arguments():
    hidden, head = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises(ValueError, match="exactly one of labels and teacher_hidden"):
        head_loss(hidden, head)
    with pytest.raises(ValueError, match="must be frozen"):
        head_loss(hidden, head.requires_grad_(), labels=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="all -100"):
        head_loss(hidden, head.detach(), labels=torch.full((4,), -100))


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
