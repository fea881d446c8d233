"""``LowRankAttention``: LAST's low-rank self-attention (LSA) for one or K side networks, and
``LowRankAttentionBlock``: the whole LSA block (residual stream, LayerNorm, LSA) around it."""

from __future__ import annotations

import math

import torch
from torch import nn

from effkern.ops import low_rank_attention, low_rank_attention_block


class LowRankAttention(nn.Module):
    """``softmax((x Wq)(x Wk)^T * scale) (x Wv) Wo`` with ``Wq, Wk, Wv: [d, r]``, ``Wo: [r, d]``, r split into
    ``heads`` heads, for ``num_networks`` independent side networks (K) at once (effkern.ops.low_rank_attention).

    Args:
        dim: token width d.
        rank: r, the width of the attention space (r << d).
        heads: heads inside the rank-r space (``rank % heads == 0``).
        num_networks: K side networks with their own weights (LAST's parallel hyper-parameter search).
        zero_init_out: start ``Wo`` at zero, so a residual side network starts as the identity (LAST: the
            training starts from the frozen features); else the same scaled normal init as the down-projection.
        scale: logit scale, default ``1 / sqrt(rank / heads)``.

    ``forward(x)``: x ``[B, N, d]`` (shared by all K) or ``[K, B, N, d]``; returns ``[K, B, N, d]``, or
    ``[B, N, d]`` when ``num_networks == 1`` and x is ``[B, N, d]`` (drop-in for one network).
    """

    def __init__(self, dim: int, rank: int, heads: int = 1, num_networks: int = 1, zero_init_out: bool = True,
                 scale: float | None = None, device=None, dtype=None):
        super().__init__()
        if min(dim, rank, heads, num_networks) < 1 or rank % heads:
            raise ValueError(f"dim, rank, heads and num_networks must be >= 1 with rank % heads == 0, got dim={dim}, "
                             f"rank={rank}, heads={heads}, num_networks={num_networks}")
        kw = dict(device=device, dtype=dtype)
        self.dim, self.rank, self.heads, self.num_networks, self.scale = dim, rank, heads, num_networks, scale
        self.w_qkv = nn.Parameter(torch.empty(num_networks, dim, 3 * rank, **kw))
        self.w_o = nn.Parameter(torch.empty(num_networks, rank, dim, **kw))
        self.zero_init_out = zero_init_out
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.w_qkv, std=1 / math.sqrt(self.dim))
        if self.zero_init_out:
            nn.init.zeros_(self.w_o)
        else:
            nn.init.normal_(self.w_o, std=1 / math.sqrt(self.rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = low_rank_attention(x, self.w_qkv, self.w_o, heads=self.heads, scale=self.scale)
        return y[0] if self.num_networks == 1 and x.dim() == 3 else y

    def extra_repr(self) -> str:
        return f"dim={self.dim}, rank={self.rank}, heads={self.heads}, num_networks={self.num_networks}"


class LowRankAttentionBlock(LowRankAttention):
    """LAST's LSA block for K side networks (effkern.ops.low_rank_attention_block): ``forward(u, z)`` with the side
    streams ``u [K, B, N, d]`` (or ``[B, N, d]`` shared by all K) and the frozen backbone feature ``z [B, N, d]``
    returns ``h + LSA(LayerNorm(h))`` with ``h = u + z``, ``[K, B, N, d]``. Same parameters as
    :class:`LowRankAttention`; ``eps`` is the LayerNorm's (no affine)."""

    def __init__(self, dim: int, rank: int, heads: int = 1, num_networks: int = 1, zero_init_out: bool = True,
                 scale: float | None = None, eps: float = 1e-5, device=None, dtype=None):
        super().__init__(dim, rank, heads, num_networks, zero_init_out, scale, device, dtype)
        self.eps = eps

    def forward(self, u: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return low_rank_attention_block(u, z, self.w_qkv, self.w_o, heads=self.heads, scale=self.scale,
                                        eps=self.eps)
