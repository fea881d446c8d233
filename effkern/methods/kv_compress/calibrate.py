"""Calibration for KV-head compression: streaming fp64 second moments of every layer's KV caches.

For each layer, over all calibration tokens (PAPERS.md D, "SVD-a": the SVD of the caches, through the
origin because Llama projections have no bias)::

    v      = sum_t v_t v_t^T            [Hkv*D, Hkv*D]   values (all KV heads stacked)
    k_pre  = sum_t k_t k_t^T            [Hkv*D, Hkv*D]   keys before RoPE
    k_post = sum_t R_t k_t (R_t k_t)^T  [Hkv*D, Hkv*D]   keys after RoPE at their positions
    k_freq = sum_t z_t z_t^H            [D/2, Hkv, Hkv]  per rotary frequency i, z = k[i] + j k[i + D/2]
                                                         (complex, pre-RoPE; the RoPE-commuting basis)

The full cross-head moments are kept so any grouping of heads can be chosen afterwards. Memory grows with
(Hkv * D)^2 per layer, never with the number of tokens. Statistics are checkpointed atomically after every
batch and a rerun resumes from the last checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from effkern.methods.common import write_safetensors


@dataclass
class KVStats:
    """Per-layer KV-cache moments (see the module docstring) and how many tokens and blocks made them."""

    v: list[torch.Tensor]
    k_pre: list[torch.Tensor]
    k_post: list[torch.Tensor]
    k_freq: list[torch.Tensor]
    tokens: int = 0
    blocks: int = 0

    def save(self, path: Path) -> None:
        """Write atomically (temp file + rename): an interruption never leaves a torn checkpoint."""
        tensors = {}
        for i in range(len(self.v)):
            tensors[f"{i}.v"], tensors[f"{i}.k_pre"], tensors[f"{i}.k_post"] = self.v[i], self.k_pre[i], self.k_post[i]
            tensors[f"{i}.k_freq_re"], tensors[f"{i}.k_freq_im"] = self.k_freq[i].real, self.k_freq[i].imag
        meta = {"tokens": str(self.tokens), "blocks": str(self.blocks), "layers": str(len(self.v))}
        write_safetensors(path, tensors, meta)

    @classmethod
    def load(cls, path: Path) -> KVStats:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        t = load_file(str(path))
        n = int(meta["layers"])
        return cls(
            v=[t[f"{i}.v"] for i in range(n)],
            k_pre=[t[f"{i}.k_pre"] for i in range(n)],
            k_post=[t[f"{i}.k_post"] for i in range(n)],
            k_freq=[torch.complex(t[f"{i}.k_freq_re"], t[f"{i}.k_freq_im"]) for i in range(n)],
            tokens=int(meta["tokens"]),
            blocks=int(meta["blocks"]),
        )


def rotate_half_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF Llama RoPE: ``x [..., T, D]`` with ``cos``/``sin`` ``[T, D]`` (halves duplicated)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _attention_layers(model) -> list[torch.nn.Module]:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not all(hasattr(layer, "self_attn") for layer in layers):
        raise TypeError(
            f"expected a Llama-family causal LM (model.model.layers[i].self_attn), got {type(model).__name__}"
        )
    return [layer.self_attn for layer in layers]


@torch.inference_mode()
def collect_stats(
    model,
    blocks: torch.Tensor,
    *,
    batch_size: int = 4,
    checkpoint: str | Path | None = None,
    progress: bool = True,
) -> KVStats:
    """Run ``model`` over ``blocks [n, T]`` (token ids, each block at positions 0..T-1) and accumulate KVStats.

    With ``checkpoint``, the statistics are saved after every batch and a rerun resumes after the blocks
    already counted (the same ``blocks`` must be passed).
    """
    attns = _attention_layers(model)
    cfg = model.config
    head_dim = attns[0].head_dim
    hkv = cfg.num_key_value_heads
    if blocks.dim() != 2 or blocks.shape[0] == 0:
        raise ValueError(f"blocks must be a non-empty [n_blocks, block_len] tensor of ids, got {tuple(blocks.shape)}")
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if ckpt is not None and ckpt.exists():
        stats = KVStats.load(ckpt)
    else:
        dim = hkv * head_dim
        zeros = [torch.zeros(dim, dim, dtype=torch.float64) for _ in attns]
        stats = KVStats(
            v=[z.clone() for z in zeros],
            k_pre=[z.clone() for z in zeros],
            k_post=zeros,
            k_freq=[torch.zeros(head_dim // 2, hkv, hkv, dtype=torch.complex128) for _ in attns],
        )
    t = blocks.shape[1]
    device = next(model.parameters()).device
    positions = torch.arange(t, device=device)[None]
    cos, sin = model.model.rotary_emb(torch.zeros(1, dtype=torch.float32, device=device), positions)
    cos, sin = cos[0].double(), sin[0].double()  # [T, D]

    def key_hook(i):
        def hook(_mod, _inp, out):
            k = out.double().reshape(-1, t, hkv, head_dim).transpose(1, 2)  # [b, Hkv, T, D]
            flat = k.transpose(1, 2).reshape(-1, hkv * head_dim)
            stats.k_pre[i] += flat.T @ flat
            post = rotate_half_rope(k, cos, sin).transpose(1, 2).reshape(-1, hkv * head_dim)
            stats.k_post[i] += post.T @ post
            z = torch.complex(k[..., : head_dim // 2], k[..., head_dim // 2 :])  # [b, Hkv, T, D/2]
            stats.k_freq[i] += torch.einsum("bhti,bgti->ihg", z, z.conj())

        return hook

    def value_hook(i):
        def hook(_mod, _inp, out):
            flat = out.double().reshape(-1, hkv * head_dim)
            stats.v[i] += flat.T @ flat

        return hook

    handles = []
    for i, attn in enumerate(attns):
        handles.append(attn.k_proj.register_forward_hook(key_hook(i)))
        handles.append(attn.v_proj.register_forward_hook(value_hook(i)))
    try:
        starts = range(stats.blocks, blocks.shape[0], batch_size)
        for start in tqdm(starts, desc="calibrating KV caches", disable=not progress):
            batch = blocks[start : start + batch_size].to(device)
            model(input_ids=batch, use_cache=False)
            stats.blocks += batch.shape[0]
            stats.tokens += batch.numel()
            if ckpt is not None:
                stats.save(ckpt)
    finally:
        for h in handles:
            h.remove()
    return stats
