"""effkern attention inside transformers: decode steps through ``effkern.ops.gqa_decode``, post-RoPE key bases.

``use_effkern_attention(model)`` registers the attention function under ``"effkern_kv"`` with
``AttentionInterface`` and, so padded batches get their mask (ENVIRONMENT.md: without a mask function the
attention silently receives ``attention_mask=None``), with ``AttentionMaskInterface`` using transformers' SDPA
mask. Then:

- a decode step (one query token per sequence, no gradients) runs the ``gqa_decode`` kernel over the cache the
  model's cache class returns (dynamic or static); the padding mask becomes per-sequence ``kv_start`` /
  ``seq_lens`` (left padding, and the unused tail of a static cache). A mask that is not one contiguous range
  per sequence falls back to SDPA;
- prefill and training run SDPA;
- modules with post-RoPE key bases (``key_strategy="post_rope"``) attend with projected keys and queries.
  With :class:`ProjectedKeyCache` the cache stores the projected keys (the compressed KV size); with any other
  cache it stores the full rotated keys and they are projected at every step (correct, not compressed).
"""

from __future__ import annotations

import weakref

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from effkern.ops import gqa_decode

ATTN_IMPLEMENTATION = "effkern_kv"


def _group(module) -> int:
    """Original KV heads per compressed KV head of a post-RoPE module (``kv_k_basis [Hkv, g * D, Dk]``)."""
    return module.kv_k_basis.shape[1] // module.head_dim


def project_keys(module, key: torch.Tensor) -> torch.Tensor:
    """``k' = concat(RoPE(k) of a group) @ kv_k_basis[j]``: ``[B, g * Hkv, T, D]`` -> ``[B, Hkv, T, Dk]``."""
    b, hk, t, d = key.shape
    hkv, gd, _ = module.kv_k_basis.shape
    grouped = key.view(b, hkv, hk // hkv, t, d).permute(0, 1, 3, 2, 4).reshape(b, hkv, t, gd)
    return torch.einsum("bjtf,jfe->bjte", grouped, module.kv_k_basis.to(key.dtype))


class ProjectedKeyCache(DynamicCache):
    """A ``DynamicCache`` that stores post-RoPE-compressed layers' keys projected (``[B, Hkv, T, Dk]``), so the
    cache really is the compressed size. Layers without key bases (or with group size 1) are stored as given."""

    def __init__(self, model, **kwargs):
        super().__init__(config=model.config, **kwargs)
        self._modules_by_layer = {
            i: layer.self_attn
            for i, layer in enumerate(model.model.layers)
            if hasattr(layer.self_attn, "kv_k_basis") and _group(layer.self_attn) > 1
        }

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        module = self._modules_by_layer.get(layer_idx)
        if module is not None:
            key_states = project_keys(module, key_states)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


def _key_ranges(mask: torch.Tensor | None, batch: int, kv_len: int):
    """``(kv_start, seq_lens)`` of the last query row of an SDPA mask (bool keep-mask or additive float), or
    None when some sequence's kept keys are not one contiguous range."""
    if mask is None:
        return None, torch.full((batch,), kv_len, dtype=torch.int32)
    keep = mask[:, 0, -1] if mask.dtype == torch.bool else mask[:, 0, -1] == 0
    if keep.shape[-1] != kv_len:
        return None
    keep = keep.expand(batch, kv_len)
    any_kept = keep.any(-1)
    start = torch.where(any_kept, keep.int().argmax(-1), 0)
    end = torch.where(any_kept, kv_len - keep.flip(-1).int().argmax(-1), 0)
    if not torch.equal(keep.sum(-1), end - start):
        return None
    return start.to(torch.int32), end.to(torch.int32)


# Every layer of one forward pass receives the same mask tensor: its key ranges are computed once.
_last_ranges: tuple = (None, None)


def _cached_key_ranges(mask: torch.Tensor | None, batch: int, kv_len: int):
    global _last_ranges
    ref, ranges = _last_ranges
    if mask is None or ref is None or ref() is not mask:
        ranges = _key_ranges(mask, batch, kv_len)
        _last_ranges = (None if mask is None else weakref.ref(mask), ranges)
    return ranges


def _decode(module, query, key, value, attention_mask, scaling: float | None):
    """One decode step through gqa_decode; None when the mask has holes (the caller falls back to SDPA)."""
    ranges = _cached_key_ranges(attention_mask, query.shape[0], key.shape[2])
    if ranges is None:
        return None
    kv_start, seq_lens = (None if r is None else r.to(query.device) for r in ranges)
    q_proj = module.kv_q_basis.float() if hasattr(module, "kv_k_basis") else None
    out = gqa_decode(query[:, :, 0], key, value, seq_lens, kv_start=kv_start, q_proj=q_proj, scale=scaling)
    return out[:, None]  # [B, 1, Hq, Dv], as transformers' attention functions return


def kv_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """transformers attention function: gqa_decode for decode steps, SDPA otherwise; post-RoPE bases applied."""
    post_rope = hasattr(module, "kv_k_basis")
    if post_rope and key.shape[1] == module.kv_k_basis.shape[0] * _group(module):
        key = project_keys(module, key)  # the cache holds full rotated keys
    if query.shape[2] == 1 and not torch.is_grad_enabled() and key.shape[2] > 0:
        out = _decode(module, query, key, value, attention_mask, scaling)
        if out is not None:
            return out, None
    if post_rope:
        query = torch.einsum("bhtd,hde->bhte", query, module.kv_q_basis.to(query.dtype))
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


def use_effkern_attention(model) -> None:
    """Register (once) and select effkern's attention for ``model``."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, kv_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
