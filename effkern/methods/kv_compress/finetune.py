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

from effkern.methods.common import warmup_cosine
from effkern.methods.common.distributed import backward, is_main, local_batch, prepare, release


class _PrecomputedGrad(torch.autograd.Function):
    """A scalar loss whose gradient w.r.t. its input was already formed in the forward pass."""

    @staticmethod
    def forward(ctx, hidden, loss, grad):
        ctx.save_for_backward(grad)
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss, None, None


def head_loss(
    hidden: torch.Tensor,
    head: torch.Tensor,
    *,
    labels: torch.Tensor | None = None,
    teacher_hidden: torch.Tensor | None = None,
    teacher_head: torch.Tensor | None = None,
    chunk: int = 256,
) -> torch.Tensor:
    """The LM loss of ``hidden [n, H]`` through a frozen output head ``head [V, H]``, ``chunk`` rows at a time.

    With ``labels [n]`` (-100: ignored): mean next-token cross-entropy. With ``teacher_hidden [n, H']`` and
    ``teacher_head [V, H']``: mean KL(teacher || student) of the two distributions (distillation). The whole
    [n, V] logits (400 MB fp32 for SmolLM2 at 4 x 512 tokens) never exist: each chunk's logits are formed, reduced,
    turned into the gradient w.r.t. its hidden rows (softmax - target) and dropped, so backward is one multiply.
    Measured on SmolLM2 (issue 3 note): the full-logits log_softmax forward + backward took 1.4 s of a 8 s step.
    """
    if (labels is None) == (teacher_hidden is None):
        raise ValueError("head_loss needs exactly one of labels and teacher_hidden")
    if head.requires_grad:
        raise ValueError("head_loss computes no gradient for head: it must be frozen (requires_grad=False)")
    total = torch.zeros((), dtype=torch.float64, device=hidden.device)
    grad = torch.empty_like(hidden, dtype=torch.float32)
    with torch.no_grad():
        for i in range(0, hidden.shape[0], chunk):
            rows = slice(i, i + chunk)
            logp = torch.log_softmax(F.linear(hidden[rows], head).float(), -1)
            if labels is None:
                t = torch.log_softmax(F.linear(teacher_hidden[rows], teacher_head).float(), -1)
                p_t = t.exp()
                total += (p_t * (t - logp)).sum()
                g = logp.exp_().sub_(p_t)
            else:
                keep = (labels[rows] != -100).unsqueeze(1)
                index = labels[rows].clamp_min(0).unsqueeze(1)
                total -= logp.gather(1, index).mul_(keep).sum()
                g = logp.exp_().scatter_add_(1, index, -keep.float()).mul_(keep)
            grad[rows] = g @ head.float()
        count = hidden.shape[0] if labels is None else int((labels != -100).sum())
        if count == 0:
            raise ValueError("labels has no position to score (all -100)")
    loss = (total / count).to(hidden.dtype)
    return _PrecomputedGrad.apply(hidden, loss, grad.div_(count).to(hidden.dtype))


def _head_weight(model) -> torch.Tensor:
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise ValueError("lora_finetune supports output heads without bias (the Llama family's lm_head)")
    return head.weight


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
    decoder, head = model.get_decoder(), _head_weight(model)
    teacher_head = None if teacher is None else _head_weight(teacher)
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = warmup_cosine(opt, steps, min(warmup, steps // 2))
    # data-parallel under torchrun / accelerate launch: the decoder (its LoRA adapters) is what DDP syncs
    wrapped, opt = prepare(decoder, opt, place=False)
    dev = head.device
    batches = itertools.cycle(blocks[torch.randperm(blocks.shape[0])].split(batch_size))
    start, tokens, loss = time.perf_counter(), 0, float("nan")
    for _ in tqdm(range(steps), desc="LoRA recovery", disable=not progress or not is_main()):
        whole = next(batches)
        part = local_batch(torch.arange(len(whole)))
        if part is None:
            continue
        batch = whole[part].to(dev)
        hidden = wrapped(input_ids=batch, use_cache=False).last_hidden_state.flatten(0, 1)
        if teacher is None:
            labels = torch.cat([batch[:, 1:], torch.full_like(batch[:, :1], -100)], 1).flatten()
            step_loss = head_loss(hidden, head, labels=labels)
        else:
            with torch.no_grad():
                target = teacher.get_decoder()(input_ids=batch, use_cache=False).last_hidden_state.flatten(0, 1)
            step_loss = head_loss(hidden, head, teacher_hidden=target, teacher_head=teacher_head)
        backward(step_loss)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        tokens, loss = tokens + batch.numel(), step_loss.item()
    release()
    merged = peft_model.merge_and_unload()
    merged.eval()
    return merged, dict(steps=steps, tokens=tokens, final_loss=loss, seconds=time.perf_counter() - start)
