"""LAST (PAPERS.md A): a side network of low-rank self-attention (LSA) blocks over a frozen timm ViT's features.

The backbone is frozen in parameters and outputs: :func:`group_features` runs it once (no autograd) and returns
``z_0`` (the embedded tokens) and ``z_i`` (the output of each group of ``group_size`` blocks). The side network
(:class:`LASTSide`) then never touches the backbone again, so features can be cached and K side networks
(K hyper-parameter settings) trained at once over the same features.

Side stream [RECON, switches]: ``u_0 = z_0``; ``h_i = u_{i-1} + z_i``; ``u_i = h_i + LSA_i(LN(h_i))``. The bias
correction (``bias_correction=True``) returns ``u_m - sum_{i<m} z_i = z_m + sum_i LSA_i(.)``: the frozen final
feature plus learned deltas (computed as ``u_m`` minus the running sum of the z's, on the pooled tokens only);
then the backbone's final LayerNorm (frozen), the pool (``"cls"`` or ``"mean"`` of patch tokens) and a linear
head per side network. ``LN`` has no affine parameters: an affine would be folded
into the LSA down-projection anyway, and without it the first block's K networks read the same normalised
tokens, so their down-projections are one GEMM (effkern.ops.low_rank_attention). ``Wo`` starts at zero, so
training starts from the linear-probe model on the final feature.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from effkern.nn import LowRankAttentionBlock


@torch.no_grad()
def group_features(vit: nn.Module, images: torch.Tensor, group_size: int) -> list[torch.Tensor]:
    """``[z_0, z_1, ..., z_m]`` (each ``[B, N, d]``) of a timm ``VisionTransformer``: the embedded tokens and the
    output of every ``group_size``-th block (``m = depth / group_size``)."""
    depth = len(vit.blocks)
    if group_size < 1 or depth % group_size:
        raise ValueError(f"group_size must divide the backbone depth {depth}, got {group_size}")
    x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
    feats = [x]
    for i, block in enumerate(vit.blocks):
        x = block(x)
        if (i + 1) % group_size == 0:
            feats.append(x)
    return feats


class LASTSide(nn.Module):
    """K LAST side networks (LSA blocks + heads) over ``m + 1`` backbone features.

    Args:
        dim: token width d of the backbone.
        num_blocks: m, the number of feature groups (one LSA block each).
        rank: r of every LSA block; heads: attention heads inside r.
        num_classes: classes of the task.
        final_norm: the backbone's final LayerNorm (copied and frozen).
        num_networks: K side networks trained together (e.g. K learning rates).
        pool: ``"cls"`` (the first token) or ``"mean"`` (mean of the patch tokens).
        bias_correction: subtract ``sum_{i<m} z_i`` from the side stream (LAST); False keeps ``u_m``.
        num_prefix_tokens: tokens before the patches (1: the cls token).
    """

    def __init__(self, dim: int, num_blocks: int, rank: int, num_classes: int, final_norm: nn.Module, *,
                 heads: int = 1, num_networks: int = 1, pool: str = "cls", bias_correction: bool = True,
                 num_prefix_tokens: int = 1):
        super().__init__()
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
        if pool == "cls" and num_prefix_tokens < 1:
            raise ValueError("pool='cls' needs a cls token (num_prefix_tokens >= 1)")
        self.pool, self.bias_correction, self.num_prefix_tokens = pool, bias_correction, num_prefix_tokens
        self.num_networks = num_networks
        self.blocks = nn.ModuleList(LowRankAttentionBlock(dim, rank, heads=heads, num_networks=num_networks)
                                    for _ in range(num_blocks))
        self.final_norm = copy.deepcopy(final_norm).requires_grad_(False)
        self.head_weight = nn.Parameter(torch.zeros(num_networks, dim, num_classes))
        self.head_bias = nn.Parameter(torch.zeros(num_networks, num_classes))

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """Logits ``[K, B, classes]`` from ``[z_0, ..., z_m]`` (each ``[B, N, d]``, e.g. cached)."""
        if len(feats) != len(self.blocks) + 1:
            raise ValueError(f"expected {len(self.blocks) + 1} features [z_0..z_m], got {len(feats)}")
        dtype = self.head_weight.dtype
        feats = [f.to(dtype) for f in feats]
        u = feats[0]
        for block, z in zip(self.blocks, feats[1:], strict=True):
            u = block(u, z)  # [B, N, d] (z_0, shared by all K) before the first block, then [K, B, N, d]
        # Only the pooled tokens are normalised and read: the cls row, or the patch rows for the mean.
        rows = slice(0, 1) if self.pool == "cls" else slice(self.num_prefix_tokens, None)
        out = u[..., rows, :]
        if self.bias_correction:  # u_m - sum_{i<m} z_i = z_m + sum_i LSA_i(.): the frozen final feature + deltas
            out = out - sum(z[:, rows] for z in feats[:-1])
        pooled = self.final_norm(out).mean(-2)  # the mean of the one cls row is that row
        if pooled.dim() == 2:  # no LSA block (the linear probe): every network reads the same feature
            pooled = pooled.expand(self.num_networks, -1, -1)
        return torch.baddbmm(self.head_bias[:, None], pooled, self.head_weight)
