"""Recovery fine-tuning after conversion: LoRA (HF peft) on the attention projections, on the CPU.

The loss is, by default, distillation from the original model: KL(teacher || student) of the next-token
distributions at every position, so the student is pulled towards the original model rather than towards the
fine-tuning text (with plain next-token labels on in-domain text, perplexity can also fall for reasons that
have nothing to do with undoing the compression). Measured on SmolLM2 3 -> 1 KV heads (issue notes): over the
first 20 steps both losses recover the same perplexity per step. Every initialisation gets the same number of
steps of the same batch shape, so "SVD-a init vs mean-pool init" compares equal compute (PAPERS.md D: the
converted model is fine-tuned with LoRA).
"""

from __future__ import annotations

import itertools
import time

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher || student) of the next-token distributions (fp32 softmax)."""
    s = F.log_softmax(student_logits.float().flatten(0, -2), -1)
    t = F.log_softmax(teacher_logits.float().flatten(0, -2), -1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


def lora_finetune(
    model,
    blocks: torch.Tensor,
    *,
    steps: int,
    teacher: torch.nn.Module | None = None,
    rank: int = 16,
    lr: float = 1e-3,
    warmup: int = 10,
    batch_size: int = 4,
    progress: bool = True,
    seed: int = 0,
) -> tuple[torch.nn.Module, dict]:
    """Train LoRA adapters on q/k/v/o projections over ``blocks [n, T]`` for ``steps`` steps (cycling through
    the blocks; linear warm-up then cosine decay of the learning rate), then merge them.

    Args:
        teacher: the original model: distillation loss (see module docstring). None: next-token cross-entropy.

    Returns:
        The merged model (eval mode) and a summary: steps, tokens, final loss, seconds (wall clock).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if blocks.ndim != 2 or blocks.shape[0] == 0:
        raise ValueError(f"blocks must be [n >= 1, T] token ids, got shape {tuple(blocks.shape)}")
    torch.manual_seed(seed)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    peft_model = get_peft_model(model, cfg)
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, min(warmup, steps // 2), steps)
    batches = itertools.cycle(blocks[torch.randperm(blocks.shape[0])].split(batch_size))
    start, tokens, loss = time.perf_counter(), 0, float("nan")
    for _ in tqdm(range(steps), desc="LoRA recovery", disable=not progress):
        batch = next(batches)
        if teacher is None:
            step_loss = peft_model(input_ids=batch, labels=batch, use_cache=False).loss
        else:
            with torch.no_grad():
                target = teacher(input_ids=batch, use_cache=False).logits
            step_loss = distillation_loss(peft_model(input_ids=batch, use_cache=False).logits, target)
        step_loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        tokens, loss = tokens + batch.numel(), step_loss.item()
    merged = peft_model.merge_and_unload()
    merged.eval()
    return merged, dict(steps=steps, tokens=tokens, final_loss=loss, seconds=time.perf_counter() - start)
