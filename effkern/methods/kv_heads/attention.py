"""Attention for compressed models inside transformers: post-RoPE key bases applied after RoPE.

Registered under the name ``"effkern_kv"`` with ``AttentionInterface`` and, so padded batches get their mask
(ENVIRONMENT.md: without a mask function the attention silently receives ``attention_mask=None``), with
``AttentionMaskInterface`` using transformers' SDPA mask. Modules without key bases run plain SDPA.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTN_IMPLEMENTATION = "effkern_kv"


def project_post_rope(
    module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``q' = RoPE(q)_h @ kv_q_basis[h]`` and ``k' = concat(RoPE(k) of a group) @ kv_k_basis[j]``.

    query ``[B, Hq, T, D]`` and key ``[B, Hk, T, D]`` arrive rotated; returns ``[B, Hq, T, Dk]``, ``[B, Hkv, T, Dk]``.
    """
    b, hk, t, d = key.shape
    hkv, gd, _ = module.kv_k_basis.shape
    grouped = key.view(b, hkv, hk // hkv, t, d).permute(0, 1, 3, 2, 4).reshape(b, hkv, t, gd)
    key = torch.einsum("bjtf,jfe->bjte", grouped, module.kv_k_basis.to(key.dtype))
    query = torch.einsum("bhtd,hde->bhte", query, module.kv_q_basis.to(query.dtype))
    return query, key


def kv_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers attention function: post-RoPE projection where the module has key bases, then SDPA."""
    if hasattr(module, "kv_k_basis"):
        query, key = project_post_rope(module, query, key)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def use_effkern_attention(model) -> None:
    """Register (once) and select effkern's attention for ``model``."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, kv_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
