"""Recovery fine-tuning after conversion: LoRA (HF peft) on the attention projections, on the CPU.

Every initialisation gets the same wall-clock budget, so "SVD-a init vs mean-pool init" compares what a user
gets for the same compute (PAPERS.md D: the converted model is fine-tuned with LoRA).
"""

from __future__ import annotations

import itertools
import time

import torch
from peft import LoraConfig, get_peft_model
from tqdm.auto import tqdm


def lora_finetune(
    model,
    blocks: torch.Tensor,
    *,
    seconds: float,
    rank: int = 16,
    lr: float = 5e-4,
    batch_size: int = 4,
    progress: bool = True,
    seed: int = 0,
) -> tuple[torch.nn.Module, dict]:
    """Train LoRA adapters on q/k/v/o projections over ``blocks [n, T]`` (next-token loss) for ``seconds`` of
    wall-clock, cycling through the blocks, then merge them. Returns the merged model and a summary
    (steps, tokens, final loss)."""
    if seconds <= 0:
        raise ValueError(f"seconds must be > 0, got {seconds}")
    torch.manual_seed(seed)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    peft_model = get_peft_model(model, cfg)
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    order = torch.randperm(blocks.shape[0])
    batches = itertools.cycle(blocks[order].split(batch_size))
    start, steps, tokens, loss = time.perf_counter(), 0, 0, float("nan")
    bar = tqdm(desc="LoRA recovery", unit="step", disable=not progress)
    while time.perf_counter() - start < seconds:
        batch = next(batches)
        out = peft_model(input_ids=batch, labels=batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        steps, tokens, loss = steps + 1, tokens + batch.numel(), out.loss.item()
        bar.update()
        bar.set_postfix(loss=f"{loss:.3f}")
    bar.close()
    merged = peft_model.merge_and_unload()
    merged.eval()
    return merged, dict(steps=steps, tokens=tokens, final_loss=loss, seconds=seconds)
